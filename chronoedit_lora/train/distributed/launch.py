"""What the ``accelerate launch`` asked for, checked before the Accelerator starts or a model loads.

accelerate passes the config's ``distributed_type`` on to the processes as environment variables
(``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_FSDP``). Two combinations cannot work here and
would otherwise fail late or silently: DeepSpeed without its package or without CUDA (on CPU,
``Accelerator(cpu=True)`` ignores DeepSpeed and would train as plain DDP under a ZeRO config), and
an fp8 base under FSDP (FSDP2 shards and all-gathers floating-point parameters; the kit's float8
block weights with their per-row scales are not exercised that way, so they are refused), and
sampling or evaluating during FSDP training (the main process alone cannot run a DiT split across all ranks),
and FSDP1 (the kit gathers FSDP2's per-parameter shards; FSDP1 flattens them), and a full
fine-tune under DeepSpeed (its state is saved with torch.distributed.checkpoint from FSDP2 shards),
and block swap on more than one process (DDP, FSDP and DeepSpeed need the weights on the GPU), and an
8-bit AdamW under FSDP (bitsandbytes is not a test dependency, so it is untested there; :mod:`..loop.optimizer`).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ...errors import ChronoEditError
from . import fsdp
from ..loop.config import TrainConfig
from ..loop.optimizer import check_optimizer


def deepspeed_requested() -> bool:
    """True when the launch used a DeepSpeed config (``distributed_type: DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_launch(config: TrainConfig) -> None:
    """Refuse a launch this machine or these settings cannot train with, naming the fix."""
    if deepspeed_requested():
        missing = [what for what, ok in (("the deepspeed package (pip install deepspeed)",
                                          importlib.util.find_spec("deepspeed") is not None),
                                         ("CUDA GPUs", torch.cuda.is_available())) if not ok]
        if missing:
            raise ChronoEditError(
                "the accelerate config asks for DeepSpeed (distributed_type: DEEPSPEED), which needs "
                + " and ".join(missing) + " on this machine. Use configs/accelerate/multi_gpu_ddp.yaml or "
                "fsdp.yaml on GPUs, or configs/accelerate/cpu_2proc.yaml on CPU.")
    if fsdp.requested() and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ChronoEditError(
            f"the accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}; the kit trains with "
            "FSDP2 only (its LoRA and optimizer-state gathering work on FSDP2's per-parameter shards). Set "
            "fsdp_version: 2 under fsdp_config, as in configs/accelerate/fsdp.yaml.")
    for key, fix in (("sample_every", "sample the saved lora-stepNNNNNN.safetensors with `chronoedit-lora edit --lora`"),
                     ("eval_every", "evaluate the saved LoRAs afterwards with `chronoedit-lora eval --run`")):
        if fsdp.requested() and getattr(config, key):
            raise ChronoEditError(
                f"{key} = {getattr(config, key)} cannot be used with an FSDP launch: it runs the DiT on the main "
                f"process alone, and under FSDP the DiT's weights are split across all processes. Set {key} = 0 "
                f"and {fix}.")
    if fsdp.requested() and config.compile:
        raise ChronoEditError(
            "compile = true is not supported with an FSDP launch yet (compiled blocks under FSDP2's sharding hooks "
            "are untested here). Set compile = false, or use configs/accelerate/multi_gpu_ddp.yaml.")
    if deepspeed_requested() and config.finetune == "full":
        raise ChronoEditError(
            'finetune = "full" shards its weights with FSDP and saves them with torch.distributed.checkpoint; DeepSpeed '
            "holds the optimizer itself. Use configs/accelerate/fsdp.yaml (or fsdp_multi_node.yaml).")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if config.block_swap and (fsdp.requested() or deepspeed_requested() or processes > 1):
        launch = "an FSDP" if fsdp.requested() else "a DeepSpeed" if deepspeed_requested() else f"a {processes}-process"
        raise ChronoEditError(
            f"block_swap = true cannot be combined with {launch} launch: it streams one process's DiT blocks through "
            "its GPU, while DDP, FSDP and DeepSpeed each need the model's weights on the GPU. Train on one GPU "
            "(plain `chronoedit-lora train`), or set block_swap = false and shard the base with "
            "configs/accelerate/fsdp.yaml.")
    if fsdp.requested() and config.fp8_base:
        raise ChronoEditError(
            "fp8_base = true cannot be combined with an FSDP launch (distributed_type: FSDP): the float8 block "
            "weights are not sharded by FSDP. Set fp8_base = false (FSDP already splits the bf16 base across the "
            "GPUs), or keep fp8_base with configs/accelerate/multi_gpu_ddp.yaml.")
    check_optimizer(config, fsdp.requested())
