"""GGUF files for the tests, written with the ``gguf`` package's own ``GGUFWriter``.

``gguf.quants.quantize`` implements Q8_0, Q4_0 and the other legacy types but raises
NotImplementedError for the K-quants, so :func:`quantize_q4_k` builds Q4_K blocks itself: per
256 weights, 8 sub-blocks of 32 with an asymmetric 4-bit code (value = d*sc*q - dmin*m), their
6-bit scales and mins packed as llama.cpp's ``get_scale_min_k4`` reads them, and finite fp16 super
scales ``d``/``dmin``. The blocks are only trusted because ``gguf.quants.dequantize`` (the
reference decoder) gives the weights back within Q4_K's rounding (tests/test_weight_formats.py).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Q4_K blocks (uint8, ``(rows, row_bytes)``) for float32 ``values`` whose rows are multiples of 256."""
    rows, cols = values.shape
    x = values.astype(np.float32).reshape(-1, 8, 32)  # blocks x sub-blocks x weights
    low = np.minimum(x.min(axis=2), 0.0)  # the code's zero sits at -m <= 0
    span = np.maximum(x.max(axis=2) - low, 1e-8)
    scale, mins = span / 15.0, -low
    d = (scale.max(axis=1) / 63.0).astype(np.float16)
    dmin = (mins.max(axis=1) / 63.0).astype(np.float16)
    d32 = np.maximum(d.astype(np.float32), np.float32(np.finfo(np.float16).tiny))
    dmin32 = np.maximum(dmin.astype(np.float32), np.float32(np.finfo(np.float16).tiny))
    d, dmin = d32.astype(np.float16), dmin32.astype(np.float16)
    sc = np.clip(np.rint(scale / d32[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.rint(mins / dmin32[:, None]), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * mn
    q = np.clip(np.rint((x + offset[..., None]) / step[..., None]), 0, 15).astype(np.uint8)
    packed = np.zeros((x.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(x.shape[0], 128)  # sub-blocks 2i (low), 2i+1 (high)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], axis=1)
    return blocks.reshape(rows, cols // 256 * 144)


def quantize(values: np.ndarray, qtype: Q) -> np.ndarray:
    """``values`` in ``qtype``: the gguf package's quantizer, or :func:`quantize_q4_k`."""
    return quantize_q4_k(values) if qtype == Q.Q4_K else gguf.quants.quantize(values, qtype)


def fits(shape: tuple[int, ...], qtype: Q) -> bool:
    """Whether a tensor of torch ``shape`` can be stored in ``qtype`` (rows a multiple of its block)."""
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return len(shape) == 2 and shape[1] % block == 0


def write_gguf(path: str | Path, state: dict[str, torch.Tensor], qtype: Q, metadata: dict[str, str] | None = None,
               quantized: callable = lambda key: True) -> Path:
    """Write ``state`` as a GGUF file: 2-D tensors chosen by ``quantized`` (all by default) whose rows fit ``qtype``'s
    blocks in ``qtype``, every other tensor as float32 (as community Wan GGUFs keep norms and biases);
    tensors of more than 4 dimensions flattened to 2, their shape in ``comfy.gguf.orig_shape.<key>``."""
    writer = gguf.GGUFWriter(str(path), "wan")
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for key, tensor in state.items():
        values = tensor.float().numpy()
        if values.ndim > 4:  # GGUF holds 4 dimensions: stored flattened, as ComfyUI-GGUF's converter does
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(values.shape))
            values = values.reshape(-1, values.shape[-1])
        if quantized(key) and fits(tuple(tensor.shape), qtype):
            writer.add_tensor(key, quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(key, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
