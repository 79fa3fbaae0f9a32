"""Read weight files into tensors without a second copy in RAM.

DiffSynth's ``DiskMap`` keeps every shard memory-mapped while cloning each tensor, so a load
briefly holds about twice the weights (measured by ``bench/load_dit.py``). Here each safetensors
shard is read once into one buffer and its tensors are views of that buffer, which then become
the model's parameters (``assign=True``): the weights are in RAM once. A dtype conversion makes
one converted copy per tensor, and the shard's buffer is freed when its last view is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .safetensors_header import read_entries
from .weight_files import load_pth

_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_state_dict(files: Sequence[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of ``files``; floating-point ones in ``dtype`` (if given)."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        tensors = _read_safetensors(path) if path.suffix == ".safetensors" else load_pth(path)
        for key, tensor in tensors.items():
            if dtype is not None and isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            state[key] = tensor
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    data_start, entries, _ = read_entries(path)
    buffer = bytearray(path.stat().st_size)
    with path.open("rb", buffering=0) as f:
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            read = f.readinto(view[done:])
            if not read:
                break
            done += read
    tensors = {}
    for key, (dtype_name, shape, begin, end) in entries.items():
        dtype = _TORCH_DTYPES[dtype_name]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        tensors[key] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
    return tensors
