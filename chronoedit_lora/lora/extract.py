"""A LoRA from a fine-tune: per linear layer, the best rank-R approximation of the weight change.

``delta = tuned - base`` (float32) is factored with a truncated SVD, ``delta ~= U_R S_R V_R^T``
(Eckart-Young: the closest rank-R matrix in Frobenius and spectral norm); the LoRA stores
``up = U_R sqrt(S_R)``, ``down = sqrt(S_R) V_R^T`` and alpha = R, so its delta is exactly that
approximation, and at full rank the difference itself to float precision. Layers the fine-tune
did not change are left out. Weights are read one layer at a time from the safetensors files (or a
full fine-tune's sharded checkpoint), so a 14B pair never sits in memory whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from ..models.dit import DiTCheckpoint, wan_names
from .weights import LoraModule, LoraWeights


class DiTWeights:
    """A DiT checkpoint's tensors by DiffSynth/Wan name, read on demand."""

    def __init__(self, checkpoint: DiTCheckpoint):
        names = wan_names(checkpoint)
        self.where: dict[str, tuple[Path, str]] = {}
        for path in checkpoint.files:
            with safe_open(str(path), framework="pt") as f:
                self.where.update({names[key]: (path, key) for key in f.keys() if key in names})

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name][0], []).append(name)
        tensors = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                tensors.update({name: f.get_tensor(self.where[name][1]) for name in file_names})
        return tensors


def low_rank(delta: torch.Tensor, rank: int) -> tuple[LoraModule, float]:
    """The rank-``rank`` LoRA closest to ``delta`` and the share of its squared Frobenius norm it keeps."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    total = float(s.square().sum())
    kept = float(s[:r].square().sum()) / total if total else 1.0
    return LoraModule(root[:, None] * vh[:r], u[:, :r] * root, float(r)), kept


def extract(base: DiTWeights, read_tuned, layers: list[str], rank: int, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32) -> tuple[LoraWeights, dict[str, float]]:
    """The LoRA of every changed layer, and per layer the share of the change it keeps.

    ``read_tuned(names)`` gives the fine-tune's tensors by name, like :meth:`DiTWeights.read`.
    """
    weights, kept = {}, {}
    for layer in layers:
        name = f"{layer}.weight"
        delta = read_tuned([name])[name].to(device, torch.float32) - base.read([name])[name].to(device, torch.float32)
        if not delta.any():
            continue
        lora, kept[layer] = low_rank(delta, rank)
        weights[layer] = LoraModule(lora.down.to("cpu", dtype), lora.up.to("cpu", dtype), lora.alpha)
    return weights, kept
