"""Adapter weights in one canonical form, keyed by DiffSynth/Wan module names (``blocks.3.self_attn.q``).

Every file format is read into and written from this form (:mod:`.formats`, :mod:`.io`), so the
rest of the kit never sees key names: ``{module: adapter}``, where the adapter is one of four types,
each holding its factors and alpha, with the meaning ComfyUI's loader gives the same keys:

| type | tensors | weight change of the layer (``delta``) |
|---|---|---|
| lora | down (r, in), up (out, r) | alpha / r * up @ down |
| dora | lora's, magnitude (out,) | magnitude / ‖W + L‖ * (W + L) - W, L the lora change, ‖·‖ per output row |
| loha | hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a, hada_w2_b | alpha / r * (w1_a @ w1_b) ⊙ (w2_a @ w2_b) |
| lokr | lokr_w1 (or lokr_w1_a @ lokr_w1_b), lokr_w2 (or lokr_w2_a @ lokr_w2_b) | kron(w1, w2), times alpha / r if a factor is split |

A file without alpha means alpha = rank (scale 1), as in diffusers, ComfyUI and DiffSynth.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

ADAPTER_TYPES = ("lora", "dora", "loha", "lokr")
ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


@dataclass
class AdapterModule:
    """One adapted linear layer; subclasses hold the tensors of one type."""

    kind: ClassVar[str]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors by field name (the split factors a LoKr does not use are absent)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on the product of the factors (each type holds ``alpha`` and ``rank``)."""
        return self.alpha / self.rank

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def problem(self) -> str | None:
        """Why the tensors do not make a linear layer's adapter (None if they do)."""
        if any(t.ndim != 2 for name, t in self.tensors().items() if name != "magnitude"):
            return f"{self.kind} factors {self._shapes()} are not matrices"
        return None

    def _shapes(self) -> str:
        return ", ".join(f"{name} {tuple(t.shape)}" for name, t in self.tensors().items())


