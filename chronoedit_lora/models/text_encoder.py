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
from types import SimpleNamespace

import torch
from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder

from ..errors import CheckpointError
from .loading import check_config, convert_shapes, load_component, wrong_component

SPIECE_KEY = "spiece_model"  # ComfyUI's umT5 files: the SentencePiece model's bytes as a uint8 tensor
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


class _SentencePieceEncoder:
    """What DiffSynth's prompter calls on ``HuggingfaceTokenizer.tokenizer``, done by SentencePiece
    itself (the library ComfyUI tokenizes its umT5 files with): ids, then ``</s>``, truncated and
    padded to ``max_length`` with the model's pad id."""

    def __init__(self, model: bytes):
        import sentencepiece

        self.model = sentencepiece.SentencePieceProcessor(model_proto=model)
        self.vocab_size = self.model.get_piece_size()

    def __call__(self, sequences: list[str], max_length: int | None = None, add_special_tokens: bool = True,
                 **_: object) -> SimpleNamespace:
        eos = [self.model.eos_id()] if add_special_tokens and self.model.eos_id() >= 0 else []
        rows = [self.model.encode(text) for text in sequences]
        length = max_length or max(len(r) + len(eos) for r in rows)
        rows = [row[: length - len(eos)] + eos for row in rows]
        pad = max(self.model.pad_id(), 0)
        ids = torch.tensor([row + [pad] * (length - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


class SentencePieceTokenizer(HuggingfaceTokenizer):
    """DiffSynth's tokenizer interface over SentencePiece model bytes (ComfyUI's ``spiece_model``)."""

    def __init__(self, model: bytes, name: str, seq_len: int = TEXT_LENGTH):
        self.name, self.seq_len, self.clean = name, seq_len, "whitespace"
        self.tokenizer = _SentencePieceEncoder(model)
        self.vocab_size = self.tokenizer.vocab_size


def embedded_tokenizer(path: Path) -> SentencePieceTokenizer:
    """The tokenizer a ComfyUI text-encoder file carries as its ``spiece_model`` tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            model = f.get_tensor(SPIECE_KEY).numpy().tobytes()
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"tokenizer {path}: no readable {SPIECE_KEY} tensor ({exc}).") from None
    try:
        return SentencePieceTokenizer(model, str(path))
    except RuntimeError as exc:  # sentencepiece's error for bytes that are no model
        raise CheckpointError(f"tokenizer {path}: its {SPIECE_KEY} is not a SentencePiece model ({exc}).") from None


def load_tokenizer(path: Path) -> HuggingfaceTokenizer:
    """The umT5 tokenizer from a local folder (never downloaded), or from the ``spiece_model`` inside a
    ComfyUI text-encoder file; padding to 512 tokens."""
    if path.is_file() and path.suffix == ".safetensors":
        return embedded_tokenizer(path)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer {path}: expected a folder with tokenizer files, or a ComfyUI text-encoder "
                              f"file with an embedded {SPIECE_KEY}.")
    try:
        return HuggingfaceTokenizer(name=str(path), seq_len=TEXT_LENGTH, clean="whitespace", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"tokenizer {path}: cannot load ({exc}).") from None
