"""The ChronoEdit DiT as DiffSynth's ``WanModel``: format detection, sizes from shapes, registry
entries, loading.

Sizes are read from the checkpoint's tensor shapes (plus the head count, which shapes cannot
show), so the 14B files and the kit's tiny checkpoints take the same path: infer kwargs ->
register a ``MODEL_CONFIGS`` entry for the file's hash (if DiffSynth does not know it yet) ->
let DiffSynth's ``ModelPool`` build and fill the model (:mod:`.loading`).

DiffSynth knows the original-format Wan2.1-I2V-14B DiT, but not the diffusers-format ChronoEdit
transformer nor single-file repacks whose keys carry a ComfyUI prefix; importing
:mod:`chronoedit_lora.models` registers those (:func:`register_known_checkpoints`).
"""

from __future__ import annotations

import importlib
from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffsynth.models.wan_video_dit import WanModel

from ..errors import CheckpointError
from .loading import ensure_entry, hash_shapes, load_registered, read_config, read_shapes, resolve_weight_files

WAN_DIT_CLASS = "diffsynth.models.wan_video_dit.WanModel"
DIT_MODEL_NAME = "wan_video_dit"  # the name DiffSynth's Wan pipeline fetches the DiT by
CHRONOEDIT_14B_KWARGS = {
    "has_image_input": True, "patch_size": [1, 2, 2], "in_dim": 36, "dim": 5120,
    "ffn_dim": 13824, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 40,
    "num_layers": 40, "eps": 1e-6,
}
# Hashes of the released 14B layouts (checked in tests/test_registry.py against meta-device models).
KNOWN_14B_DITS = {
    # nvidia/ChronoEdit-14B-Diffusers transformer/ (diffusers keys)
    "e0e8b7e0ab5bbf15b88be20fdf9dfcbd": ("diffusers", ""),
    # an export that also carries attn2.norm_added_q (unused by the model, dropped by the converter)
    "7cf3a086b49216bded0728ce78d59687": ("diffusers", ""),
    # single-file repacks in original Wan key names with ComfyUI prefixes
    "93307774cfa7fbb08f81e5723c1ea549": ("wan", "model.diffusion_model."),
    "2dced1378c987faf105510a4346d817f": ("wan", "diffusion_model."),
    # (unprefixed original-format files hash to 6bfcfb3b342cb286ce886889d519a77e, which DiffSynth
    # already registers as Wan2.1-I2V-14B with the same class and kwargs.)
}
_DIFFSYNTH_CONVERTERS = "diffsynth.utils.state_dict_converters.wan_video_dit"
_CONVERTERS = {
    ("diffusers", ""): f"{_DIFFSYNTH_CONVERTERS}.WanVideoDiTFromDiffusers",
    ("wan", ""): f"{_DIFFSYNTH_CONVERTERS}.WanVideoDiTStateDictConverter",
    ("wan", "model."): f"{_DIFFSYNTH_CONVERTERS}.WanVideoDiTStateDictConverter",
    ("wan", "model.diffusion_model."): f"{__name__}.strip_model_diffusion_model",
    ("wan", "diffusion_model."): f"{__name__}.strip_diffusion_model",
}

WAN_HEAD_DIM = 128  # every released Wan2.1 / ChronoEdit DiT uses 128-wide heads
HEADS_METADATA_KEY = "num_attention_heads"
DEFAULT_TEMPORAL_SKIP_LEN = 8
MAX_ROPE_POSITIONS = 1024  # rows of WanModel's RoPE tables (DiffSynth builds them for 1024 positions)

# Key of one tensor that only the given format has, and its prefix-free name.
_FORMAT_PROBES = {
    "diffusers": "condition_embedder.time_proj.weight",
    "wan": "time_projection.1.weight",
}
_WAN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


@dataclass(frozen=True)
class DiTCheckpoint:
    """What the kit knows about one DiT checkpoint before loading it."""

    files: tuple[Path, ...]
    format: str  # "diffusers" or "wan"
    key_prefix: str  # prefix stripped from original-format keys ("" if none)
    kwargs: dict
    temporal_skip_len: int
    shapes: dict

    @property
    def model_hash(self) -> str:
        return hash_shapes(self.shapes)