@dataclass
class LoraModule(AdapterModule):
    """delta W = alpha / rank * up @ down."""

    kind: ClassVar[str] = "lora"
    down: torch.Tensor  # lora_A, (rank, in_features)
    up: torch.Tensor  # lora_B, (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        """Inner dimension of the factors."""
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the layer it adapts."""
        return self.up.shape[0], self.down.shape[1]

    def problem(self) -> str | None:
        if self.down.ndim != 2 or self.up.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
            return f"B {tuple(self.up.shape)} @ A {tuple(self.down.shape)} is not a linear-layer LoRA"
        return None

    def low_rank_delta(self) -> torch.Tensor:
        """alpha / rank * up @ down in float32."""
        return self.scale * (self.up.float() @ self.down.float())

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002 - same call for every type
        """The weight change in float32 (a LoRA's does not depend on the base weight)."""
        return self.low_rank_delta()

    def folded(self) -> LoraModule:
        """The same change with alpha / rank multiplied into ``up`` (alpha = rank)."""
        up = (self.up.float() * self.scale).to(self.up.dtype)
        return dataclasses.replace(self, up=up, alpha=float(self.rank))


@dataclass
class DoraModule(LoraModule):
    """DoRA (Liu et al. 2024): the LoRA-adapted weight's rows rescaled to the learned ``magnitude``."""

    kind: ClassVar[str] = "dora"
    magnitude: torch.Tensor | None = None  # (out_features,): the norm each output row of the adapted weight gets

    def problem(self) -> str | None:
        if self.magnitude is None or self.magnitude.numel() != self.up.shape[0]:
            shape = None if self.magnitude is None else tuple(self.magnitude.shape)
            return f"DoRA magnitude {shape} does not have one value per output row ({self.up.shape[0]})"
        return super().problem()

    def _adapted(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() + self.low_rank_delta().to(weight.device)

    def _gain(self, adapted: torch.Tensor) -> torch.Tensor:
        return self.magnitude.float().to(adapted.device).reshape(-1, 1) / adapted.norm(dim=1, keepdim=True)

    def row_gain(self, weight: torch.Tensor) -> torch.Tensor:
        """magnitude / ‖W + L‖ per output row (float32, shape (out, 1))."""
        return self._gain(self._adapted(weight))

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """gain * (W + L) - W: DoRA's change depends on the base weight it was trained on."""
        if weight is None:
            raise ValueError("a DoRA layer's weight change depends on the base weight: pass it")
        adapted = self._adapted(weight)
        return self._gain(adapted) * adapted - weight.float()


@dataclass
class LohaModule(AdapterModule):
    """LoHa (Hyeon-Woo et al. 2022): the Hadamard product of two low-rank products."""

    kind: ClassVar[str] = "loha"
    hada_w1_a: torch.Tensor  # (out_features, rank)
    hada_w1_b: torch.Tensor  # (rank, in_features)
    hada_w2_a: torch.Tensor  # (out_features, rank)
    hada_w2_b: torch.Tensor  # (rank, in_features)
    alpha: float

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.hada_w1_a.shape[0], self.hada_w1_b.shape[1]

    def problem(self) -> str | None:
        a1, b1, a2, b2 = self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b
        if super().problem() is None and a1.shape[1] == b1.shape[0] and a2.shape[1] == b2.shape[0] \
                and (a1.shape[0], b1.shape[1]) == (a2.shape[0], b2.shape[1]):
            return None
        return f"LoHa factors {self._shapes()} do not give two products of one shape"

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        """alpha / rank * (w1_a @ w1_b) ⊙ (w2_a @ w2_b) in float32."""
        first = self.hada_w1_a.float() @ self.hada_w1_b.float()
        return self.scale * first * (self.hada_w2_a.float() @ self.hada_w2_b.float())


@dataclass
class LokrModule(AdapterModule):
    """LoKr (Yeh et al. 2024): the Kronecker product of a small and a large factor, each whole or split
    in two low-rank factors. As in LyCORIS and ComfyUI, alpha / rank applies only when one is split."""

    kind: ClassVar[str] = "lokr"
    alpha: float
    lokr_w1: torch.Tensor | None = None  # (out_l, in_m)
    lokr_w1_a: torch.Tensor | None = None  # (out_l, rank)
    lokr_w1_b: torch.Tensor | None = None  # (rank, in_m)
    lokr_w2: torch.Tensor | None = None  # (out_k, in_n)
    lokr_w2_a: torch.Tensor | None = None  # (out_k, rank)
    lokr_w2_b: torch.Tensor | None = None  # (rank, in_n)

    @property
    def rank(self) -> int | None:
        """The split factors' inner dimension; None when both factors are whole."""
        split = self.lokr_w2_b if self.lokr_w2_b is not None else self.lokr_w1_b
        return None if split is None else split.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else self.alpha / self.rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2) in float32, multiplied out where split."""
        w1 = self.lokr_w1.float() if self.lokr_w1 is not None else self.lokr_w1_a.float() @ self.lokr_w1_b.float()
        w2 = self.lokr_w2.float() if self.lokr_w2 is not None else self.lokr_w2_a.float() @ self.lokr_w2_b.float()
        return w1, w2

    @property
    def shape(self) -> tuple[int, int]:
        w1, w2 = self.factors()
        return w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]

    def problem(self) -> str | None:
        for i in (1, 2):
            whole, a, b = (getattr(self, f"lokr_w{i}{part}") for part in ("", "_a", "_b"))
            if (whole is None) == (a is None) or (a is None) != (b is None):
                return f"a LoKr needs w{i} or both w{i}_a and w{i}_b, not {self._shapes()}"
        if super().problem() is not None:
            return super().problem()
        for i in (1, 2):
            a, b = getattr(self, f"lokr_w{i}_a"), getattr(self, f"lokr_w{i}_b")
            if a is not None and a.shape[1] != b.shape[0]:
                return f"LoKr w{i}_a {tuple(a.shape)} @ w{i}_b {tuple(b.shape)} do not multiply"
        return None

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        """scale * kron(w1, w2) in float32."""
        return self.scale * torch.kron(*self.factors())


Adapter = LoraModule | DoraModule | LohaModule | LokrModule
LoraWeights = dict[str, Adapter]


def build_adapter(fields: dict[str, torch.Tensor], alpha: float | None) -> Adapter | str:
    """The adapter the tensors (by field name) make, with ``alpha`` (None: the rank, scale 1);
    or why they make none."""
    names = set(fields)
    if names <= {"down", "up", "magnitude"}:
        cls = DoraModule if "magnitude" in names else LoraModule
        missing = [label for field, label in (("down", "A/down"), ("up", "B/up")) if field not in names]
        if missing:
            return f"no {missing[0]} tensor"
    elif names == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
        cls = LohaModule
    elif names and all(name.startswith("lokr_") for name in names):
        cls = LokrModule
    else:
        return f"tensors {', '.join(sorted(names))} are not one of the adapter types {', '.join(ADAPTER_TYPES)}"
    adapter = cls(**fields, alpha=1.0)
    problem = adapter.problem()
    if problem:
        return problem
    if alpha is not None:
        adapter.alpha = alpha
    elif adapter.rank is not None:
        adapter.alpha = float(adapter.rank)
    return adapter


def non_finite_layers(weights: LoraWeights) -> list[str]:
    """Sorted names of the layers whose tensors or alpha hold NaN or inf (a diverged or damaged adapter)."""
    return sorted(name for name, adapter in weights.items()
                  if not (math.isfinite(adapter.alpha) and all(torch.isfinite(t).all() for t in adapter.tensors().values())))


def adapter_kinds(weights: LoraWeights) -> list[str]:
    """The adapter types present, in :data:`ADAPTER_TYPES` order."""
    present = {adapter.kind for adapter in weights.values()}
    return [kind for kind in ADAPTER_TYPES if kind in present]


# peft's parameter names per field: ``<module>.<name>.<adapter>[.weight]``
PEFT_NAMES = {"down": "lora_A", "up": "lora_B", "magnitude": "lora_magnitude_vector",
              **{name: name for cls in (LohaModule, LokrModule) for name in
                 (f.name for f in dataclasses.fields(cls)) if name != "alpha"}}
_FIELDS = {peft: field for field, peft in PEFT_NAMES.items()}
_PEFT_PARAMETER = re.compile(rf"^(?P<module>.+)\.(?P<part>{'|'.join(_FIELDS)})\.[^.]+(?:\.weight)?$")


def is_adapter_parameter(name: str) -> bool:
    """Whether a peft-injected model's parameter ``name`` belongs to an adapter (any of the types)."""
    return _PEFT_PARAMETER.match(name) is not None


def _lokr_peft_scale(adapter: Adapter, alpha: float, rank: int) -> float:
    """peft scales a LoKr by alpha / r even when no factor is split, where the file's meaning is 1:
    the factor that moves into w1 between the two."""
    return alpha / rank if adapter.kind == "lokr" and adapter.rank is None else 1.0


def from_peft_parameters(named: dict[str, torch.Tensor], alpha: float, rank: int) -> LoraWeights:
    """Collect peft's adapter tensors of a model (one adapter, trained with ``alpha`` and ``rank``)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named.items():
        match = _PEFT_PARAMETER.match(name)
        if match:
            parts.setdefault(match["module"], {})[_FIELDS[match["part"]]] = tensor.detach()
    weights = {}
    for module, fields in sorted(parts.items()):
        adapter = build_adapter(fields, float(alpha))
        if isinstance(adapter, str):
            raise ValueError(f"{module}: {adapter}")
        fold = _lokr_peft_scale(adapter, alpha, rank)
        if fold != 1.0:
            adapter.lokr_w1 = adapter.lokr_w1 * fold
        weights[module] = adapter
    return weights


def to_peft_parameters(weights: LoraWeights, alpha: float, rank: int, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_peft_parameters`: peft parameter name -> tensor."""
    named = {}
    for module, adapter in weights.items():
        fold = _lokr_peft_scale(adapter, alpha, rank)
        for field, tensor in adapter.tensors().items():
            suffix = ".weight" if field in ("down", "up", "magnitude") else ""
            named[f"{module}.{PEFT_NAMES[field]}.{adapter_name}{suffix}"] = tensor / fold if field == "lokr_w1" else tensor
    return named
