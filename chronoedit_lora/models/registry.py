"""ChronoEdit entries in DiffSynth's model registry (``diffsynth.configs.model_configs.MODEL_CONFIGS``).

DiffSynth picks a model class, its kwargs and a key converter by the md5 of a file's
"key:shape" strings. It knows the original-format Wan2.1-I2V-14B DiT but not the
diffusers-format ChronoEdit transformer, nor prefixed single-file repacks (ComfyUI). Importing
this module registers those once; :func:`ensure_dit_entry` adds entries for any other checkpoint
(e.g. the kit's tiny ones) from kwargs inferred from its shapes.
"""

from __future__ import annotations

import hashlib

from diffsynth.configs.model_configs import MODEL_CONFIGS
from diffsynth.core.loader.file import convert_keys_dict_to_single_str

WAN_DIT_CLASS = "diffsynth.models.wan_video_dit.WanModel"
DIT_MODEL_NAME = "wan_video_dit"  # the name DiffSynth's Wan pipeline fetches the DiT by

CHRONOEDIT_14B_KWARGS = {
    "has_image_input": True, "patch_size": [1, 2, 2], "in_dim": 36, "dim": 5120,
    "ffn_dim": 13824, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 40,
    "num_layers": 40, "eps": 1e-6,
}

_CONVERTERS = {
    ("diffusers", ""): "diffsynth.utils.state_dict_converters.wan_video_dit.WanVideoDiTFromDiffusers",
    ("wan", ""): "diffsynth.utils.state_dict_converters.wan_video_dit.WanVideoDiTStateDictConverter",
    ("wan", "model."): "diffsynth.utils.state_dict_converters.wan_video_dit.WanVideoDiTStateDictConverter",
    ("wan", "model.diffusion_model."): "chronoedit_lora.models.key_prefixes.strip_model_diffusion_model",
    ("wan", "diffusion_model."): "chronoedit_lora.models.key_prefixes.strip_diffusion_model",
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


def hash_shapes(shapes: dict[str, list[int]]) -> str:
    """DiffSynth's model hash of a ``{key: shape}`` mapping (same as ``hash_model_file``)."""
    return hashlib.md5(convert_keys_dict_to_single_str(shapes).encode("utf-8")).hexdigest()


def ensure_entry(model_hash: str, model_name: str, model_class: str, kwargs: dict, converter: str | None) -> dict:
    """Return the registry entry for (hash, name, class), adding it if DiffSynth has none.

    Idempotent, so re-imports and every accelerate/torchrun worker see exactly one entry.
    """
    for entry in MODEL_CONFIGS:
        if (entry["model_hash"], entry["model_name"], entry["model_class"]) == (model_hash, model_name, model_class):
            registered = entry.get("extra_kwargs") or {}  # {}: DiffSynth relies on the class defaults
            if registered and registered != kwargs:
                raise ValueError(
                    f"DiffSynth's registry entry for {model_name} hash {model_hash} has kwargs "
                    f"{entry.get('extra_kwargs')}, but the checkpoint's shapes say {kwargs}."
                )
            return entry
    entry = {"model_hash": model_hash, "model_name": model_name, "model_class": model_class,
             "extra_kwargs": dict(kwargs)}
    if converter:
        entry["state_dict_converter"] = converter
    MODEL_CONFIGS.append(entry)
    return entry


def ensure_dit_entry(model_hash: str, fmt: str, prefix: str, kwargs: dict) -> dict:
    """The registry entry DiffSynth uses for a DiT of this hash and key format."""
    return ensure_entry(model_hash, DIT_MODEL_NAME, WAN_DIT_CLASS, kwargs, _CONVERTERS[(fmt, prefix)])


def register_known_checkpoints() -> None:
    """Register the released ChronoEdit-14B DiT layouts (idempotent)."""
    for model_hash, (fmt, prefix) in KNOWN_14B_DITS.items():
        ensure_dit_entry(model_hash, fmt, prefix, CHRONOEDIT_14B_KWARGS)