def detect_format(shapes: dict[str, list[int]], where: str) -> tuple[str, str]:
    """Return ``(format, key_prefix)`` of a DiT state dict, or raise naming ``where``."""
    if _FORMAT_PROBES["diffusers"] in shapes:
        return "diffusers", ""
    for prefix in ("",) + _WAN_PREFIXES:
        if prefix + _FORMAT_PROBES["wan"] in shapes:
            return "wan", prefix
    from .identify import classify

    raise CheckpointError(f"{where} is not a ChronoEdit DiT: it looks like {classify(shapes)[1]}. "
                          "Pass the transformer weights.")


def infer_dit_kwargs(shapes: dict[str, list[int]], fmt: str, prefix: str, num_heads: int | None) -> dict:
    """``WanModel`` constructor kwargs from tensor shapes (diffusers or original key names)."""
    def shape(wan_key: str, diffusers_key: str) -> list[int]:
        return shapes[diffusers_key] if fmt == "diffusers" else shapes[prefix + wan_key]

    patch = shape("patch_embedding.weight", "patch_embedding.weight")
    dim, in_dim = patch[0], patch[1]
    block_key = "blocks.{}.self_attn.q.weight" if fmt == "wan" else "blocks.{}.attn1.to_q.weight"
    num_layers = 0
    while (prefix + block_key.format(num_layers)) in shapes:
        num_layers += 1
    has_image_input = any(
        k.endswith(("img_emb.proj.1.weight", "image_embedder.ff.net.0.proj.weight")) for k in shapes
    )
    head_out = shape("head.head.weight", "proj_out.weight")[0]
    patch_size = [patch[2], patch[3], patch[4]]
    heads = num_heads or dim // WAN_HEAD_DIM
    if heads < 1 or dim % heads:
        raise CheckpointError(f"Cannot split DiT width {dim} into {heads} attention heads.")
    return {
        "has_image_input": has_image_input,
        "patch_size": patch_size,
        "in_dim": in_dim,
        "dim": dim,
        "ffn_dim": shape("blocks.0.ffn.0.weight", "blocks.0.ffn.net.0.proj.weight")[0],
        "freq_dim": shape("time_embedding.0.weight", "condition_embedder.time_embedder.linear_1.weight")[1],
        "text_dim": shape("text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight")[1],
        "out_dim": head_out // (patch_size[0] * patch_size[1] * patch_size[2]),
        "num_heads": heads,
        "num_layers": num_layers,
        "eps": 1e-6,
    }


def inspect_dit(
    source: str | Path | Sequence[str | Path], num_heads: int | None = None
) -> DiTCheckpoint:
    """Resolve the files of a DiT and read everything needed to load it (headers only)."""
    files = resolve_weight_files(source, "DiT")
    if any(f.suffix not in (".safetensors", ".gguf") for f in files):
        raise CheckpointError(f"{files[0]}: the DiT must be .safetensors (diffusers shards or one original-format "
                              "file) or .gguf.")
    shapes, metadata = read_shapes(files)
    where = str(files[0].parent if len(files) > 1 else files[0])
    fmt, prefix = detect_format(shapes, where)
    config = read_config(files[0].parent) if fmt == "diffusers" else {}
    # each number a config or a header gives is checked where it comes from, naming the file and key
    config_file = files[0].parent / "config.json"
    settings = ChainMap({k: (v, config_file) for k, v in config.items()},
                        {k: (v, files[0]) for k, v in metadata.items()})
    dim = infer_dit_kwargs(shapes, fmt, prefix, 1)["dim"]
    heads = num_heads or _setting(settings, HEADS_METADATA_KEY, 1, dim, lambda h: dim % h == 0 and dim // h % 2 == 0,
                                  f"divides the DiT width {dim} (read from the weights) into heads of even width")
    kwargs = infer_dit_kwargs(shapes, fmt, prefix, heads)
    if not kwargs["has_image_input"] or kwargs["in_dim"] != 36:
        from .identify import classify

        raise CheckpointError(f"{where} is not a ChronoEdit DiT: it looks like {classify(shapes)[1]}.")
    skip = _setting(settings, "rope_temporal_skip_len", 2, MAX_ROPE_POSITIONS) or DEFAULT_TEMPORAL_SKIP_LEN
    return DiTCheckpoint(
        files=tuple(files),
        format=fmt,
        key_prefix=prefix,
        kwargs=kwargs,
        temporal_skip_len=skip,
        shapes=shapes,
    )


