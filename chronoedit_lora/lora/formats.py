"""LoRA key formats in the wild, read into and written from :class:`LoraWeights`.

| format | example key | alpha |
|---|---|---|
| comfyui (the kit's) | ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` (or lora_down/lora_up) | ``….alpha`` scalar |
| wan | ``blocks.0.self_attn.q.lora_A.weight`` (or lora_down/lora_up) | ``….alpha`` scalar |
| diffusers (PEFT) | ``transformer.blocks.0.attn1.to_q.lora_A.weight`` | header ``lora_adapter_metadata`` |
| musubi | ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` | ``….alpha`` scalar |
| diffsynth | ``blocks.0.self_attn.q.lora_A.default.weight`` | none |

Reading: alpha comes from the ``.alpha`` keys, else (diffusers) from the PEFT header, else it is the
rank, which is what diffusers, ComfyUI and DiffSynth all assume for a LoRA without alpha. Free-form
metadata (such as the kit's own ``alpha`` entry) is informational and never changes the delta, so a
file means the same here as in every other loader.

Writing: comfyui, wan and musubi keep the factors as trained and write alpha per layer, except
comfyui/wan layers outside the blocks, whose ``.alpha`` keys diffusers' converter does not read (it
refuses the file): there alpha / rank is folded into B. diffusers and diffsynth always fold it into
B and so carry alpha = rank (DiffSynth's format cannot carry alpha; for diffusers this keeps the file
right even in loaders that ignore the header). Every format thus round-trips to the same delta.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from ..errors import CheckpointError, listing
from .names import MUSUBI_PREFIX, from_diffusers, from_musubi, in_blocks, to_diffusers, to_musubi
from .peft_metadata import COMPONENT, METADATA_KEY, read_alphas, write_metadata
from .weights import LoraModule, LoraWeights

FORMATS = ("comfyui", "wan", "diffusers", "musubi", "diffsynth")
_COMFY_PREFIX = "diffusion_model."
_PEFT_MODEL_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<stem>.+?)\.(?:(?P<part>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight|alpha)$")
_FIELD = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up", None: "alpha"}


def _is_diffusers(key: str) -> bool:
    match = _KEY.match(key)
    stem = match["stem"].removeprefix(_PEFT_MODEL_PREFIX) if match else ""
    return key.startswith(COMPONENT) or from_diffusers(stem) is not None


def detect_format(keys: Iterable[str]) -> str:
    """Which of :data:`FORMATS` the keys of a LoRA file are in."""
    keys = list(keys)
    if any(k.startswith(MUSUBI_PREFIX) for k in keys):
        return "musubi"
    if any(".default." in k for k in keys):
        return "diffsynth"
    if any(k.startswith(_COMFY_PREFIX) for k in keys):
        return "comfyui"
    if any(_is_diffusers(k) for k in keys):
        return "diffusers"
    return "wan"


def _module(stem: str, fmt: str) -> str | None:
    """The Wan module name a key stem refers to in ``fmt``; None if it is not one."""
    if fmt == "musubi":
        return from_musubi(stem)
    if fmt == "comfyui":
        return stem[len(_COMFY_PREFIX):] if stem.startswith(_COMFY_PREFIX) else None
    stem = stem.removeprefix(_PEFT_MODEL_PREFIX)
    if fmt == "diffusers":
        return from_diffusers(stem.removeprefix(COMPONENT))
    return stem


def parse_state(state: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> tuple[LoraWeights, str]:
    """Read a LoRA state dict in any of :data:`FORMATS`.

    Unknown keys, layers without both factors, factors that do not multiply and duplicate keys are an
    error listing them: never a partial load.
    """
    fmt = detect_format(state)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown, bad = [], []
    for key, tensor in state.items():
        match = _KEY.match(key)
        module = _module(match["stem"], fmt) if match else None
        if module is None:
            unknown.append(key)
            continue
        field = _FIELD[match["part"]]
        if field in parts.setdefault(module, {}):
            bad.append(f"{module}: two {field} tensors")
        parts[module][field] = tensor
    for module, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            bad.append(f"{module}: no {'A/down' if 'down' not in p else 'B/up'} tensor")
        elif p["down"].ndim != 2 or p["up"].ndim != 2 or p["up"].shape[1] != p["down"].shape[0]:
            bad.append(f"{module}: B {tuple(p['up'].shape)} @ A {tuple(p['down'].shape)} is not a linear-layer LoRA")
        elif "alpha" in p and p["alpha"].numel() != 1:
            bad.append(f"{module}: alpha of shape {tuple(p['alpha'].shape)}")
    if unknown or bad or not parts:
        problems = [listing("unrecognised key(s)", unknown), listing("bad layer(s)", bad)] if unknown or bad else ["no tensors"]
        raise CheckpointError(f"{source}: not a LoRA for ChronoEdit/Wan in a known format (read as {fmt}; known: "
                              f"{', '.join(FORMATS)}): " + "; ".join(problems))
    peft_alphas: dict[str, float] = {}
    if fmt == "diffusers":
        ranks = {to_diffusers(m): p["down"].shape[0] for m, p in parts.items() if "alpha" not in p}
        prefixed = any(k.startswith(COMPONENT) for k in state)
        peft_alphas = {from_diffusers(m): a for m, a in read_alphas(metadata, ranks, prefixed, source).items()}
    weights: LoraWeights = {}
    for module, p in sorted(parts.items()):
        alpha = float(p["alpha"]) if "alpha" in p else peft_alphas.get(module, float(p["down"].shape[0]))
        weights[module] = LoraModule(p["down"], p["up"], alpha)
    return weights, fmt


def _key_names(module: str, fmt: str) -> tuple[str, str, str]:
    """(key stem, A/down suffix, B/up suffix) of ``module`` in ``fmt``."""
    if fmt == "comfyui":
        return _COMFY_PREFIX + module, "lora_A.weight", "lora_B.weight"
    if fmt == "wan":
        return module, "lora_A.weight", "lora_B.weight"
    if fmt == "diffsynth":
        return module, "lora_A.default.weight", "lora_B.default.weight"
    if fmt == "musubi":
        name = to_musubi(module)
        if from_musubi(name) != module:
            raise CheckpointError(f"layer {module} has no musubi-tuner name; write another format.")
        return name, "lora_down.weight", "lora_up.weight"
    name = to_diffusers(module)
    if name is None:
        raise CheckpointError(f"layer {module} has no diffusers name; write another format.")
    return COMPONENT + name, "lora_A.weight", "lora_B.weight"


def keeps_alpha(module: str, fmt: str) -> bool:
    """Whether ``fmt`` stores ``module``'s alpha as trained (else alpha / rank is folded into B, alpha = rank)."""
    return fmt == "musubi" or (fmt in ("comfyui", "wan") and in_blocks(module))


def written_alphas(weights: LoraWeights, fmt: str) -> dict[str, float]:
    """The alpha each layer carries in a file of ``weights`` written in ``fmt`` (same delta either way)."""
    return {module: lora.alpha if keeps_alpha(module, fmt) else float(lora.rank) for module, lora in weights.items()}


def format_state(weights: LoraWeights, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (and header entries) of ``weights`` in ``fmt``; see the module docstring for alpha."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, lora in sorted(weights.items()):
        stem, down_key, up_key = _key_names(module, fmt)
        keep_alpha = keeps_alpha(module, fmt)
        state[f"{stem}.{down_key}"] = lora.down
        state[f"{stem}.{up_key}"] = lora.up if keep_alpha else (lora.up.float() * lora.scale).to(lora.up.dtype)
        if keep_alpha:
            state[f"{stem}.alpha"] = torch.tensor(float(lora.alpha))
        if fmt == "diffusers":
            ranks[stem[len(COMPONENT):]] = lora.rank
    return state, ({METADATA_KEY: write_metadata(ranks)} if ranks else {})
