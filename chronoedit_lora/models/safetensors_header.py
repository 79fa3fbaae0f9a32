"""Read and validate safetensors headers without loading tensor data.

safetensors' own errors for a damaged file are terse ("HeaderTooLarge", "invalid JSON"); we check
the header ourselves so the user learns which file is damaged and what to do about it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import CheckpointError

_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
    "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_entries(path: str | Path) -> tuple[int, dict[str, tuple[str, list[int], int, int]], dict[str, str]]:
    """``(data_start, {key: (dtype, shape, begin, end)}, metadata)`` of a complete safetensors file.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    size = path.stat().st_size
    fix = "re-download or re-export it"
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes); {fix}.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header; {fix}.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); {fix}.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header; {fix}.")
    metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - header_len
    entries: dict[str, tuple[str, list[int], int, int]] = {}
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
            itemsize = _DTYPE_BYTES.get(info["dtype"], 1)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt entry {key!r} in the header; {fix}.") from None
        numel = 1
        for d in shape:
            numel *= d
        if end > data_bytes or end - begin != numel * itemsize:
            raise CheckpointError(
                f"{path}: truncated or corrupt (tensor {key!r} lies outside the file's "
                f"{size} bytes); {fix}."
            )
        entries[key] = (info["dtype"], shape, begin, end)
    return 8 + header_len, entries, metadata


def read_header(path: str | Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """``({key: shape}, metadata)`` of a safetensors file, checking it is complete."""
    _, entries, metadata = read_entries(path)
    return {key: entry[1] for key, entry in entries.items()}, metadata
