"""What a run trains, into and out of its checkpoints: a LoRA (whole tensors, gathered under FSDP,
in the kit's LoRA files) or a full fine-tune (each rank's shards through :mod:`.dcp`).

Both continue on another process count: a LoRA checkpoint holds whole tensors, which each rank
cuts its shard from; DCP reshards a full fine-tune's state as it loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from ...files import write_text
from . import checkpoint as ckpt, dcp, lora_export
from ..distributed import fsdp
from ..loop.config import TrainConfig
from .ema import ExponentialMovingAverage
from .run_folder import EMA_NAME, SETTINGS, ResumePoint


@dataclass
class Gathered:
    """What the main process writes into a checkpoint: the whole LoRA, its EMA and the optimizer's
    state (for a full fine-tune, whose ranks wrote their shards themselves, its per-group numbers
    only, or None)."""

    lora: dict[str, torch.Tensor] | None = None
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None


def gather(accelerator: Accelerator, config: TrainConfig, module, optimizer: torch.optim.Optimizer | None,
           ema: ExponentialMovingAverage | None, staging: Path) -> Gathered:
    """Every rank: gather the LoRA run's state (kept by the main process; AdamW's only if
    ``optimizer`` is given), or write this rank's shards of the full fine-tune's into ``staging``."""
    keep = accelerator.is_main_process
    if config.finetune == "full":
        dcp.save(staging, accelerator.unwrap_model(module).named_trained(), optimizer, ema)
        return Gathered(optimizer=_group_numbers(optimizer, config))
    return Gathered(fsdp.full_lora(accelerator.unwrap_model(module), keep=keep), ema.full(keep) if ema else None,
                    fsdp.optimizer_state(optimizer) if optimizer is not None else None)


def write(gathered: Gathered, folder: Path, config: TrainConfig, step: int) -> None:
    """Main process: the LoRA and its EMA (a LoRA run) or the settings (a full fine-tune) into ``folder``."""
    if config.finetune == "full":
        write_text(folder / SETTINGS, config.to_json())
        return
    lora_export.save(gathered.lora, folder / lora_export.FINAL_NAME, config, step)
    if gathered.ema is not None:
        lora_export.save(gathered.ema, folder / EMA_NAME, config, step)


def load(resume: ResumePoint, accelerator: Accelerator, config: TrainConfig, module, optimizer: torch.optim.Optimizer,
         scheduler, ema: ExponentialMovingAverage | None) -> None:
    """Every rank: optimizer, LR schedule and EMA from ``resume`` (a LoRA's weights went in before
    FSDP, :func:`.lora_export.load_into`; a full fine-tune's come from its shards here)."""
    state = resume.optimizer_state
    if config.finetune == "full":
        dcp.load(resume.folder, accelerator.unwrap_model(module).named_trained(), optimizer, ema)
        for group, saved in zip(optimizer.param_groups, (state["optimizer"] or {}).get("param_groups", [])):
            group.update({key: value for key, value in saved.items() if key != "params"})
    else:
        fsdp.load_optimizer_state(optimizer, state["optimizer"])
        if ema is not None and (resume.folder / EMA_NAME).is_file():  # else the EMA starts here
            ema.load_full(lora_export.peft_named(resume.folder / EMA_NAME, config))
    scheduler.load_state_dict(ckpt.scheduler_state(state))
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # what the optimizer's saved param groups restore for a LoRA run


def _group_numbers(optimizer: torch.optim.Optimizer, config: TrainConfig) -> dict | None:
    """A full fine-tune's optimizer numbers kept per parameter group (Prodigy's step size ``d`` and
    its running sums), for ``optimizer.pt``; None for AdamW, whose groups hold settings only."""
    if config.optimizer == "adamw":
        return None
    return {"param_groups": [{key: value for key, value in group.items() if key != "params"}
                             for group in optimizer.param_groups]}
