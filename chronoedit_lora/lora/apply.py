"""Check a LoRA against a model and fuse it into the base weights."""

from __future__ import annotations

import torch

from ..errors import ChronoEditError
from .weights import LoraWeights

_SHOWN = 10


class LoraMismatchError(ChronoEditError):
    """The LoRA names layers the model lacks, or its shapes do not fit them."""


def check_lora_matches(weights: LoraWeights, model: torch.nn.Module, source: str = "LoRA") -> None:
    """Raise :class:`LoraMismatchError` listing every missing layer and misfit shape (never a partial load)."""
    modules = dict(model.named_modules())
    missing, misfit = [], []
    for name, lora in sorted(weights.items()):
        layer = modules.get(name)
        if not isinstance(layer, torch.nn.Linear):
            missing.append(name)
            continue
        if lora.down.shape[1] != layer.in_features or lora.up.shape[0] != layer.out_features or lora.up.shape[1] != lora.rank:
            misfit.append(f"{name}: LoRA {tuple(lora.up.shape)} @ {tuple(lora.down.shape)} vs layer "
                          f"({layer.out_features}, {layer.in_features})")
    if missing or misfit:
        lines = []
        if missing:
            lines.append(f"{len(missing)} layer(s) not in the model: " + ", ".join(missing[:_SHOWN])
                         + (" …" if len(missing) > _SHOWN else ""))
        if misfit:
            lines.append(f"{len(misfit)} shape mismatch(es): " + "; ".join(misfit[:_SHOWN])
                         + (" …" if len(misfit) > _SHOWN else ""))
        raise LoraMismatchError(f"{source} does not fit this model (is it for another base model?):\n  " + "\n  ".join(lines))


@torch.no_grad()
def fuse_lora(model: torch.nn.Module, weights: LoraWeights, scale: float = 1.0) -> None:
    """W += scale * alpha / rank * B @ A for every layer (computed in float32, cast back)."""
    modules = dict(model.named_modules())
    for name, lora in weights.items():
        layer = modules[name]
        delta = scale * lora.delta().to(layer.weight.device)
        layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))


class UnfusedLora:
    """A LoRA applied through forward hooks: base weights stay untouched, so ``scale`` can be changed
    between edits (or the LoRA removed) without reloading the model. Slower than fusing."""

    def __init__(self, model: torch.nn.Module, weights: LoraWeights, scale: float = 1.0):
        self.scale = scale
        modules = dict(model.named_modules())
        self._handles = []
        for name, lora in weights.items():
            layer = modules[name]
            down = lora.down.to(layer.weight.device, layer.weight.dtype)
            up = (lora.up.float() * (lora.alpha / lora.rank)).to(layer.weight.device, layer.weight.dtype)
            self._handles.append(layer.register_forward_hook(self._hook(down, up)))

    def _hook(self, down: torch.Tensor, up: torch.Tensor):
        def add_lora(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + self.scale * torch.nn.functional.linear(torch.nn.functional.linear(inputs[0], down), up)
        return add_lora

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
