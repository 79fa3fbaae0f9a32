"""What a weights file is, from its keys and shapes alone (safetensors header, GGUF metadata, ``.pth``
memory-mapped with ``torch.load(weights_only=True)``), never from its name: a ChronoEdit DiT, a umT5
text encoder, a CLIP ViT-H vision tower, a Wan2.1 VAE, or something else said in one line
("a Wan2.1 T2V DiT: no image cross-attention", "a LoRA file", "not a weights file"…).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES

from ..errors import ChronoEditError
from .gguf import is_gguf, quantization_summary, read_gguf
from .loading import SAFETENSORS_DTYPES, load_pth, read_entries
from .scaled_fp8 import FP8_DTYPES, detect_scheme, is_aux_key
from .text_encoder import SPIECE_KEY

COMPONENTS = ("dit", "text_encoder", "image_encoder", "vae")
FILE_SUFFIXES = (".safetensors", ".sft", ".gguf", ".pth", ".pt", ".bin", ".ckpt")
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "")
_LORA = re.compile(r"(^|[._])(lora_[AB]|lora_up|lora_down|lora_unet|hada_w1|lokr_w1|dora_scale)([._]|$)")
CLIP_H_WIDTH = 1280


@dataclass(frozen=True)
class FileInfo:
    """One weights file: what it is (a component name or None), what it looks like, its format,
    stored dtype or quantization, parameter count and size on disk."""

    path: Path
    component: str | None
    looks_like: str  # "a ChronoEdit DiT", "a LoRA file", "not a weights file"…
    format: str = ""
    dtype: str = ""
    params: int = 0
    has_tokenizer: bool = False  # an embedded spiece_model
    least_bits: float = 0.0  # bits per weight of its least precise tensor type (fp16 16, fp8 8, Q4_K 4.5)

    @property
    def size(self) -> int:
        return self.path.stat().st_size



def read_keys(path: Path) -> tuple[dict[str, list[int]], str, str, int, float]:
    """``(shapes, format, dtype/quantization summary, parameter count, least bits per weight)`` of a
    weights file from its header; a :class:`ChronoEditError` when it is not one."""
    if path.suffix in (".safetensors", ".sft"):
        _, entries, metadata = read_entries(path)
        dtypes = {key: SAFETENSORS_DTYPES.get(entry[0]) for key, entry in entries.items()}
        shapes = {key: entry[1] for key, entry in entries.items()}
        scheme = detect_scheme(dtypes, metadata)
        weights = {k: d for k, d in dtypes.items() if not is_aux_key(k) and k != SPIECE_KEY}
        fp8 = next((d for d in weights.values() if d in FP8_DTYPES), None)
        fmt = scheme.describe(fp8) if scheme else "safetensors"
        return shapes, fmt, dtype_shares(weights, shapes), _count(shapes, weights), _least_bits(weights)
    if is_gguf(path):
        tensors, _ = read_gguf(path)
        shapes = {k: list(t.shape) for k, t in tensors.items()}
        least = min((8 * GGML_QUANT_SIZES[t.qtype][1] / GGML_QUANT_SIZES[t.qtype][0] for t in tensors.values()), default=0)
        return shapes, "GGUF", quantization_summary(tensors), sum(t.numel for t in tensors.values()), least
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        state = load_pth(path)
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        shapes = {k: list(v.shape) for k, v in tensors.items()}
        dtypes = {k: v.dtype for k, v in tensors.items()}
        return shapes, "PyTorch .pth", dtype_shares(dtypes, shapes), _count(shapes, dtypes), _least_bits(dtypes)
    raise ChronoEditError(f"{path}: not a weights file")


def _count(shapes: Mapping[str, list[int]], keys: Mapping) -> int:
    return sum(int(torch.Size(shapes[k]).numel()) for k in keys)


def _least_bits(dtypes: Mapping[str, torch.dtype]) -> float:
    return min((8 * d.itemsize for d in dtypes.values() if d is not None and d.is_floating_point), default=0)


def dtype_shares(dtypes: Mapping[str, torch.dtype], shapes: Mapping[str, list[int]]) -> str:
    """``"float8_e4m3fn 97%, float16 3%"``: the stored dtypes by share of parameters, largest first."""
    totals: dict[str, int] = {}
    for key, dtype in dtypes.items():
        name = str(dtype).removeprefix("torch.")
        totals[name] = totals.get(name, 0) + int(torch.Size(shapes[key]).numel())
    total = sum(totals.values()) or 1
    if len(totals) == 1:
        return next(iter(totals))
    return ", ".join(f"{n} {100 * c / total:.0f}%" for n, c in sorted(totals.items(), key=lambda kv: -kv[1]))


def identify(path: str | Path) -> FileInfo:
    """What ``path`` holds (headers only). Never raises for a bad file: it is "not a weights file"."""
    path = Path(path)
    try:
        shapes, fmt, dtype, params, least = read_keys(path)
    except (ChronoEditError, OSError):
        return FileInfo(path, None, "not a weights file (no safetensors, GGUF or PyTorch header)")
    component, looks_like = classify(shapes)
    return FileInfo(path, component, looks_like, fmt, dtype, params, SPIECE_KEY in shapes, least)


def _strip_prefix(shapes: Mapping[str, list[int]], probe: str) -> tuple[str, dict[str, list[int]]] | None:
    for prefix in DIT_PREFIXES:
        if prefix + probe in shapes:
            return prefix, {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    return None


def classify(shapes: Mapping[str, list[int]]) -> tuple[str | None, str]:
    """``(component or None, what it looks like)`` from key names and shapes."""
    keys = [k for k in shapes if not is_aux_key(k)]
    if not keys:
        return None, "an empty weights file"
    if any(_LORA.search(k) for k in keys):
        return None, "a LoRA file, not a model: pass it with --lora"
    wan = _strip_prefix(shapes, "time_projection.1.weight")
    if wan is not None or "condition_embedder.time_proj.weight" in shapes:
        return _classify_dit(wan[1] if wan else shapes, diffusers=wan is None)
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes or "blocks.0.attn.q.weight" in shapes:
        return _classify_t5(shapes)
    if any(k.removeprefix("vision_model.") == "embeddings.patch_embedding.weight" for k in shapes) \
            or "visual.patch_embedding.weight" in shapes:
        return _classify_clip(shapes)
    if "encoder.conv1.weight" in shapes and "decoder.conv1.weight" in shapes:
        return _classify_vae(shapes)
    if "encoder.conv_in.weight" in shapes and "decoder.conv_in.weight" in shapes:
        return None, "an image VAE in diffusers' names (ChronoEdit needs the Wan2.1 video VAE)"
    if any(k.startswith(("text_model.", "transformer.text_model.")) for k in shapes):
        return None, "a CLIP text encoder (ChronoEdit's text encoder is umT5-XXL)"
    return None, f"not a ChronoEdit component (first keys: {', '.join(sorted(keys)[:3])})"


def _classify_dit(shapes: Mapping[str, list[int]], diffusers: bool) -> tuple[str | None, str]:
    patch = shapes.get("patch_embedding.weight")
    image = any(k.startswith(("img_emb.", "condition_embedder.image_embedder.")) for k in shapes)
    in_dim = patch[1] if patch else None
    if not image:
        return None, f"a Wan2.1 T2V DiT: no image cross-attention (in_dim {in_dim}); ChronoEdit is the I2V architecture"
    if in_dim != 36:
        return None, f"a Wan DiT with image input but in_dim {in_dim} (ChronoEdit's is 36): not ChronoEdit/Wan2.1-I2V"
    return "dit", "a ChronoEdit / Wan2.1-I2V DiT" + (" in diffusers' names" if diffusers else "")


def _classify_t5(shapes: Mapping[str, list[int]]) -> tuple[str | None, str]:
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
        if "decoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
            return None, "a full T5/umT5 encoder-decoder; ChronoEdit needs the encoder alone"
        per_layer = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in shapes \
            or "encoder.block.1.layer.0.SelfAttention.q.weight" not in shapes
        if not per_layer:
            return None, "a T5 text encoder (position bias only in block 0, e.g. Flux's t5xxl), not umT5"
        return "text_encoder", "a umT5 text encoder (Hugging Face T5 names)"
    if "token_embedding.weight" not in shapes:
        return None, "not a ChronoEdit component (a transformer with blocks.N.attn.q but no token embedding)"
    return "text_encoder", "a umT5 text encoder (Wan's names)"


def _classify_clip(shapes: Mapping[str, list[int]]) -> tuple[str | None, str]:
    patch = next(v for k, v in shapes.items() if k.endswith("patch_embedding.weight"))
    if patch[0] != CLIP_H_WIDTH:
        return None, f"a CLIP vision model of width {patch[0]} (ChronoEdit needs ViT-H/14, width {CLIP_H_WIDTH})"
    return "image_encoder", "a CLIP ViT-H vision tower" + (" (open-clip names)" if "visual.patch_embedding.weight"
                                                           in shapes else " (Hugging Face names)")


def _classify_vae(shapes: Mapping[str, list[int]]) -> tuple[str | None, str]:
    z2 = shapes.get("conv1.weight", [0])[0]
    if z2 != 32:
        return None, f"a Wan VAE with {z2 // 2} latent channels (Wan2.2's has 48); ChronoEdit needs Wan2.1's 16"
    return "vae", "a Wan2.1 VAE"
