"""LoRA weights in one canonical form, keyed by DiffSynth/Wan module names (``blocks.3.self_attn.q``).

The kit writes the layout diffusers' ``ChronoEditPipeline.load_lora_weights`` and ComfyUI both
load as-is: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` plus a scalar
``diffusion_model.<module>.alpha`` (DiffSynth's own ``….lora_A.default.weight`` keys are ignored by
ComfyUI, nv-tlabs/ChronoEdit#22). :mod:`.formats` reads and writes the other layouts.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..models.safetensors_header import read_header


@dataclass
class LoraModule:
    """One adapted linear layer: delta W = alpha / rank * up @ down."""

    down: torch.Tensor  # lora_A, (rank, in_features)
    up: torch.Tensor  # lora_B, (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        return (self.alpha / self.rank) * (self.up.float() @ self.down.float())


LoraWeights = dict[str, LoraModule]


def from_peft_parameters(named: dict[str, torch.Tensor], alpha: float) -> LoraWeights:
    """Collect peft's ``<module>.lora_A.default.weight`` / ``lora_B`` tensors of a model."""
    weights: LoraWeights = {}
    for name, tensor in named.items():
        for part, field in (("lora_A", "down"), ("lora_B", "up")):
            marker = f".{part}."
            if marker in name:
                module = name.split(marker)[0]
                entry = weights.setdefault(module, LoraModule(None, None, alpha))  # type: ignore[arg-type]
                setattr(entry, field, tensor.detach())
    return weights


def save_lora(weights: LoraWeights, path: str | Path, metadata: dict[str, str] | None = None,
              fmt: str = "comfyui") -> None:
    """Write a LoRA in ``fmt`` (default: the kit's diffusers/ComfyUI layout) atomically:
    temporary file in the same folder, fsync, rename."""
    from .formats import format_state

    state, extra = format_state(weights, fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={**(metadata or {}), **extra})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_lora(path: str | Path) -> tuple[LoraWeights, dict[str, str]]:
    """Read a LoRA in any supported key format (header validated first: clear errors for damaged files)."""
    from .formats import parse_state

    _, metadata = read_header(path)
    weights, fmt = parse_state(load_file(str(path)), metadata, str(path))
    return weights, {**metadata, "detected_format": fmt}
