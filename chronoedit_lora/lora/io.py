"""LoRA files: read any supported format, write one atomically.

The kit writes ``comfyui`` by default, the layout diffusers' ``ChronoEditPipeline.load_lora_weights``,
ComfyUI and DiffSynth all load as-is: ``diffusion_model.<module>.lora_A.weight`` /
``.lora_B.weight`` plus a scalar ``diffusion_model.<module>.alpha`` (DiffSynth's own
``….lora_A.default.weight`` keys are ignored by ComfyUI, nv-tlabs/ChronoEdit#22).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..models.safetensors_header import read_header
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
    own (diffusers reads it as the PEFT config), never the caller's. The write is atomic: a temporary
    file in the same folder, flushed to disk, then renamed over ``path``.
    """
    state, extra = format_state(weights, fmt)
    header = {k: _header_value(v) for k, v in (metadata or {}).items() if k not in (METADATA_KEY, DETECTED_FORMAT)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(_own_storage(state), tmp, metadata={**header, **extra})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
