"""Names of the DiT's linear layers: Wan/DiffSynth (canonical) <-> diffusers <-> musubi-tuner.

The tables cover every ``nn.Linear`` of Wan's DiT; the tests check them against DiffSynth's
``WanVideoDiTFromDiffusers`` key converter.
"""

from __future__ import annotations

import re

# Inside ``blocks.N.``: Wan name -> diffusers name.
WAN_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
# Outside the blocks.
WAN_TO_DIFFUSERS_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "head.head": "proj_out",
}
_DIFFUSERS_TO_WAN = {v: k for k, v in WAN_TO_DIFFUSERS.items()}
_DIFFUSERS_TO_WAN_TOP = {v: k for k, v in WAN_TO_DIFFUSERS_TOP.items()}
_MUSUBI_INNER = {k.replace(".", "_"): k for k in WAN_TO_DIFFUSERS}
_MUSUBI_TOP = {k.replace(".", "_"): k for k in WAN_TO_DIFFUSERS_TOP}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_MUSUBI_BLOCK = re.compile(r"^blocks_(\d+)_(.+)$")
MUSUBI_PREFIX = "lora_unet_"


def _map(module: str, inner: dict[str, str], top: dict[str, str]) -> str | None:
    block = _BLOCK.match(module)
    if block:
        name = inner.get(block.group(2))
        return f"blocks.{block.group(1)}.{name}" if name else None
    return top.get(module)


def to_diffusers(module: str) -> str | None:
    """``blocks.0.self_attn.q`` -> ``blocks.0.attn1.to_q``; None for a layer diffusers does not have."""
    return _map(module, WAN_TO_DIFFUSERS, WAN_TO_DIFFUSERS_TOP)


def from_diffusers(module: str) -> str | None:
    """``blocks.0.attn1.to_q`` -> ``blocks.0.self_attn.q``; None for an unknown name."""
    return _map(module, _DIFFUSERS_TO_WAN, _DIFFUSERS_TO_WAN_TOP)


def to_musubi(module: str) -> str:
    """``blocks.0.self_attn.q`` -> ``lora_unet_blocks_0_self_attn_q``."""
    return MUSUBI_PREFIX + module.replace(".", "_")


def from_musubi(name: str) -> str | None:
    """``lora_unet_blocks_0_self_attn_q`` -> ``blocks.0.self_attn.q``; None for an unknown name."""
    if not name.startswith(MUSUBI_PREFIX):
        return None
    rest = name[len(MUSUBI_PREFIX):]
    block = _MUSUBI_BLOCK.match(rest)
    if block:
        inner = _MUSUBI_INNER.get(block.group(2))
        return f"blocks.{block.group(1)}.{inner}" if inner else None
    return _MUSUBI_TOP.get(rest)


def is_dit_layer(module: str) -> bool:
    """Whether ``module`` (a Wan name) is a linear layer of Wan's DiT."""
    return to_diffusers(module) is not None


def in_blocks(module: str) -> bool:
    """Whether ``module`` is inside a transformer block (``blocks.N.…``)."""
    return _BLOCK.match(module) is not None
