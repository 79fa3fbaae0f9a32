"""LoRA weights in one canonical form, keyed by DiffSynth/Wan module names (``blocks.3.self_attn.q``).

Every file format is read into and written from this form (:mod:`.formats`, :mod:`.io`), so the
rest of the kit never sees key names: ``{module: LoraModule(down, up, alpha)}`` with
``delta W = alpha / rank * up @ down``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch


@dataclass
class LoraModule:
    """One adapted linear layer: delta W = alpha / rank * up @ down."""

    down: torch.Tensor  # lora_A, (rank, in_features)
    up: torch.Tensor  # lora_B, (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        """Inner dimension of the factors."""
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on up @ down."""
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change in float32."""
        return self.scale * (self.up.float() @ self.down.float())


LoraWeights = dict[str, LoraModule]


def non_finite_layers(weights: LoraWeights) -> list[str]:
    """Sorted names of the layers whose down, up or alpha hold NaN or inf (a diverged or damaged LoRA)."""
    return sorted(name for name, lora in weights.items()
                  if not (math.isfinite(lora.alpha) and torch.isfinite(lora.down).all() and torch.isfinite(lora.up).all()))

_PEFT_PARAMETER = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?:[^.]+\.)?weight$")


def from_peft_parameters(named: dict[str, torch.Tensor], alpha: float) -> LoraWeights:
    """Collect peft's ``<module>.lora_A.<adapter>.weight`` / ``lora_B`` tensors of a model (one adapter)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named.items():
        match = _PEFT_PARAMETER.match(name)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor.detach()
    return {module: LoraModule(p["A"], p["B"], float(alpha)) for module, p in sorted(parts.items())}
