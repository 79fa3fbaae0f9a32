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


class _Fp8Matmul(torch.autograd.Function):
    """``x @ W.T`` with W dequantized on the fly; backward keeps the fp8 weight, not a bf16 copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(bits, scale)
        return x @ dequantize(bits, scale, x.dtype).T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        bits, scale = ctx.saved_tensors
        return grad @ dequantize(bits, scale, grad.dtype), None, None


def dequantize(bits: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype`` from its float8 bits (stored as uint8) and per-row scales."""
    return bits.view(FP8).to(dtype) * scale.to(dtype)


class Fp8Linear(torch.nn.Linear):
    """A frozen ``nn.Linear`` whose weight lives as float8 bits plus a float32 scale per output row.

    ``weight`` still reads as the dequantized tensor (for code that inspects shapes or dtypes);
    writing to it is not possible, so LoRAs must be applied unfused.
    """

    weight_bits: torch.nn.Parameter
    weight_scale: torch.nn.Parameter

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return dequantize(self.weight_bits, self.weight_scale, self.compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Fp8Matmul.apply(x, self.weight_bits, self.weight_scale)
        return out + self.bias.to(x.dtype) if self.bias is not None else out


def quantize_(linear: torch.nn.Linear) -> Fp8Linear:
    """Turn ``linear`` into an :class:`Fp8Linear` in place (its full-precision weight is released)."""
    weight = linear.weight.detach().float()
    scale = (weight.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    bits = (weight / scale).to(FP8).view(torch.uint8)
    del linear._parameters["weight"]
    linear.__class__ = Fp8Linear
    linear.register_parameter("weight_bits", torch.nn.Parameter(bits, requires_grad=False))
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
