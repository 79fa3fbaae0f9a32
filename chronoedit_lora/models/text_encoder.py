"""umT5-XXL text encoder as DiffSynth's ``WanTextEncoder`` (and its tokenizer), from Wan's
``models_t5_umt5-xxl-enc-bf16.pth`` or a transformers ``UMT5EncoderModel`` folder
(ChronoEdit-14B-Diffusers ``text_encoder/``).

UMT5 gives every layer its own relative-position bias, which is Wan's ``shared_pos=False``
layout (``blocks.N.pos_embedding``); every size is read from the weight shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder

from ..errors import CheckpointError
from .loading import check_config, convert_shapes, load_component, wrong_component

TEXT_LENGTH = 512  # umT5 context length ChronoEdit was trained with
MODEL_NAME = "wan_video_text_encoder"
MODEL_CLASS = "diffsynth.models.wan_video_text_encoder.WanTextEncoder"

# What WanTextEncoder hard-codes: tanh-GELU gate, T5LayerNorm eps, T5RelativeEmbedding max_dist.
SUPPORTED_CONFIG = {"feed_forward_proj": ("gated-gelu",), "layer_norm_epsilon": (1e-6,),
                    "relative_attention_max_distance": (128,)}

_TOP_RENAMES = {
    "shared.weight": "token_embedding.weight",
    "encoder.embed_tokens.weight": "token_embedding.weight",  # the same tensor, tied to shared.weight
    "encoder.final_layer_norm.weight": "norm.weight",
}
# transformers name after "encoder.block.N." -> WanTextEncoder name after "blocks.N."
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


def umt5_key_to_wan(name: str) -> str | None:
    """One transformers UMT5 key -> its ``WanTextEncoder`` key (None: not part of the encoder)."""
    if name in _TOP_RENAMES:
        return _TOP_RENAMES[name]
    match = _BLOCK_KEY.match(name)
    if match and match.group(2) in _BLOCK_RENAMES:
        return f"blocks.{match.group(1)}.{_BLOCK_RENAMES[match.group(2)]}"
    return None


def umt5_to_wan_text_encoder(state_dict: Mapping) -> dict:
    """transformers ``UMT5EncoderModel`` weights -> ``WanTextEncoder`` weights (renames only; any
    mapping that can be iterated and indexed, e.g. DiffSynth's lazy ``DiskMap``)."""
    return {target: state_dict[name] for name in state_dict if (target := umt5_key_to_wan(name))}


def wan_text_encoder_kwargs(shapes: Mapping[str, Sequence[int]]) -> dict:
    """``WanTextEncoder`` constructor kwargs from the shapes of its (Wan-layout) weights."""
    vocab, dim = shapes["token_embedding.weight"]
    shared_pos = "pos_embedding.embedding.weight" in shapes
    num_buckets, num_heads = shapes["pos_embedding.embedding.weight" if shared_pos
                                    else "blocks.0.pos_embedding.embedding.weight"]
    return {
        "vocab": vocab, "dim": dim, "dim_attn": shapes["blocks.0.attn.q.weight"][0],
        "dim_ffn": shapes["blocks.0.ffn.fc1.weight"][0], "num_heads": num_heads,
        "num_layers": len({name.split(".")[1] for name in shapes if name.startswith("blocks.")}),
        "num_buckets": num_buckets, "shared_pos": shared_pos,
    }


def text_encoder_spec(shapes: dict[str, list[int]], config: dict, where: str) -> tuple[dict, str | None]:
    """Kwargs and converter (dotted path; None for Wan's own layout) for either layout."""
    converter = None
    if any(name.startswith("encoder.block.") for name in shapes):
        check_config(config, SUPPORTED_CONFIG, where, "umT5 text encoder")
        shapes, converter = convert_shapes(umt5_to_wan_text_encoder, shapes), f"{__name__}.umt5_to_wan_text_encoder"
    try:
        return wan_text_encoder_kwargs(shapes), converter
    except KeyError:
        raise wrong_component(where, "a umT5 text encoder", "transformers UMT5EncoderModel weights "
                              "(text_encoder/) or Wan's models_t5_umt5-xxl-enc-bf16.pth", shapes) from None


def load_text_encoder(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                      device: str | torch.device = "cpu") -> WanTextEncoder:
    """The text encoder from a ``text_encoder/`` folder or a Wan ``.pth``/``.safetensors`` file."""
    return load_component(path, "text encoder", MODEL_NAME, MODEL_CLASS, text_encoder_spec, dtype, device)


def load_tokenizer(path: Path) -> HuggingfaceTokenizer:
    """The umT5 tokenizer from a local folder (never downloaded), padding to 512 tokens."""
    if not path.is_dir():
        raise CheckpointError(f"tokenizer {path}: expected a folder with tokenizer files.")
    try:
        return HuggingfaceTokenizer(name=str(path), seq_len=TEXT_LENGTH, clean="whitespace", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"tokenizer {path}: cannot load ({exc}).") from None
