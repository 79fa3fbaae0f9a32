"""ComfyUI's scaled fp8 safetensors (``*_fp8_scaled.safetensors``, ``*_fp8_e4m3fn_scaled``…):
float8 weights with a float32 scale per layer, in every form ComfyUI's loader accepts, and plain
(unscaled) float8 files. The real weight is ``weight.float() * scale``.

The rules, each from ComfyUI's source (docs/weights.md names the files and commits):

- **Legacy marker form**: a tensor named ``[prefix]scaled_fp8`` marks the file. Its dtype names the
  fp8 type (float32 means e4m3fn); two elements ask for full-precision matmuls. Each scaled linear
  layer has ``<layer>.scale_weight`` and optionally ``<layer>.scale_input`` (the activations' scale
  for fp8 matmuls; a weight's value does not depend on it). A float8 weight without
  ``scale_weight`` has scale 1.
- **Current form**: per layer a ``<layer>.comfy_quant`` uint8 tensor holding JSON
  (``{"format": "float8_e4m3fn"}``…) and ``<layer>.weight_scale`` (``<layer>.input_scale``
  optional), or the same per-layer JSON in the safetensors header's ``_quantization_metadata``
  (``{"layers": {layer: conf}}``), which then wins over the marker. Weights of an fp8 format may be
  stored as uint8 bytes; they are viewed as the format's fp8 type.
- A scale is applied with broadcasting (``weight * scale``): a single number per tensor or a
  column of one per output row.

Only the fp8 formats (``float8_e4m3fn``, ``float8_e5m2``) are decoded; a layer in another
``comfy_quant`` format (nvfp4, mxfp8, int8…) is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError

MARKER = "scaled_fp8"
QUANT_METADATA_KEY = "_quantization_metadata"
FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# per-layer tensors that are not model weights: legacy scales, current scales, the JSON config
AUX_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant")


def is_aux_key(key: str) -> bool:
    """Whether ``key`` is a quantization marker, scale or config rather than a model weight."""
    return key == MARKER or key.endswith("." + MARKER) or key.endswith(AUX_SUFFIXES)


def strip_aux(shapes: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """``shapes`` without the quantization markers, scales and configs (what the model holds)."""
    return {key: shape for key, shape in shapes.items() if not is_aux_key(key)}


@dataclass(frozen=True)
class Fp8Scheme:
    """How a file stores its float8 weights (read from key names, dtypes and the header)."""

    form: str  # "marker" (legacy scaled_fp8), "comfy_quant" (current), or "plain" (fp8 without scales)
    marker_dtype: torch.dtype | None = None  # what the legacy marker declares
    layer_formats: dict[str, str] = field(default_factory=dict)  # from _quantization_metadata, if any

    def describe(self, weight_dtype: torch.dtype | None) -> str:
        kind = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e5m2: "e5m2"}.get(weight_dtype, str(weight_dtype))
        return {"marker": f"ComfyUI scaled fp8 ({kind}, scaled_fp8 marker)",
                "comfy_quant": f"ComfyUI quantized ({kind}, comfy_quant)",
                "plain": f"fp8 {kind} (unscaled)"}[self.form]


def detect_scheme(dtypes: Mapping[str, torch.dtype], metadata: Mapping[str, str]) -> Fp8Scheme | None:
    """The file's fp8 scheme from its tensors' dtypes (by key) and header metadata; None when it
    holds no float8 weights and no quantization markers."""
    marker = next((key for key in dtypes if key == MARKER or key.endswith("." + MARKER)), None)
    if QUANT_METADATA_KEY in metadata:
        return Fp8Scheme("comfy_quant", layer_formats=_metadata_layers(metadata[QUANT_METADATA_KEY]))
    if any(key.endswith(".comfy_quant") for key in dtypes):
        return Fp8Scheme("comfy_quant")
    if marker is not None:
        declared = dtypes[marker]
        return Fp8Scheme("marker", marker_dtype=torch.float8_e4m3fn if declared == torch.float32 else declared)
    if any(dtype in FP8_DTYPES for dtype in dtypes.values()):
        return Fp8Scheme("plain")
    return None


def _metadata_layers(raw: str) -> dict[str, str]:
    try:
        layers = json.loads(raw)["layers"]
        return {layer: (conf["format"] if isinstance(conf, dict) else conf) for layer, conf in layers.items()}
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"the safetensors header's {QUANT_METADATA_KEY} is not ComfyUI's "
                              '{"layers": {layer: {"format": …}}}; re-download the file.') from None


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, name: str = "weight") -> torch.Tensor:
    """``weight.float() * scale`` in ``dtype`` (scale None: 1). The scale must broadcast onto the
    weight without changing its shape (one number, or one per output row)."""
    value = weight.float()
    if scale is not None:
        scale = scale.float()
        if scale.numel() != 1 and not _applies(scale.shape, weight.shape):
            raise CheckpointError(f"the scale of {name} has shape {list(scale.shape)}, which does not apply to a "
                                  f"weight of shape {list(weight.shape)}; the file is damaged or not ComfyUI's format.")
        value = value * (scale.reshape(()) if scale.numel() == 1 else scale)
    return value.to(dtype)


def _applies(scale: torch.Size, weight: torch.Size) -> bool:
    """Whether ``weight * scale`` broadcasts to the weight's own shape."""
    try:
        return torch.broadcast_shapes(scale, weight) == weight
    except RuntimeError:
        return False


def split_quantized(state: Mapping[str, torch.Tensor], scheme: Fp8Scheme
                    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """``(plain, quantized)``: the tensors that are not quantized (as stored), and each float8
    weight key -> (its fp8 tensor, its scale or None). Markers, configs and input scales are dropped."""
    formats = dict(scheme.layer_formats)
    for key in state:
        if key.endswith(".comfy_quant"):
            formats[key[: -len(".comfy_quant")]] = _layer_format(key, state[key])
    plain: dict[str, torch.Tensor] = {}
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for key, tensor in state.items():
        if is_aux_key(key):
            continue
        layer = key.removesuffix(".weight")
        fmt = formats.get(layer) if key.endswith(".weight") else None
        if fmt is not None and fmt not in FP8_FORMATS:
            raise CheckpointError(f"layer {layer} is quantized as {fmt!r}, which the kit cannot decode (it reads "
                                  f"ComfyUI's {' and '.join(FP8_FORMATS)}); use an fp8, fp16 or bf16 file.")
        if fmt is not None and tensor.dtype == torch.uint8:
            tensor = tensor.view(FP8_FORMATS[fmt])  # fp8 bytes stored as uint8, as ComfyUI accepts
        if tensor.dtype in FP8_DTYPES:
            scale = state.get(f"{layer}.weight_scale", state.get(f"{layer}.scale_weight"))
            quantized[key] = (tensor, scale)
        else:
            plain[key] = tensor
    return plain, quantized


def _layer_format(key: str, config: torch.Tensor) -> str:
    try:
        return json.loads(config.numpy().tobytes())["format"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{key} is not ComfyUI's JSON layer config; the file is damaged.") from None


def dequantize_state_dict(state: Mapping[str, torch.Tensor], scheme: Fp8Scheme,
                          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights with every float8 weight dequantized (``weight.float() * scale``) into
    ``dtype`` (bfloat16 when None); other floating-point tensors cast to ``dtype`` if given."""
    plain, quantized = split_quantized(state, scheme)
    out = {key: (t.to(dtype) if dtype is not None and t.is_floating_point() else t) for key, t in plain.items()}
    for key, (weight, scale) in quantized.items():
        out[key] = dequantize_weight(weight, scale, dtype or torch.bfloat16, key)
    return out
