"""Check a LoRA against a model, fuse it into the base weights, or apply it unfused through hooks."""

from __future__ import annotations

import torch

from ..errors import CheckpointError, ChronoEditError, listing
from .weights import LoraWeights, non_finite_layers


class LoraMismatchError(ChronoEditError):
    """The LoRA names layers the model lacks, or its shapes do not fit them."""


def check_finite(weights: LoraWeights, source: str = "LoRA") -> None:
    """Raise :class:`CheckpointError` naming the layers holding NaN or inf: such a LoRA would turn
    every output into NaN (or, merged, ruin the checkpoint)."""
    bad = non_finite_layers(weights)
    if bad:
        raise CheckpointError(f"{source}: {listing('layer(s) with NaN or inf weights', bad)}; the LoRA is damaged "
                              "(diverged training?): use an earlier checkpoint of it or retrain.")


def check_lora_matches(weights: LoraWeights, model: torch.nn.Module, source: str = "LoRA") -> None:
    """Raise :class:`LoraMismatchError` listing every missing layer and misfit shape (never a partial load)."""
    modules = dict(model.named_modules())
    missing, misfit = [], []
    for name, lora in sorted(weights.items()):
        layer = modules.get(name)
        if not isinstance(layer, torch.nn.Linear):
            missing.append(name if layer is None else f"{name} ({type(layer).__name__})")
        elif lora.down.shape[1] != layer.in_features or lora.up.shape[0] != layer.out_features or lora.up.shape[1] != lora.rank:
            misfit.append(f"{name}: LoRA {tuple(lora.up.shape)} @ {tuple(lora.down.shape)} vs layer "
                          f"({layer.out_features}, {layer.in_features})")
    if missing or misfit:
        lines = ([listing("layer(s) not in the model (as a Linear)", missing)] if missing else []) + \
                ([listing("shape mismatch(es)", misfit)] if misfit else [])
        raise LoraMismatchError(f"{source} does not fit this model (is it for another base model?):\n  " + "\n  ".join(lines))


@torch.no_grad()
def fuse_lora(model: torch.nn.Module, weights: LoraWeights, scale: float = 1.0) -> None:
    """W += scale * alpha / rank * B @ A for every layer (computed in float32, cast back).

    Checked first with :func:`check_lora_matches`, so a misfit changes nothing. In bf16 a small
    delta can round away; ``fuse_lora(model, weights, -scale)`` undoes a fuse only up to that rounding.
    """
    check_lora_matches(weights, model)
    modules = dict(model.named_modules())
    for name, lora in weights.items():
        weight = modules[name].weight
        weight.copy_((weight.float() + scale * lora.delta().to(weight.device)).to(weight.dtype))


class UnfusedLora:
    """A LoRA applied through forward hooks: y = layer(x) + scale * (alpha / rank) * B (A x).

    Base weights stay untouched, so ``scale`` can be changed between runs and :meth:`remove`
    restores the model exactly, without reloading it. Slower per step than fusing. Also a context
    manager that removes the hooks on exit.
    """

    def __init__(self, model: torch.nn.Module, weights: LoraWeights, scale: float = 1.0,
                 device: torch.device | None = None) -> None:
        """``device``: where the hooks' factors live (default: each layer's weight's device); the
        compute device when the weights are offloaded."""
        check_lora_matches(weights, model)
        self.scale = scale
        modules = dict(model.named_modules())
        self._handles = []
        for name, lora in weights.items():
            weight = modules[name].weight
            down = lora.down.to(device or weight.device, weight.dtype)
            up = (lora.up.float() * lora.scale).to(device or weight.device, weight.dtype)
            self._handles.append(modules[name].register_forward_hook(self._hook(down, up)))

    def _hook(self, down: torch.Tensor, up: torch.Tensor):
        def add_lora(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + self.scale * torch.nn.functional.linear(torch.nn.functional.linear(inputs[0], down), up)
        return add_lora

    def remove(self) -> None:
        """Remove the hooks: the model computes exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> UnfusedLora:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
