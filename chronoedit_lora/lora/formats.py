"""Adapter key formats in the wild, read into and written from :class:`LoraWeights`.

| format | example key | alpha | types |
|---|---|---|---|
| comfyui (the kit's) | ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` (or lora_down/lora_up) | ``….alpha`` scalar | all |
| wan | ``blocks.0.self_attn.q.lora_A.weight`` (or lora_down/lora_up) | ``….alpha`` scalar | all |
| diffusers (PEFT) | ``transformer.blocks.0.attn1.to_q.lora_A.weight`` | header ``lora_adapter_metadata`` | lora, dora |
| musubi | ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` | ``….alpha`` scalar | all |
| diffsynth | ``blocks.0.self_attn.q.lora_A.default.weight`` | none | lora |

The other types use the LyCORIS names ComfyUI's loader reads (``comfy/weight_adapter/``) after the
same layer names: DoRA adds ``….dora_scale`` (out, 1) to the LoRA keys (diffusers/PEFT:
``….lora_magnitude_vector`` (out,) and ``use_dora`` in the header), LoHa is ``….hada_w1_a``,
``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, LoKr ``….lokr_w1`` (or ``lokr_w1_a``/``lokr_w1_b``) and
``….lokr_w2`` (or ``lokr_w2_a``/``lokr_w2_b``). diffusers loads PEFT LoRA and DoRA adapters only, and
DiffSynth's loader adds B @ A only, so writing a type there is refused (:func:`check_holds`).

Reading: alpha comes from the ``.alpha`` keys, else (diffusers) from the PEFT header, else it is the
rank, which is what diffusers, ComfyUI and DiffSynth all assume for a LoRA without alpha. Free-form
metadata (such as the kit's own ``alpha`` entry) is informational and never changes the delta, so a
file means the same here as in every other loader.

Writing: comfyui, wan and musubi keep the factors as trained and write alpha per layer, except
comfyui/wan LoRA layers outside the blocks, whose ``.alpha`` keys diffusers' converter does not read
(it refuses the file): there alpha / rank is folded into B. diffusers and diffsynth always fold it
into B and so carry alpha = rank (DiffSynth's format cannot carry alpha; for diffusers this keeps the
file right even in loaders that ignore the header). Every format thus round-trips to the same delta.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from ..errors import CheckpointError, listing
from .names import MUSUBI_PREFIX, from_diffusers, from_musubi, in_blocks, to_diffusers, to_musubi
from .peft_metadata import COMPONENT, METADATA_KEY, read_alphas, write_metadata
from .weights import ADAPTER_NAMES, ADAPTER_TYPES, PEFT_NAMES, Adapter, LoraModule, LoraWeights, adapter_kinds, build_adapter

FORMATS = ("comfyui", "wan", "diffusers", "musubi", "diffsynth")
# the adapter types each format can hold, and why not the others
HOLDS = {"comfyui": ADAPTER_TYPES, "wan": ADAPTER_TYPES, "musubi": ADAPTER_TYPES, "diffusers": ("lora", "dora"),
         "diffsynth": ("lora",)}
_WHY_NOT = {"diffusers": "diffusers' load_lora_weights builds PEFT LoRA/DoRA adapters only",
            "diffsynth": "DiffSynth's LoRA loader adds B @ A only"}
_COMFY_PREFIX = "diffusion_model."
_PEFT_MODEL_PREFIX = "base_model.model."
_LYCORIS_PARTS = [name for name in PEFT_NAMES.values() if name.startswith(("hada_", "lokr_"))]
_KEY = re.compile(r"^(?P<stem>.+?)\.(?:(?P<part>lora_A|lora_B|lora_down|lora_up|lora_magnitude_vector)(?:\.default)?\.weight"
                  rf"|(?P<bare>alpha|dora_scale|lora_magnitude_vector|{'|'.join(_LYCORIS_PARTS)}))$")
_FIELD = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up", "lora_magnitude_vector": "magnitude",
          "dora_scale": "magnitude", "alpha": "alpha", **{name: name for name in _LYCORIS_PARTS}}


def _is_diffusers(key: str) -> bool:
    match = _KEY.match(key)
    stem = match["stem"].removeprefix(_PEFT_MODEL_PREFIX) if match else ""
    return key.startswith(COMPONENT) or from_diffusers(stem) is not None


def detect_format(keys: Iterable[str]) -> str:
    """Which of :data:`FORMATS` the keys of an adapter file are in."""
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
    """Read an adapter state dict in any of :data:`FORMATS`.

    Unknown keys, layers with missing or mismatched tensors and duplicate keys are an error listing
    them: never a partial load.
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
        field = _FIELD[match["part"] or match["bare"]]
        if field in parts.setdefault(module, {}):
            bad.append(f"{module}: two {field} tensors")
        parts[module][field] = tensor.flatten() if field == "magnitude" else tensor
    for module, p in sorted(parts.items()):
        if "alpha" in p and p["alpha"].numel() != 1:
            bad.append(f"{module}: alpha of shape {tuple(p['alpha'].shape)}")
    if unknown or bad or not parts:
        _refuse(fmt, source, unknown, bad)
    peft_alphas: dict[str, float] = {}
    if fmt == "diffusers":
        ranks = {to_diffusers(m): p["down"].shape[0] for m, p in parts.items() if "alpha" not in p and "down" in p}
        prefixed = any(k.startswith(COMPONENT) for k in state)
        dora = any("magnitude" in p for p in parts.values())
        peft_alphas = {from_diffusers(m): a for m, a in read_alphas(metadata, ranks, prefixed, source, dora).items()}
    weights: LoraWeights = {}
    for module, p in sorted(parts.items()):
        alpha = p.pop("alpha", None)
        adapter = build_adapter(p, float(alpha) if alpha is not None else peft_alphas.get(module))
        if isinstance(adapter, str):
            bad.append(f"{module}: {adapter}")
        else:
            weights[module] = adapter
    if bad:
        _refuse(fmt, source, [], bad)
    return weights, fmt


