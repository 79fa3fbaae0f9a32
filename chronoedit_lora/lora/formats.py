"""LoRA key formats in the wild, read into and written from :class:`LoraWeights`.

| format | example key | alpha |
|---|---|---|
| comfyui (the kit's) | ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` (or lora_down/lora_up) | ``….alpha`` scalar |
| wan | ``blocks.0.self_attn.q.lora_A.weight`` | ``….alpha`` scalar, else rank |
| diffusers (PEFT) | ``transformer.blocks.0.attn1.to_q.lora_A.weight`` | header ``lora_adapter_metadata``, else rank |
| musubi | ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` | ``….alpha`` scalar |
| diffsynth | ``blocks.0.self_attn.q.lora_A.default.weight`` | none: DiffSynth adds B @ A as is, i.e. alpha = rank |

Formats that cannot carry alpha exactly (diffusers, diffsynth) are written with alpha / rank folded
into B, so every format round-trips to the same weight delta.
"""

from __future__ import annotations

import json
import re

import torch

from ..errors import CheckpointError
from .weights import LoraModule, LoraWeights

FORMATS = ("comfyui", "wan", "diffusers", "musubi", "diffsynth")

# Wan (DiffSynth) module name inside a block <-> diffusers module name inside a block.
WAN_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
DIFFUSERS_TO_WAN = {v: k for k, v in WAN_TO_DIFFUSERS.items()}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_MUSUBI = re.compile(r"^lora_unet_blocks_(\d+)_(self_attn|cross_attn|ffn)_(k_img|v_img|q|k|v|o|0|2)$")
_PEFT_PREFIXES = ("transformer.", "base_model.model.")


def detect_format(keys: list[str]) -> str:
    """Which of :data:`FORMATS` the keys are in."""
    if any(k.startswith("lora_unet_") for k in keys):
        return "musubi"
    if any(".default." in k for k in keys):
        return "diffsynth"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(k.startswith(_PEFT_PREFIXES) or ".attn1." in k or ".attn2." in k for k in keys):
        return "diffusers"
    return "wan"


def _module_name(key: str, fmt: str) -> tuple[str, str] | None:
    """(Wan module name, field) of one key; field is "down", "up" or "alpha"; None if not a LoRA key."""
    if fmt == "musubi":
        base, _, rest = key.partition(".")
        match = _MUSUBI.match(base)
        if not match:
            return None
        block, group, leaf = match.groups()
        module = f"blocks.{block}.{group}.{leaf}"
    else:
        rest_key = key
        if fmt == "comfyui":
            rest_key = key.removeprefix("diffusion_model.")
        for prefix in _PEFT_PREFIXES:
            rest_key = rest_key.removeprefix(prefix)
        rest_key = rest_key.replace(".default.", ".")
        match = re.match(r"^(.*)\.(lora_A|lora_B|lora_down|lora_up)\.weight$|^(.*)\.alpha$", rest_key)
        if not match:
            return None
        module = match.group(1) or match.group(3)
        rest = "alpha" if match.group(3) else match.group(2)
        if fmt == "diffusers":
            block = _BLOCK.match(module)
            if not block or block.group(2) not in DIFFUSERS_TO_WAN:
                return None
            module = f"blocks.{block.group(1)}.{DIFFUSERS_TO_WAN[block.group(2)]}"
    field = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
             "lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up", "alpha": "alpha"}.get(rest)
    return (module, field) if field else None


def _peft_alpha(metadata: dict[str, str]) -> float | None:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None
    for key in ("transformer.lora_alpha", "lora_alpha"):  # pipeline files prefix the component
        if key in config:
            return float(config[key])
    return None


def parse_state(state: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> tuple[LoraWeights, str]:
    """Read any supported format; unknown keys or half LoRA pairs are an error listing them."""
    fmt = detect_format(list(state))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        parsed = _module_name(key, fmt)
        if parsed is None:
            unknown.append(key)
            continue
        module, field = parsed
        parts.setdefault(module, {})[field] = tensor
    incomplete = sorted(m for m, p in parts.items() if "down" not in p or "up" not in p)
    if unknown or incomplete or not parts:
        raise CheckpointError(
            f"{source}: not a LoRA for ChronoEdit/Wan in a known format (read as {fmt}): "
            f"{len(unknown)} unrecognised key(s) {unknown[:5]}, {len(incomplete)} module(s) without both "
            f"A/down and B/up {incomplete[:5]}. Known formats: {', '.join(FORMATS)}.")
    default_alpha = _peft_alpha(metadata) if fmt == "diffusers" else None
    weights: LoraWeights = {}
    for module, p in sorted(parts.items()):
        rank = p["down"].shape[0]
        alpha = float(p["alpha"]) if "alpha" in p else (default_alpha if default_alpha is not None else float(rank))
        weights[module] = LoraModule(p["down"], p["up"], alpha)
    return weights, fmt


def format_state(weights: LoraWeights, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (and extra header metadata) of ``weights`` in ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    state: dict[str, torch.Tensor] = {}
    extra: dict[str, str] = {}
    for module, lora in sorted(weights.items()):
        down, up = lora.down.contiguous(), lora.up.contiguous()
        if fmt in ("diffusers", "diffsynth"):
            up = (up.float() * (lora.alpha / lora.rank)).to(up.dtype)  # alpha folded in: scale 1
        if fmt == "comfyui":
            base, names = f"diffusion_model.{module}", ("lora_A.weight", "lora_B.weight")
        elif fmt == "wan":
            base, names = module, ("lora_A.weight", "lora_B.weight")
        elif fmt == "diffsynth":
            base, names = module, ("lora_A.default.weight", "lora_B.default.weight")
        elif fmt == "musubi":
            base, names = "lora_unet_" + module.replace(".", "_"), ("lora_down.weight", "lora_up.weight")
        else:
            block = _BLOCK.match(module)
            if not block or block.group(2) not in WAN_TO_DIFFUSERS:
                raise CheckpointError(f"module {module} has no diffusers name; write another format.")
            base, names = f"transformer.blocks.{block.group(1)}.{WAN_TO_DIFFUSERS[block.group(2)]}", ("lora_A.weight", "lora_B.weight")
        state[f"{base}.{names[0]}"] = down
        state[f"{base}.{names[1]}"] = up
        if fmt in ("comfyui", "wan", "musubi"):
            state[f"{base}.alpha"] = torch.tensor(float(lora.alpha))
    if fmt == "diffusers" and weights:
        ranks = {lora.rank for lora in weights.values()}
        targets = sorted({WAN_TO_DIFFUSERS[_BLOCK.match(m).group(2)] for m in weights})
        config = {"r": max(ranks), "lora_alpha": max(ranks), "target_modules": targets}
        if len(ranks) > 1:
            config["rank_pattern"] = {f"transformer.blocks.{_BLOCK.match(m).group(1)}.{WAN_TO_DIFFUSERS[_BLOCK.match(m).group(2)]}": l.rank
                                      for m, l in weights.items()}
            config["alpha_pattern"] = dict(config["rank_pattern"])
        # diffusers' pipelines store the LoraConfig kwargs of each component under its prefix
        extra["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in config.items()})
    return state, extra
