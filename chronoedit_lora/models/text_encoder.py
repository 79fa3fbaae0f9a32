"""umT5-XXL text encoder as DiffSynth's ``WanTextEncoder``, from Wan's ``.pth`` or a transformers
``UMT5EncoderModel`` folder (ChronoEdit-14B-Diffusers ``text_encoder/``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffsynth.models.wan_video_text_encoder import WanTextEncoder

from ..errors import CheckpointError
from .loading import load_component

MODEL_NAME = "wan_video_text_encoder"
MODEL_CLASS = "diffsynth.models.wan_video_text_encoder.WanTextEncoder"

# transformers UMT5 name (after "encoder.block.N.") -> WanTextEncoder name (after "blocks.N.")
_BLOCK_RENAMES = {
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
}
_BLOCK_KEY = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def umt5_name_to_wan(name: str) -> str | None:
    """Map one transformers ``UMT5EncoderModel`` key to ``WanTextEncoder``'s (None: not needed)."""
    if name == "shared.weight":
        return "token_embedding.weight"
    if name == "encoder.final_layer_norm.weight":
        return "norm.weight"
    match = _BLOCK_KEY.match(name)
    if match and match.group(2) in _BLOCK_RENAMES:
        return f"blocks.{match.group(1)}.{_BLOCK_RENAMES[match.group(2)]}"
    return None  # encoder.embed_tokens.weight is a tied copy of shared.weight


def umt5_to_wan_text_encoder(state_dict: Mapping) -> dict:
    """State-dict converter (DiffSynth calls it with a lazy ``DiskMap``: iterate and index only)."""
    converted = {}
    for name in state_dict:
        target = umt5_name_to_wan(name)
        if target is not None:
            converted[target] = state_dict[name]
    return converted


def text_encoder_kwargs(shapes: dict[str, list[int]], config: dict, where: str) -> tuple[dict, str | None]:
    """``WanTextEncoder`` kwargs and converter (dotted path) from key shapes of either layout
    (everything is in the shapes; ``config`` is not needed)."""
    if "shared.weight" in shapes:
        shapes = {umt5_name_to_wan(k): v for k, v in shapes.items() if umt5_name_to_wan(k)}
        converter = f"{__name__}.umt5_to_wan_text_encoder"
    else:
        converter = None
    if "token_embedding.weight" not in shapes or "blocks.0.attn.q.weight" not in shapes:
        raise CheckpointError(f"{where} does not hold a umT5 text encoder (no token embedding / attention weights).")
    vocab, dim = shapes["token_embedding.weight"]
    num_layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    shared_pos = "pos_embedding.embedding.weight" in shapes
    buckets, heads = shapes["pos_embedding.embedding.weight" if shared_pos else "blocks.0.pos_embedding.embedding.weight"]
    return {
        "vocab": vocab, "dim": dim, "dim_attn": shapes["blocks.0.attn.q.weight"][0],
        "dim_ffn": shapes["blocks.0.ffn.fc1.weight"][0], "num_heads": heads, "num_layers": num_layers,
        "num_buckets": buckets, "shared_pos": shared_pos,
    }, converter


def load_text_encoder(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> WanTextEncoder:
    """Load the text encoder from a ``text_encoder/`` folder or a Wan ``.pth``/``.safetensors`` file."""
    return load_component(path, "text encoder", MODEL_NAME, MODEL_CLASS, text_encoder_kwargs, dtype, device)