def _refuse(fmt: str, source: str, unknown: list[str], bad: list[str]) -> None:
    problems = [listing("unrecognised key(s)", unknown), listing("bad layer(s)", bad)] if unknown or bad else ["no tensors"]
    raise CheckpointError(f"{source}: not an adapter for ChronoEdit/Wan in a known format (read as {fmt}; known: "
                          f"{', '.join(FORMATS)}): " + "; ".join(problems))


def check_holds(weights: LoraWeights, fmt: str) -> None:
    """Raise :class:`CheckpointError` if ``fmt`` cannot hold one of the adapter types in ``weights``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    refused = [kind for kind in adapter_kinds(weights) if kind not in HOLDS[fmt]]
    if refused:
        able = [f for f in FORMATS if all(kind in HOLDS[f] for kind in adapter_kinds(weights))]
        raise CheckpointError(f"the {fmt} format cannot hold {'/'.join(ADAPTER_NAMES[k] for k in refused)} layers "
                              f"({_WHY_NOT[fmt]}); write {', '.join(able)} instead.")
    if fmt == "diffusers" and "dora" in adapter_kinds(weights) and _padded_by_diffusers(weights):
        raise CheckpointError(
            "diffusers cannot load this DoRA: for an image-to-video adapter with cross_attn.k but without "
            "cross_attn.k_img/v_img layers it adds zero k_img/v_img layers, and no DoRA magnitudes for them "
            "(loading then fails). Train with k_img,v_img among the targets, or keep the comfyui format.")


def _padded_by_diffusers(weights: LoraWeights) -> bool:
    """Whether diffusers' Wan loader would add zero k_img/v_img layers to this adapter."""
    layers = {module.split(".", 2)[2] for module in weights if in_blocks(module)}
    return "cross_attn.k" in layers and not {"cross_attn.k_img", "cross_attn.v_img"} <= layers


def _stem(module: str, fmt: str) -> str:
    """``module``'s key stem in ``fmt``."""
    if fmt == "comfyui":
        return _COMFY_PREFIX + module
    if fmt in ("wan", "diffsynth"):
        return module
    if fmt == "musubi":
        name = to_musubi(module)
        if from_musubi(name) != module:
            raise CheckpointError(f"layer {module} has no musubi-tuner name; write another format.")
        return name
    name = to_diffusers(module)
    if name is None:
        raise CheckpointError(f"layer {module} has no diffusers name; write another format.")
    return COMPONENT + name


def _suffix(field: str, fmt: str) -> str:
    """The key suffix of an adapter field in ``fmt``."""
    if field in ("down", "up"):
        if fmt == "musubi":
            return {"down": "lora_down.weight", "up": "lora_up.weight"}[field]
        return f"{PEFT_NAMES[field]}{'.default' if fmt == 'diffsynth' else ''}.weight"
    if field == "magnitude":
        return "lora_magnitude_vector" if fmt == "diffusers" else "dora_scale"
    return field


def keeps_alpha(module: str, adapter: Adapter, fmt: str) -> bool:
    """Whether ``fmt`` stores ``module``'s alpha as trained (else alpha / rank is folded into B, alpha = rank)."""
    if not isinstance(adapter, LoraModule):
        return True
    return fmt == "musubi" or (fmt in ("comfyui", "wan") and in_blocks(module))


def _as_written(module: str, adapter: Adapter, fmt: str) -> Adapter:
    return adapter if keeps_alpha(module, adapter, fmt) else adapter.folded()


def written_alphas(weights: LoraWeights, fmt: str) -> dict[str, float]:
    """The alpha each layer carries in a file of ``weights`` written in ``fmt`` (same delta either way)."""
    return {module: _as_written(module, adapter, fmt).alpha for module, adapter in weights.items()}


def format_state(weights: LoraWeights, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (and header entries) of ``weights`` in ``fmt``; see the module docstring for alpha."""
    check_holds(weights, fmt)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, adapter in sorted(weights.items()):
        stem = _stem(module, fmt)
        written = _as_written(module, adapter, fmt)
        for field, tensor in written.tensors().items():
            magnitude_column = field == "magnitude" and fmt != "diffusers"  # LyCORIS' (out, 1) for output-row DoRA
            state[f"{stem}.{_suffix(field, fmt)}"] = tensor.reshape(-1, 1) if magnitude_column else tensor
        if keeps_alpha(module, adapter, fmt):
            state[f"{stem}.alpha"] = torch.tensor(float(written.alpha))
        if fmt == "diffusers":
            ranks[stem[len(COMPONENT):]] = written.rank
    dora = any(adapter.kind == "dora" for adapter in weights.values())
    return state, ({METADATA_KEY: write_metadata(ranks, dora)} if ranks else {})
