"""Two ops of DiffSynth's Wan DiT blocks with fewer temporaries, same results.

DiffSynth's ``RMSNorm`` (q/k norms) copies its input to float32 and squares that copy (two float32
tensors of the input's size); :class:`LeanRMSNorm` reduces the sum of squares in float32 without
materialising either. ``nn.GELU`` in the FFN writes a second tensor of the FFN's hidden width (the
largest of a block); without gradients :class:`InplaceGELU` overwrites its input, which nothing
else reads. Together they take the no-grad DiT working memory at 720x1280 (batch 2) from 1.29 to
1.18 GiB (``bench/memory_edit_14b.py``, after the real-valued RoPE of :mod:`.rope`); the results
equal DiffSynth's to float rounding (tests/test_lean_ops.py). :func:`use_lean_ops` installs them in
a DiT in place, as :func:`~chronoedit_lora.models.rope.chronoedit_model_fn` does before every call.
"""

from __future__ import annotations

import torch
from diffsynth.models.wan_video_dit import RMSNorm, WanModel


class LeanRMSNorm(RMSNorm):
    """DiffSynth's ``RMSNorm`` (x / rms(x) in float32, cast back, times the weight) without float32 copies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square() / x.shape[-1]
        return (x * torch.rsqrt(mean_square + self.eps)).to(x.dtype) * self.weight


class InplaceGELU(torch.nn.GELU):
    """``nn.GELU`` that overwrites its input when no gradient is recorded (its input is needed for one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return torch._C._nn.gelu_(x, approximate=self.approximate)


def use_lean_ops(dit: WanModel) -> None:
    """Make the blocks' RMSNorms and the FFNs' GELUs the lean ones (in place, idempotent)."""
    for module in dit.blocks.modules():
        if type(module) is RMSNorm and not module.use_torch_norm:
            module.__class__ = LeanRMSNorm
        elif type(module) is torch.nn.GELU:
            module.__class__ = InplaceGELU
