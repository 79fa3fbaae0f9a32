"""Where the trained adapter goes and what it says about itself."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ChronoEditError
from ...lora import from_peft_parameters, load_lora, save_lora
from ...lora.weights import ADAPTER_NAMES, is_adapter_parameter, to_peft_parameters
from ..loop.config import TrainConfig

FINAL_NAME = "lora.safetensors"


def final_path(output: Path) -> Path:
    return output / FINAL_NAME


def step_path(output: Path, step: int) -> Path:
    return output / f"lora-step{step:06d}.safetensors"


def metadata(config: TrainConfig, step: int) -> dict[str, str]:
    """safetensors header: enough to know what the LoRA is for and how it was made."""
    return {
        "format": "chronoedit-lora",
        "base_model": "ChronoEdit",
        "adapter": config.adapter,
        "model_path": str(config.model or config.dit),
        "rank": str(config.rank),
        "alpha": str(config.alpha),
        "targets": ",".join(config.targets),
        "rope": config.rope,
        "step": str(step),
        "config": config.to_json(),
    }


def save(named: dict[str, torch.Tensor], path: Path, config: TrainConfig, step: int) -> None:
    """Write the adapter (peft parameter names -> full tensors, see :func:`.fsdp.full_lora`) in the
    kit's format (ComfyUI's keys for its type) with metadata."""
    save_lora(from_peft_parameters(named, config.alpha, config.rank), path, metadata(config, step))


def load_into(module, path: Path, config: TrainConfig) -> None:
    """Copy a saved adapter back into the module's peft parameters (for --resume).

    A checkpoint of another type, rank or target list is refused with what differs.
    """
    params = dict(module.dit.named_parameters())
    saved = peft_named(path, config)
    current = {name: p for name, p in params.items() if is_adapter_parameter(name)}
    missing, extra = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
    misfit = sorted(n for n in current.keys() & saved.keys() if current[n].shape != saved[n].shape)
    if missing or extra or misfit:
        raise ChronoEditError(
            f"--resume: {path} does not fit this run's {ADAPTER_NAMES[config.adapter]} (was it trained with another "
            "adapter type, rank or targets?): "
            f"{len(missing)} layer(s) missing from the checkpoint {missing[:3]}, {len(extra)} unexpected {extra[:3]}, "
            f"{len(misfit)} with other shapes {misfit[:3]}. Resume with the settings it was saved with.")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def peft_named(path: Path, config: TrainConfig) -> dict[str, torch.Tensor]:
    """An adapter file's tensors by peft parameter name (``….lora_A.default.weight``, ``….hada_w1_a…``), as
    the run trains them."""
    return to_peft_parameters(load_lora(path)[0], config.alpha, config.rank)
