"""fp8 base weights: the DiT blocks' linear weights kept as float8 (1 byte each), computed in the
activations' dtype one layer at a time.

This is the memory saving of DiffSynth's ``fp8_models`` (base weights stored as
``float8_e4m3fn``, cast to bf16 for each matmul), rebuilt because DiffSynth's version cannot train
a LoRA: its wrappers run every DiT block on a per-call copy, so the gradients of peft's LoRA layers
land on that copy and the LoRA parameters get none (``tests/test_fp8.py`` shows both). Two
differences, both deliberate: each output row has a float32 scale (its largest weight maps to
float8's largest value, so small weights keep their precision), and only the blocks' ``nn.Linear``
weights (> 98% of the 14B DiT) are stored in fp8; norms, biases, embeddings and the head stay in
the load dtype.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


class DecodedMatmul(torch.autograd.Function):
    """``x @ W.T`` with W decoded on the fly from its stored tensors by ``decode(*stored, dtype)``;
    backward decodes it again rather than keeping a full-precision copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, decode, *stored: torch.Tensor) -> torch.Tensor:
        ctx.decode = decode
        ctx.save_for_backward(*stored)
        return x @ decode(*stored, x.dtype).T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        stored = ctx.saved_tensors
        return (grad @ ctx.decode(*stored, grad.dtype), None) + (None,) * len(stored)


def dequantize(bits: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, fp8: torch.dtype = FP8) -> torch.Tensor:
    """The weight in ``dtype`` from its float8 bits (stored as uint8, read as ``fp8``) and scales
    (per output row, or one for the tensor)."""
    return bits.view(fp8).to(dtype) * scale.to(dtype)


class Fp8Linear(torch.nn.Linear):
    """A frozen ``nn.Linear`` whose weight lives as float8 bits plus a float32 scale per output row.

    ``weight`` still reads as the dequantized tensor (for code that inspects shapes or dtypes);
    writing to it is not possible, so LoRAs must be applied unfused.
    """

    weight_bits: torch.nn.Parameter
    weight_scale: torch.nn.Parameter
    fp8_dtype: torch.dtype = FP8  # how the bits read (a ComfyUI file may hold float8_e5m2)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._decode(self.weight_bits, self.weight_scale, self.compute_dtype)

    def _decode(self, bits: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(bits, scale, dtype, self.fp8_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = DecodedMatmul.apply(x, self._decode, self.weight_bits, self.weight_scale)
        return out + self.bias.to(x.dtype) if self.bias is not None else out


def quantize_(linear: torch.nn.Linear) -> Fp8Linear:
    """Turn ``linear`` into an :class:`Fp8Linear` in place (its full-precision weight is released)."""
    weight = linear.weight.detach().float()
    scale = (weight.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return adopt_fp8(linear, (weight / scale).to(FP8), scale)


def adopt_fp8(linear: torch.nn.Linear, weight: torch.Tensor, scale: torch.Tensor | None) -> Fp8Linear:
    """Turn ``linear`` into an :class:`Fp8Linear` holding the float8 ``weight`` and its float32
    ``scale`` (None: 1) in place; its own weight, if any, is released."""
    linear._parameters.pop("weight", None)
    linear.__class__ = Fp8Linear
    if weight.dtype != FP8:
        linear.fp8_dtype = weight.dtype
    scale = torch.ones(1) if scale is None else scale.float()
    linear.register_parameter("weight_bits", torch.nn.Parameter(weight.view(torch.uint8), requires_grad=False))
    linear.register_parameter("weight_scale", torch.nn.Parameter(scale, requires_grad=False))
    return linear  # type: ignore[return-value]


def store_blocks_in_fp8(dit: torch.nn.Module) -> None:
    """Quantize every ``nn.Linear`` inside ``dit.blocks``."""
    for module in dit.blocks.modules():
        if type(module) is torch.nn.Linear:
            quantize_(module)


def uses_fp8(model: torch.nn.Module) -> bool:
    """True if any layer of ``model`` holds fp8 weights."""
    return any(isinstance(m, Fp8Linear) for m in model.modules())
