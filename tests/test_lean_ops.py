"""The lean RMSNorm and GELU against DiffSynth's RMSNorm and torch's GELU."""

from __future__ import annotations

import pytest
import torch
from diffsynth.models.wan_video_dit import RMSNorm

from chronoedit_lora.models.lean_ops import InplaceGELU, LeanRMSNorm, use_lean_ops

# float32: the mean square is reduced in another order (a norm, squared): a few float32 ulps.
FP32_RTOL = 1e-6
# bfloat16: both round a float32 value to bf16 (then times the weight): one bf16 ulp apart at most.
BF16_RTOL = 2.0**-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rmsnorm_equals_diffsynth(dtype):
    g = torch.Generator().manual_seed(0)
    reference = RMSNorm(96, eps=1e-6)
    reference.weight.data = torch.rand(96, generator=g) + 0.5
    reference = reference.to(dtype)
    lean = LeanRMSNorm(96, eps=1e-6).to(dtype)
    lean.load_state_dict(reference.state_dict())
    x = (torch.randn(2, 50, 96, generator=g) * 4).to(dtype)
    expected, got = reference(x).double(), lean(x).double()
    assert got.dtype == expected.dtype and got.shape == x.shape
    tolerance = FP32_RTOL if dtype == torch.float32 else BF16_RTOL
    assert ((got - expected).abs() <= tolerance * expected.abs() + 1e-7).all()


def test_lean_rmsnorm_gradients_equal_diffsynth():
    """Training backpropagates through the norms (LoRA on q and k): the same input and weight gradients."""
    g = torch.Generator().manual_seed(1)
    reference, lean = RMSNorm(32, eps=1e-6), LeanRMSNorm(32, eps=1e-6)
    reference.weight.data = torch.rand(32, generator=g) + 0.5
    lean.load_state_dict(reference.state_dict())
    x = torch.randn(2, 7, 32, generator=g)
    upstream = torch.randn(2, 7, 32, generator=g)
    grads = []
    for norm in (reference, lean):
        leaf = x.clone().requires_grad_(True)
        (norm(leaf) * upstream).sum().backward()
        grads.append((leaf.grad, norm.weight.grad))
    for ours, theirs in zip(grads[1], grads[0]):
        assert torch.allclose(ours, theirs, rtol=FP32_RTOL, atol=1e-6)


def test_inplace_gelu_overwrites_only_without_gradients():
    x = torch.randn(4, 64)
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    gelu = InplaceGELU(approximate="tanh")
    with torch.no_grad():
        work = x.clone()
        out = gelu(work)
    assert out.data_ptr() == work.data_ptr() and torch.equal(out, expected)
    leaf = x.clone().requires_grad_(True)
    out = gelu(leaf * 1.0)
    out.sum().backward()
    reference = x.clone().requires_grad_(True)
    torch.nn.functional.gelu(reference, approximate="tanh").sum().backward()
    assert torch.equal(out.detach(), expected) and torch.equal(leaf.grad, reference.grad)


def test_use_lean_ops_swaps_the_blocks_ops_once(dit):
    use_lean_ops(dit)
    use_lean_ops(dit)
    assert all(type(block.self_attn.norm_q) is LeanRMSNorm for block in dit.blocks)
    assert all(type(block.ffn[1]) is InplaceGELU for block in dit.blocks)
