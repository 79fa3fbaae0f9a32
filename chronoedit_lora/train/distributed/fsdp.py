"""FSDP for the LoRA trainer: everything that differs from DDP, in one place.

Under DDP every rank holds the whole DiT, so the trainer needs nothing from here: each function
below is the plain DDP operation when the run is not sharded. Under FSDP (``distributed_type:
FSDP`` in the accelerate config, which ``accelerate launch`` passes on as ``ACCELERATE_USE_FSDP``)
the frozen DiT is split per ``DiTBlock`` (FSDP2, ``torch.distributed.fsdp.fully_shard``) and
every parameter, LoRA included, is a ``DTensor`` holding 1/N of it on each rank. Then:

* the LoRA file needs the *full* LoRA: :func:`full_lora` all-gathers it (every rank takes part,
  rank 0 keeps it);
* the training state is saved *gathered*: :func:`optimizer_state` all-gathers AdamW's moments into
  the same per-parameter full tensors a DDP run saves, and :func:`load_optimizer_state` cuts each
  rank's shard back out. A checkpoint therefore has the same files and format under DDP and FSDP
  (one ``optimizer.pt``), and ``--resume`` continues exactly;
* an optimizer whose step cannot run on shards (Prodigy, Adafactor) steps on whole copies of the
  trained tensors (:func:`step_on_whole_tensors`): its state is whole already;
* a gradient's norm is known per shard only, so :func:`step_status` adds the shards' squared
  norms across ranks: every rank then sees the same norm, so all stop together on a NaN (otherwise
  one rank would stop and the others would hang) and :func:`clip_gradients` scales every shard
  by the same factor.

Who shards: on GPUs accelerate 1.15 does it (``accelerator.prepare`` runs its FSDP2 path with the
config's ``fsdp_transformer_layer_cls_to_wrap: DiTBlock``, reshard and mixed-precision settings).
On CPU it cannot: ``Accelerator(cpu=True)`` makes the run ``MULTI_CPU`` and ``prepare`` wraps the
model in DDP, ignoring the FSDP settings (accelerate switches to FSDP only for GPU-like device
types). So on CPU, :func:`prepare` applies the same FSDP2 sharding itself, with the settings
accelerate read from the same config (:class:`FullyShardedDataParallelPlugin` from the launch's
environment), on accelerate's gloo process group; that is the path the CPU tests exercise.
"""

from __future__ import annotations

import math
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor, distribute_tensor

from ...lora.weights import is_adapter_parameter


def requested() -> bool:
    """True when the launch asked for FSDP (``accelerate launch`` with an FSDP config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def prepare(accelerator: Accelerator, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
            place_model: bool = True, whole_step: bool = False):
    """``accelerator.prepare(module, optimizer)``, sharding the DiT per block under FSDP
    (``place_model=False``: the module stays where it is, as block swap needs; ``whole_step``: the
    optimizer cannot step on shards, see :func:`step_on_whole_tensors`)."""
    if not requested() or accelerator.num_processes == 1 or accelerator.distributed_type == DistributedType.FSDP:
        module, optimizer = accelerator.prepare(module, optimizer, device_placement=[place_model, None])
    else:
        plugin = FullyShardedDataParallelPlugin()  # the launch's fsdp_config, read from its environment
        if accelerator.mixed_precision != "no":  # what AcceleratorState does for a GPU FSDP run
            plugin.set_mixed_precision(accelerator.mixed_precision)
        before = [p for p in module.parameters() if p.requires_grad]
        _shard_per_block(module, plugin)
        after = {id(old): new for old, new in zip(before, (p for p in module.parameters() if p.requires_grad))}
        for group in optimizer.param_groups:  # fully_shard replaced every Parameter by a DTensor one
            group["params"] = [after[id(p)] for p in group["params"]]
        optimizer = accelerator.prepare(optimizer)
    if whole_step and sharded(module):
        step_on_whole_tensors(optimizer.optimizer)
    return module, optimizer


def _shard_per_block(module: torch.nn.Module, plugin: FullyShardedDataParallelPlugin) -> None:
    """FSDP2 as accelerate applies it: every module of a class named in the config, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    classes = set(plugin.transformer_cls_names_to_wrap or ["DiTBlock"])
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    for child in list(module.modules())[1:]:
        if type(child).__name__ in classes:
            fully_shard(child, **kwargs)
    fully_shard(module, **kwargs)


