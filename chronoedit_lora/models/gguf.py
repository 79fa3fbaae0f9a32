"""GGUF weight files (``.gguf``, e.g. QuantStack/ChronoEdit-14B-GGUF) read through the ``gguf``
package (llama.cpp's own Python reader): tensor names, shapes, quantization types, raw bytes, and
dequantization with ``gguf.quants.dequantize``, the reference implementation of every type it
supports (no decoder of our own).

GGUF stores dimensions innermost first (``[in, out]`` for a linear weight); :class:`GGUFTensor`
gives them in torch's order (``[out, in]``). Community Wan GGUFs keep Wan's original tensor names
(``blocks.0.self_attn.q.weight``), sometimes with a ComfyUI prefix; names are returned as stored,
shapes as ComfyUI-GGUF restores them (``comfy.gguf.orig_shape.<name>`` metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import CheckpointError

GGUF_MAGIC = b"GGUF"
# ComfyUI-GGUF's converter stores tensors it reshapes (more than 4 dimensions, rows not a multiple of
# the block) flattened, with the real shape under this key + the tensor's name (its loader's get_orig_shape)
ORIG_SHAPE = "comfy.gguf.orig_shape."
# Types stored as plain numbers: their bytes are the values.
_PLAIN = {
    gguf.GGMLQuantizationType.F32: torch.float32,
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.F64: torch.float64,
    gguf.GGMLQuantizationType.I8: torch.int8,
    gguf.GGMLQuantizationType.I16: torch.int16,
    gguf.GGMLQuantizationType.I32: torch.int32,
    gguf.GGMLQuantizationType.I64: torch.int64,
}


def dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the ``gguf`` package can turn ``qtype`` back into numbers."""
    return qtype in _PLAIN or qtype in gguf.quants._type_traits  # noqa: SLF001 - the package's own registry


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its name, torch-order shape, type and raw (memory-mapped) bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    data: np.ndarray  # as the reader gives it: values for plain types, block bytes for quantized ones

    @property
    def quantized(self) -> bool:
        return self.qtype not in _PLAIN and self.qtype != gguf.GGMLQuantizationType.BF16

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype its values have: the plain type's, bfloat16, or float32 for quantized types."""
        if self.qtype == gguf.GGMLQuantizationType.BF16:
            return torch.bfloat16
        return _PLAIN.get(self.qtype, torch.float32)

    def raw(self) -> torch.Tensor:
        """The stored bytes as a uint8 tensor (rows of blocks for quantized types), copied out of the
        file's read-only mapping."""
        return torch.from_numpy(np.array(self.data, order="C").view(np.uint8))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor's values in ``dtype`` and torch-order shape, decoded by ``gguf.quants``."""
        if self.qtype in _PLAIN:
            values = torch.from_numpy(np.array(self.data))
        elif dequantizable(self.qtype):
            values = torch.from_numpy(gguf.quants.dequantize(self.data, self.qtype))
        else:
            raise CheckpointError(f"GGUF tensor {self.name!r} is {self.qtype.name}, which the gguf package "
                                  f"{gguf_version()} cannot dequantize; use a file in another quantization.")
        return values.reshape(self.shape).to(dtype)


def gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` starts with GGUF's magic bytes."""
    try:
        with Path(path).open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf(path: str | Path) -> tuple[dict[str, GGUFTensor], dict[str, object]]:
    """``({name: GGUFTensor}, metadata)`` of a GGUF file, memory-mapped (no tensor data is read
    until used). A damaged file is a :class:`CheckpointError` naming it."""
    path = Path(path)
    if not is_gguf(path):
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF'); re-download it.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - the reader raises ValueError, struct.error, IndexError…
        raise CheckpointError(f"{path}: damaged or truncated GGUF file ({exc.__class__.__name__}: {exc}); "
                              "re-download it.") from None
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            metadata[name] = field.contents()
        except Exception:  # noqa: BLE001 - a field the reader cannot decode is left out
            continue
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        original = metadata.get(ORIG_SHAPE + t.name)
        if original is not None:  # stored reshaped; the real (torch-order) shape is in the metadata
            original = tuple(int(d) for d in original)
            if int(np.prod(original, dtype=np.int64)) != int(np.prod(shape, dtype=np.int64)):
                raise CheckpointError(f"{path}: {ORIG_SHAPE}{t.name} is {list(original)}, which does not hold the "
                                      f"tensor's {list(shape)}; the file is damaged.")
            shape = original
        tensors[t.name] = GGUFTensor(t.name, shape, gguf.GGMLQuantizationType(int(t.tensor_type)), t.data)
    return tensors, metadata


def gguf_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized: floating-point ones in ``dtype`` if given, else in
    their stored dtype (float32 for quantized types)."""
    state = {}
    for name, tensor in read_gguf(path)[0].items():
        stored = tensor.stored_dtype
        state[name] = tensor.dequantize(dtype if dtype is not None and stored.is_floating_point else stored)
    return state


def quantization_summary(tensors: dict[str, GGUFTensor]) -> str:
    """``"Q4_K 80%, F32 …"``-style description: the types by share of parameters, largest first."""
    counts: dict[str, int] = {}
    for t in tensors.values():
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + t.numel
    total = sum(counts.values()) or 1
    return ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
