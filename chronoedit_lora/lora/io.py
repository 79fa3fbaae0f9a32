"""Adapter files: read any supported format, write one atomically.

The kit writes ``comfyui`` by default. For a LoRA that is the layout diffusers'
``ChronoEditPipeline.load_lora_weights``, ComfyUI and DiffSynth all load as-is:
``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` plus a scalar
``diffusion_model.<module>.alpha`` (DiffSynth's own ``….lora_A.default.weight`` keys are ignored by
ComfyUI, nv-tlabs/ChronoEdit#22); DoRA, LoHa and LoKr layers get the keys ComfyUI reads for them
(see :mod:`.formats`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_path
from ..models.loading import read_header
from .formats import format_state, parse_state
from .peft_metadata import METADATA_KEY
from .weights import LoraWeights

DETECTED_FORMAT = "detected_format"


def load_lora(path: str | Path) -> tuple[LoraWeights, dict[str, str]]:
    """``(weights, metadata)`` of a LoRA file in any supported key format.

    The header is validated first, so a truncated or corrupt file is a :class:`CheckpointError`
    naming it. ``metadata`` is the file's header metadata plus ``detected_format``.
    """
    _, metadata = read_header(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc}); re-download or re-export it.") from None
    weights, fmt = parse_state(state, metadata, str(path))
    return weights, {**metadata, DETECTED_FORMAT: fmt}


def parse_lora_spec(value: str, flag: str = "--lora") -> tuple[Path, float]:
    """``PATH[:SCALE]`` (as ``--lora`` takes it) -> (path, scale); the LoRA file must exist.
    ``flag``: the option or setting named in errors.

    A path that itself holds a ``:`` is taken whole when no number follows its last ``:``.
    """
    path, scale = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            if Path(head).is_file() and not Path(value).is_file():
                raise CheckpointError(f"{flag} {value}: the scale {tail!r} is not a number; expected PATH[:SCALE], "
                                      f"e.g. {head}:0.8.") from None
    if not math.isfinite(scale):
        raise CheckpointError(f"{flag} {value}: the scale must be a finite number; expected PATH[:SCALE], e.g. {path}:0.8.")
    if not Path(path).is_file():
        raise CheckpointError(f"{flag} {path}: file not found.")
    return Path(path), scale


def _header_value(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors refuses shared storage)."""
    seen: set[int] = set()
    result = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        result[key] = tensor
    return result


def save_lora(weights: LoraWeights, path: str | Path, metadata: dict[str, object] | None = None,
              fmt: str = "comfyui") -> Path:
    """Write ``weights`` in ``fmt`` (one of :data:`FORMATS`) with ``metadata`` in the header.

    Non-string metadata values are stored as JSON. A ``lora_adapter_metadata`` entry is the format's
    own (diffusers reads it as the PEFT config), never the caller's. The write is atomic.
    """
    state, extra = format_state(weights, fmt)
    header = {k: _header_value(v) for k, v in (metadata or {}).items() if k not in (METADATA_KEY, DETECTED_FORMAT)}
    with atomic_path(path) as tmp:
        save_file(_own_storage(state), str(tmp), metadata={**header, **extra})
    return Path(path)