def step_on_whole_tensors(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer`` step on whole copies of its sharded parameters, for an optimizer whose step
    cannot run on DTensor shards (``WHOLE_STEP`` in :mod:`..loop.optimizer` says which and why).

    Its parameter groups get a whole copy of each sharded parameter; before each step the gradients
    are all-gathered into the copies (the shards' gradients are dropped), and after it every rank cuts
    its shard out of the stepped copies, without communication. Every rank runs the same step on the
    same whole tensors, so the step is the single-process one, and the optimizer's state is whole and
    the same on every rank: it is saved and loaded as a DDP run's. The base stays sharded; the trained
    tensors and their optimizer state are held whole on every rank, as under DDP.
    """
    pairs = []
    for group in optimizer.param_groups:
        copies = []
        for param in group["params"]:
            copy = param
            if isinstance(param, DTensor):
                copy = torch.nn.Parameter(param.detach().full_tensor())
                pairs.append((param, copy))
            copies.append(copy)
        group["params"] = copies

    def gather(*_) -> None:
        for shard, copy in pairs:  # every rank in the same order: the collectives match
            copy.grad = None if shard.grad is None else shard.grad.full_tensor()
            shard.grad = None

    @torch.no_grad()
    def scatter(*_) -> None:
        for shard, copy in pairs:
            shard.to_local().copy_(distribute_tensor(copy, shard.device_mesh, shard.placements,
                                                     src_data_rank=None).to_local())

    optimizer.register_step_pre_hook(gather)
    optimizer.register_step_post_hook(scatter)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (all of it unless sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def local_parameter_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the frozen base this rank holds, bytes of the whole base), read from the parameters."""
    frozen = [p for p in module.parameters() if not p.requires_grad]
    held = sum(local(p).numel() * p.element_size() for p in frozen)
    return held, sum(p.numel() * p.element_size() for p in frozen)


def full_tensors(named: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """The whole tensors (CPU), gathered from their shards under FSDP; all ranks must call it, only
    those with ``keep`` get the tensors."""
    gathered = {}
    for name, tensor in named.items():
        whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if keep:
            gathered[name] = whole.detach().cpu()
    return gathered


def full_lora(module: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The full adapter parameters (fp32, CPU) by peft name, whatever the adapter type (see
    :func:`full_tensors`)."""
    adapter = {name: param for name, param in module.dit.named_parameters() if is_adapter_parameter(name)}
    return {name: tensor.float() for name, tensor in full_tensors(adapter, keep).items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded tensor gathered (all ranks must call it)."""
    state = optimizer.state_dict()
    state["state"] = {index: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in entry.items()}
                      for index, entry in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a gathered optimizer state, cutting each rank's shard out for sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        param = params[index]
        if isinstance(param, DTensor):
            entry.update({k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
                          for k, v in entry.items() if v.shape == param.shape})
    optimizer.load_state_dict(state)


def step_status(accelerator: Accelerator, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> tuple[float, float | None]:
    """The loss averaged over ranks, and the gradients' global L2 norm (non-finite if any element
    is; None when DeepSpeed holds the gradients): one collective and one host read per optimizer step.

    Gradients are unscaled first (fp16), as ``accelerator.clip_grad_norm_`` does. Under FSDP each
    rank holds a shard of every gradient, so the squared norms of the shards add up across ranks;
    under DDP every rank holds the same full gradient, so their sum is divided by the rank count.
    """
    accelerator.unscale_gradients()
    grads = [p.grad for p in params if p.grad is not None]
    sharded_grads = any(isinstance(g, DTensor) for g in grads)
    squares = (torch.nn.utils.get_total_norm([local(g) for g in grads]).double().square() if grads
               else torch.zeros((), dtype=torch.float64, device=loss.device))
    status = torch.stack([loss.detach().double().reshape(()), squares.to(loss.device)])
    if accelerator.num_processes > 1:
        status = accelerator.reduce(status, reduction="sum")
    total, squares_sum = status.tolist()
    if not sharded_grads:
        squares_sum /= accelerator.num_processes
    return total / accelerator.num_processes, math.sqrt(squares_sum) if grads else None


def clip_gradients(params: list[torch.nn.Parameter], grad_norm: float, max_norm: float) -> None:
    """Scale the gradients so their global norm (from :func:`step_status`) is at most ``max_norm``:
    torch's ``clip_grad_norm_`` rule, without measuring the norm a second time."""
    scale = max_norm / (grad_norm + 1e-6)
    if scale < 1.0:
        torch._foreach_mul_([local(p.grad) for p in params if p.grad is not None], scale)
