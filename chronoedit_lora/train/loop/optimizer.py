"""The optimizer and its LR schedule, each from its own maintained package.

Optimizers: torch's AdamW (the default), bitsandbytes' 8-bit AdamW (an optional install: imported,
bitsandbytes logs warnings into every command's output on some CPUs), prodigyopt's Prodigy (it
estimates the step size itself: set learning_rate to about 1.0) and transformers' Adafactor (with
the given learning rate, not its relative step). Their state is saved whole in each checkpoint
(gathered under FSDP) and loaded back on ``--resume``. Under FSDP, Prodigy and Adafactor step on
whole copies of the trained tensors (``WHOLE_STEP`` below says why).

LR schedules are diffusers' (``diffusers.optimization.get_scheduler``), counted in optimizer steps
and stepped once per optimizer step by the trainer (never through ``accelerator.prepare``, which
would step it once per process). Step k of a T-step run (k = 1 .. T) trains at learning_rate x
f(k), where f is diffusers' schedule with ``warmup_steps`` warm-up steps over T + 1 steps: the
warm-up's first step trains at 1/warmup of the rate (never at 0), and a decay reaches its end just
after the last step (which still trains).
"""

from __future__ import annotations

import importlib.util

import torch
from diffusers.optimization import get_scheduler

from ...errors import ChronoEditError
from .config import TrainConfig

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
LR_SCHEDULERS = ("constant", "cosine", "linear", "cosine_with_restarts", "polynomial")
# Optimizers the kit runs under FSDP. AdamW steps on FSDP2's sharded (DTensor) parameters, and the kit
# gathers its state into whole tensors and cuts it back into shards. Prodigy and Adafactor cannot step
# on shards (seen with 2 processes on CPU, torch 2.14.1): Prodigy flattens every parameter, which
# DTensor refuses for a shard of uneven size ("Cannot flatten unevenly sharded tensor"), and where it
# runs, the sums its step size d comes from are read with .item(), which on a DTensor reads this rank's
# shard only (d was about half the single-process one, each rank its own); Adafactor keeps its factored
# second moment in plain tensors shaped like the whole matrix's rows and columns, which DTensor refuses
# to mix with shards ("aten.add_.Tensor got mixed torch.Tensor and DTensor"). They step on whole copies
# of the trained tensors instead (fsdp.step_on_whole_tensors), the single-process step. bitsandbytes'
# 8-bit AdamW is not a test dependency, so it is not run under FSDP.
FSDP_OPTIMIZERS = ("adamw", "prodigy", "adafactor")
WHOLE_STEP = ("prodigy", "adafactor")
POLYNOMIAL_END = 1e-7  # diffusers' default end of the polynomial decay
# optimizer -> (module, the pinned package that provides it)
PACKAGES = {"adamw8bit": ("bitsandbytes", "bitsandbytes==0.50.2"), "prodigy": ("prodigyopt", "prodigyopt==1.1.2")}


def check_package(optimizer: str) -> None:
    """Refuse an optimizer whose package is not installed, naming the install command."""
    module, package = PACKAGES.get(optimizer, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise ChronoEditError(f"optimizer = {optimizer!r} needs the {module} package, which is not installed: "
                              f"pip install {package} (or choose another optimizer).")


def check_optimizer(config: TrainConfig, fsdp: bool) -> None:
    """Refuse an optimizer the run cannot use under FSDP, naming the fix."""
    if fsdp and config.finetune == "full" and config.optimizer in WHOLE_STEP:
        raise ChronoEditError(
            f"optimizer = {config.optimizer!r} with finetune = \"full\" cannot be used with an FSDP launch: under FSDP "
            "it steps on whole copies of the trained tensors, so every rank would hold all the trained weights and "
            "their optimizer state. Use adamw, or configs/accelerate/multi_gpu_ddp.yaml.")
    if fsdp and config.optimizer in WHOLE_STEP and config.mixed_precision == "fp16":
        raise ChronoEditError(
            f"optimizer = {config.optimizer!r} with mixed_precision = \"fp16\" cannot be used with an FSDP launch: "
            "under FSDP it steps on whole copies of the trained tensors, and fp16's loss scaling would unscale the "
            "copies' gradients, not the shards'. Use mixed_precision = \"bf16\" (configs/accelerate/fsdp.yaml's).")
    if fsdp and config.optimizer not in FSDP_OPTIMIZERS:
        raise ChronoEditError(
            f"optimizer = {config.optimizer!r} cannot be used with an FSDP launch: bitsandbytes' 8-bit step is not "
            f"tested on FSDP2's sharded parameters. Use {', '.join(FSDP_OPTIMIZERS)}, or "
            "configs/accelerate/multi_gpu_ddp.yaml.")


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, fused: bool | None) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names over ``params`` (``fused``: AdamW's fused kernel)."""
    lr, decay = config.learning_rate, config.weight_decay
    if config.optimizer == "adamw8bit":
        from bitsandbytes.optim import AdamW8bit

        return AdamW8bit(params, lr=lr, weight_decay=decay)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, weight_decay=decay)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay, fused=fused)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig,
                  total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' ``config.lr_scheduler`` with ``config.warmup_steps`` over ``total_steps`` optimizer
    steps, already at step 1 (see the module's docstring)."""
    name = "constant_with_warmup" if config.lr_scheduler == "constant" and config.warmup_steps else config.lr_scheduler
    for group in optimizer.param_groups:  # last_epoch=0 below: the schedule starts at f(1)
        group.setdefault("initial_lr", group["lr"])
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps + 1,
                         num_cycles=config.lr_cycles, power=config.lr_power, last_epoch=0)