def load_dit(
    source: str | Path | Sequence[str | Path] | DiTCheckpoint,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    num_heads: int | None = None,
) -> tuple[WanModel, DiTCheckpoint]:
    """Load a ChronoEdit DiT as DiffSynth ``WanModel`` (weights in ``dtype`` on ``device``)."""
    ckpt = source if isinstance(source, DiTCheckpoint) else inspect_dit(source, num_heads)
    entry = ensure_dit_entry(ckpt.model_hash, ckpt.format, ckpt.key_prefix, ckpt.kwargs)
    return load_registered(ckpt.files, entry, dtype, device), ckpt


def _setting(settings: Mapping[str, tuple[object, Path]], key: str, low: int, high: int,
             valid: Callable[[int], bool] = lambda value: True, rule: str = "") -> int | None:
    """A whole-number setting of the DiT from its config.json or its header (None if absent), or a
    :class:`CheckpointError` naming the file, the key and the allowed values."""
    if key not in settings or settings[key][0] is None:
        return None
    raw, source = settings[key]
    try:
        value = int(raw) if isinstance(raw, str) else raw
    except ValueError:
        value = None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high or not valid(value):
        raise CheckpointError(f"{source}: {key} {raw!r} is impossible for this DiT: it must be a whole number from "
                              f"{low} to {high}{' that ' + rule if rule else ''}. Repair the file (or re-download the model).")
    return value


def meta_dit(checkpoint: DiTCheckpoint) -> WanModel:
    """A weightless ``WanModel`` of the checkpoint's sizes, on the meta device (from headers alone):
    for checks against its layer names, and for DiffSynth units that only read its flags."""
    with torch.device("meta"):
        return WanModel(**checkpoint.kwargs)


def linear_layers(checkpoint: DiTCheckpoint, targets: list[str] | None = None) -> list[str]:
    """The DiT's linear layers (``blocks.0.self_attn.q``) from its headers, those ending in one of
    ``targets`` if given."""
    layers = [name for name, module in meta_dit(checkpoint).named_modules() if isinstance(module, torch.nn.Linear)]
    return [name for name in layers if not targets or any(name == t or name.endswith("." + t) for t in targets)]


def wan_names(checkpoint: DiTCheckpoint) -> dict[str, str]:
    """Each checkpoint key's DiffSynth/Wan parameter name (``attn1.to_q.weight`` -> ``self_attn.q.weight``),
    found by running the checkpoint's own key converter on the key names (it only renames); keys the
    model does not use are left out."""
    module, _, name = _CONVERTERS[(checkpoint.format, checkpoint.key_prefix)].rpartition(".")
    converter = getattr(importlib.import_module(module), name)
    return {key: wan for wan, key in converter({key: key for key in checkpoint.shapes}).items()}


def ensure_dit_entry(model_hash: str, fmt: str, prefix: str, kwargs: dict) -> dict:
    """The registry entry DiffSynth uses for a DiT of this hash and key format."""
    return ensure_entry(model_hash, DIT_MODEL_NAME, WAN_DIT_CLASS, kwargs, _CONVERTERS[(fmt, prefix)])


def register_known_checkpoints() -> None:
    """Register the released ChronoEdit-14B DiT layouts (idempotent)."""
    for model_hash, (fmt, prefix) in KNOWN_14B_DITS.items():
        ensure_dit_entry(model_hash, fmt, prefix, CHRONOEDIT_14B_KWARGS)


# State-dict converters for original-format files whose keys carry a ComfyUI prefix. DiffSynth
# calls converters with a lazy ``DiskMap`` (iterable, indexable), so these only rename.
def _strip(state_dict: Mapping, prefix: str) -> dict:
    return {name[len(prefix):]: state_dict[name] for name in state_dict if name.startswith(prefix)}


def strip_model_diffusion_model(state_dict: Mapping) -> dict:
    """``model.diffusion_model.blocks.0…`` -> ``blocks.0…`` (ComfyUI full-model saves)."""
    return _strip(state_dict, "model.diffusion_model.")


def strip_diffusion_model(state_dict: Mapping) -> dict:
    """``diffusion_model.blocks.0…`` -> ``blocks.0…`` (ComfyUI repackaged diffusion models)."""
    return _strip(state_dict, "diffusion_model.")


def compile_blocks(dit: WanModel) -> None:
    """Regional compilation: each DiT block compiled in place with ``torch.compile``. The blocks run
    the same code, so they share one compiled graph and compiling costs one block's time, not 40's.
    Outputs equal eager ones to float rounding (tests/test_compile.py)."""
    for block in dit.blocks:
        block.compile()
