"""A quantized DiT kept quantized: the blocks' linear weights of a GGUF or ComfyUI fp8 file stay in
their stored bytes and are dequantized one layer at a time, as the layer computes (forward and
backward), the way ``fp8_base`` holds its weights (:mod:`.fp8`). Everything else (norms, biases,
embeddings, the head, and any layer in a type not listed below) is dequantized at load, as
:mod:`.loading` reads it.

* GGUF: :class:`GGUFLinear` keeps the file's blocks (uint8) and decodes them with diffusers' torch
  dequantizers (``diffusers.quantizers.gguf.utils``), in float32, then casts to the activations'
  dtype. For every type in :data:`GGUF_TYPES` this equals the ``gguf`` package's reference
  dequantization exactly (``tests/test_quantized_dit.py``).
* ComfyUI scaled fp8 and plain fp8 (:mod:`.scaled_fp8` reads the forms): an :class:`.fp8.Fp8Linear`
  holding the file's float8 bits and its scale (one per tensor, or per row).

Adapters (LoRA, DoRA, LoHa, LoKr) sit on top through peft as on any ``nn.Linear``; the stored
weights are frozen, so gradients reach the adapter only.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch
from diffsynth.models.wan_video_dit import WanModel
from diffusers.quantizers.gguf.utils import dequantize_functions
from safetensors.torch import load_file

from .dit import DiTCheckpoint, ensure_dit_entry, linear_layers, wan_names
from .fp8 import DecodedMatmul, Fp8Linear, adopt_fp8
from .gguf import read_gguf
from .loading import fp8_scheme, load_registered
from .scaled_fp8 import dequantize_weight, split_quantized

# The GGUF types decoded per layer: those diffusers has torch dequantizers for (BF16 is plain).
GGUF_TYPES = frozenset(t for t in dequantize_functions if t != gguf.GGMLQuantizationType.BF16)


def dequantize_gguf(raw: torch.Tensor, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...],
                    dtype: torch.dtype) -> torch.Tensor:
    """A GGUF tensor's values in ``dtype`` from its stored blocks (uint8), by diffusers' torch
    dequantizer for ``qtype``, computed in float32."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    return dequantize_functions[qtype](blocks, block_size, type_size, dtype=torch.float32).reshape(shape).to(dtype)


class GGUFLinear(torch.nn.Linear):
    """A frozen ``nn.Linear`` whose weight lives as GGUF blocks (``weight_raw``, uint8, one row of
    blocks per output row), decoded for each matmul. ``weight`` reads as the decoded tensor."""

    weight_raw: torch.nn.Parameter
    qtype: gguf.GGMLQuantizationType

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._decode(self.weight_raw, self.compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.bfloat16

    def _decode(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_gguf(raw, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = DecodedMatmul.apply(x, self._decode, self.weight_raw)
        return out + self.bias.to(x.dtype) if self.bias is not None else out


def adopt_gguf(linear: torch.nn.Linear, raw: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> GGUFLinear:
    """Turn ``linear`` (its weight not loaded) into a :class:`GGUFLinear` holding ``raw`` in place."""
    linear._parameters.pop("weight", None)
    linear.__class__ = GGUFLinear
    linear.qtype = qtype
    linear.register_parameter("weight_raw", torch.nn.Parameter(raw.reshape(linear.out_features, -1),
                                                               requires_grad=False))
    return linear  # type: ignore[return-value]


def stored_quantized(checkpoint: DiTCheckpoint) -> str | None:
    """``"gguf"`` or ``"fp8"`` when the DiT's files hold quantized weights (GGUF, ComfyUI scaled or
    plain fp8), from their headers; None for plain weights."""
    if any(path.suffix == ".gguf" for path in checkpoint.files):
        return "gguf"
    if any(path.suffix == ".safetensors" and fp8_scheme(path) is not None for path in checkpoint.files):
        return "fp8"
    return None


def load_quantized_dit(checkpoint: DiTCheckpoint, dtype: torch.dtype,
                       device: str | torch.device = "cpu") -> WanModel:
    """The DiT of a GGUF or fp8 checkpoint with its blocks' linear weights kept as stored (see the
    module docstring), everything else in ``dtype``; on ``device``."""
    names = wan_names(checkpoint)
    block_weights = {f"{name}.weight" for name in linear_layers(checkpoint) if name.startswith("blocks.")}
    state: dict[str, torch.Tensor] = {}
    kept: dict[str, tuple] = {}  # Wan name of a block linear's weight -> how to adopt its stored form
    for path in checkpoint.files:
        for key, value, stored in _read(path, dtype):
            if stored is not None and names.get(key) in block_weights:
                kept[names[key]] = stored
                value = torch.zeros((), dtype=dtype).expand(value)  # its shape, no memory: the layer adopts it below
            elif stored is not None:
                value = _dequantized(key, value, stored, dtype)
            state[key] = value
    entry = ensure_dit_entry(checkpoint.model_hash, checkpoint.format, checkpoint.key_prefix, checkpoint.kwargs)
    dit = load_registered(checkpoint.files, entry, dtype, "cpu", state_dict=state)
    modules = dict(dit.named_modules())
    for name, stored in kept.items():
        linear = modules[name.removesuffix(".weight")]
        if stored[0] == "gguf":
            adopt_gguf(linear, stored[1], stored[2])
        else:
            adopt_fp8(linear, stored[1], stored[2])
    return dit.to(device)


def _read(path: Path, dtype: torch.dtype):
    """``(key, tensor or shape, stored)`` per tensor of one file: ``stored`` describes a quantized
    weight (("gguf", blocks, type) or ("fp8", float8 weight, scale)) given by its shape; None: the
    tensor itself, in ``dtype`` if floating-point."""
    if path.suffix == ".gguf":
        for key, tensor in read_gguf(path)[0].items():
            if tensor.qtype in GGUF_TYPES:
                yield key, tensor.shape, ("gguf", tensor.raw(), tensor.qtype)
            else:
                stored = tensor.stored_dtype
                yield key, tensor.dequantize(dtype if stored.is_floating_point else stored), None
        return
    raw = load_file(str(path))
    scheme = fp8_scheme(path)
    plain, quantized = split_quantized(raw, scheme) if scheme is not None else (raw, {})
    for key, tensor in plain.items():
        yield key, tensor.to(dtype) if tensor.is_floating_point() else tensor, None
    for key, (weight, scale) in quantized.items():
        yield key, tuple(weight.shape), ("fp8", weight, scale)


def _dequantized(key: str, shape: tuple[int, ...], stored: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A quantized tensor outside the blocks' linears, dequantized at load."""
    kind, data, extra = stored
    return dequantize_gguf(data, extra, shape, dtype) if kind == "gguf" else dequantize_weight(data, extra, dtype, key)


def _stored(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a quantized layer keeps its weight in (none for any other module)."""
    if isinstance(module, GGUFLinear):
        return [module.weight_raw]
    if isinstance(module, Fp8Linear):
        return [module.weight_bits, module.weight_scale]
    return []


def quantized_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors holding quantized weights (GGUF blocks, float8 bits and their scales)."""
    return sum(t.numel() * t.element_size() for module in model.modules() for t in _stored(module))


def is_quantized(model: torch.nn.Module) -> bool:
    """True if any layer of ``model`` holds quantized weights (GGUF or fp8): LoRAs stay unfused on it."""
    return any(_stored(module) for module in model.modules())
