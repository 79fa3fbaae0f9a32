"""Check adapters (LoRA, DoRA, LoHa, LoKr) against a model, fuse them into the base weights, or apply
them unfused through hooks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import CheckpointError, ChronoEditError, listing
from .weights import Adapter, DoraModule, LoraModule, LoraWeights, non_finite_layers


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
    for name, adapter in sorted(weights.items()):
        layer = modules.get(name)
        if not isinstance(layer, torch.nn.Linear):
            missing.append(name if layer is None else f"{name} ({type(layer).__name__})")
        elif adapter.shape != (layer.out_features, layer.in_features):
            what = (f"LoRA {tuple(adapter.up.shape)} @ {tuple(adapter.down.shape)}" if isinstance(adapter, LoraModule)
                    else f"{adapter.kind} delta {adapter.shape}")
            misfit.append(f"{name}: {what} vs layer ({layer.out_features}, {layer.in_features})")
    _refuse_misfits(source, "layer(s) not in the model (as a Linear)", missing, misfit)


def check_weights_match(shapes: dict[str, Sequence[int]], model: torch.nn.Module, source: str) -> None:
    """Raise :class:`LoraMismatchError` listing every weight (a full fine-tune's, by parameter name)
    the model lacks or holds in another shape: what replaces a base's weights must fit them exactly."""
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    missing = [name for name in sorted(shapes) if name not in params]
    misfit = [f"{name}: {tuple(shape)} vs the model's {params[name]}" for name, shape in sorted(shapes.items())
              if name in params and tuple(shape) != params[name]]
    _refuse_misfits(source, "weight(s) not in the model", missing, misfit)


def _refuse_misfits(source: str, absent: str, missing: list[str], misfit: list[str]) -> None:
    if missing or misfit:
        lines = ([listing(absent, missing)] if missing else []) + ([listing("shape mismatch(es)", misfit)] if misfit else [])
        raise LoraMismatchError(f"{source} does not fit this model (is it for another base model?):\n  " + "\n  ".join(lines))


def check_lora_file(path: str | Path, model: torch.nn.Module, source: str = "LoRA") -> LoraWeights:
    """Read the adapter file at ``path`` and check it is finite and fits ``model`` (a meta-device
    skeleton will do, so this runs before the model loads); returns its weights."""
    from .io import load_lora

    weights, _ = load_lora(path)
    check_finite(weights, source)
    check_lora_matches(weights, model, source)
    return weights


def beneath_peft(weights: LoraWeights, model: torch.nn.Module) -> LoraWeights:
    """``weights`` renamed to the base layers of the layers peft wrapped (``name.base_layer``), so
    hooks on them act beneath an adapter being trained, as if fused into the base."""
    modules = dict(model.named_modules())
    return {f"{name}.base_layer" if f"{name}.base_layer" in modules else name: adapter
            for name, adapter in weights.items()}


@torch.no_grad()
def fuse_lora(model: torch.nn.Module, weights: LoraWeights, scale: float = 1.0) -> None:
    """W += scale * delta(W) for every layer (computed in float32, cast back; see :mod:`.weights`).

    Checked first with :func:`check_lora_matches`, so a misfit changes nothing. In bf16 a small
    delta can round away; ``fuse_lora(model, weights, -scale)`` undoes a fuse only up to that rounding
    (and, for DoRA, whose change depends on W, only approximately).
    """
    check_lora_matches(weights, model)
    modules = dict(model.named_modules())
    for name, adapter in weights.items():
        weight = modules[name].weight
        base = weight.float()
        weight.copy_((base + scale * adapter.delta(base)).to(weight.dtype))


class UnfusedLora:
    """Adapters applied through forward hooks: y = layer(x) + scale * delta(W) x.

    Base weights stay untouched, so ``scale`` can be changed between runs and :meth:`remove`
    restores the model exactly, without reloading it. Slower per step than fusing: LoRA and DoRA
    layers add their low-rank product (DoRA also rescales the base output per row, a gain computed
    once from W), LoHa and LoKr layers rebuild their weight change at each call. Also a context
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
        for name, adapter in weights.items():
            layer = modules[name]
            hook = self._low_rank_hook(layer, adapter, device) if isinstance(adapter, LoraModule) \
                else self._dense_hook(layer, adapter, device)
            self._handles.append(layer.register_forward_hook(hook))

    def _low_rank_hook(self, layer: torch.nn.Linear, adapter: LoraModule, device: torch.device | None):
        """y + scale * ((g - 1) (y - b) + g * up (down x)), g the DoRA row gain (1 for a LoRA)."""
        weight = layer.weight
        target = dict(device=device or weight.device, dtype=weight.dtype)
        down, up = adapter.down.to(**target), (adapter.up.float() * adapter.scale).to(**target)
        gain = adapter.row_gain(weight.detach()).reshape(-1).to(**target) if isinstance(adapter, DoraModule) else None
        bias = None if layer.bias is None else layer.bias.detach().to(**target)

        def add_adapter(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            low_rank = torch.nn.functional.linear(torch.nn.functional.linear(inputs[0], down), up)
            if gain is None:
                return output + self.scale * low_rank
            base = output if bias is None else output - bias
            return output + self.scale * ((gain - 1) * base + gain * low_rank)
        return add_adapter

    def _dense_hook(self, layer: torch.nn.Linear, adapter: Adapter, device: torch.device | None):
        """y + scale * delta x, the delta rebuilt from the factors at each call (one layer's worth at a time)."""
        weight = layer.weight
        factors = type(adapter)(**{k: v.to(device or weight.device) for k, v in adapter.tensors().items()},
                                alpha=adapter.alpha)

        def add_adapter(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + self.scale * torch.nn.functional.linear(inputs[0], factors.delta().to(output.dtype))
        return add_adapter

    def remove(self) -> None:
        """Remove the hooks: the model computes exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> UnfusedLora:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
