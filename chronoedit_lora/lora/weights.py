"""LoRA weights in one canonical form, keyed by DiffSynth/Wan module names (``blocks.3.self_attn.q``).

The kit's file format is the one diffusers' ``ChronoEditPipeline.load_lora_weights`` and ComfyUI
both load as-is: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` plus a scalar
``diffusion_model.<module>.alpha`` (DiffSynth's own ``….lora_A.default.weight`` keys are ignored by
ComfyUI, nv-tlabs/ChronoEdit#22).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..models.safetensors_header import read_header

PREFIX = "diffusion_model."


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


def to_file_state(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """The kit's (diffusers- and ComfyUI-compatible) key layout."""
    state = {}
    for module, lora in sorted(weights.items()):
        state[f"{PREFIX}{module}.lora_A.weight"] = lora.down.contiguous()
        state[f"{PREFIX}{module}.lora_B.weight"] = lora.up.contiguous()
        state[f"{PREFIX}{module}.alpha"] = torch.tensor(float(lora.alpha))
    return state


def save_lora(weights: LoraWeights, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a LoRA atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(to_file_state(weights), tmp, metadata=metadata or {})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_lora(path: str | Path) -> tuple[LoraWeights, dict[str, str]]:
    """Read a LoRA in the kit's key layout (validated header first: clear errors for damaged files)."""
    _, metadata = read_header(path)
    state = load_file(str(path))
    weights: LoraWeights = {}
    unknown = []
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            unknown.append(key)
            continue
        module, _, field = key[len(PREFIX):].rpartition(".lora_")
        if key.endswith(".alpha"):
            weights.setdefault(key[len(PREFIX):-len(".alpha")], LoraModule(None, None, 0.0)).alpha = float(tensor)  # type: ignore[arg-type]
        elif field in ("A.weight", "B.weight", "down.weight", "up.weight"):
            entry = weights.setdefault(module, LoraModule(None, None, 0.0))  # type: ignore[arg-type]
            if field in ("A.weight", "down.weight"):
                entry.down = tensor
            else:
                entry.up = tensor
        else:
            unknown.append(key)
    incomplete = [m for m, w in weights.items() if w.down is None or w.up is None]
    if unknown or incomplete:
        raise CheckpointError(f"{path}: not a LoRA in the kit's format; unexpected keys {unknown[:5]}, "
                              f"modules missing lora_A/lora_B {incomplete[:5]}.")
    for lora in weights.values():
        if lora.alpha == 0.0:
            lora.alpha = float(lora.rank)  # no .alpha key: the convention is alpha = rank
    return weights, metadata
