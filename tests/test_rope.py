"""ChronoEdit's real-valued RoPE against DiffSynth's complex128 rotation (and, through test_dit.py's
parity tests, which run this path, against diffusers' ``ChronoEditTransformer3DModel``)."""

from __future__ import annotations

import pytest
import torch
from diffsynth.models.wan_video_dit import SelfAttention, precompute_freqs_cis_3d, rope_apply
from diffsynth.pipelines.wan_video import model_fn_wan_video

from chronoedit_lora.models.dit import load_dit
from chronoedit_lora.models.rope import RealRopeSelfAttention, chronoedit_model_fn, chronoedit_rope, real_tables, rotate

from .test_dit import _dit_inputs

# float32: DiffSynth rotates in float64 and rounds once, we rotate in float32 (cos and sin rounded
# to float32 too): a few float32 ulps of the largest input (measured 1.1e-7).
ROTATE_FP32_RTOL = 1e-6
# bfloat16: both round a float32-exact value to bf16 once, so they agree or are one bf16 ulp
# apart: 2^-7 relative, plus the float32 error for values near zero.
BF16_ULP = 2.0**-7
# A whole tiny DiT in float32 (2 blocks, attention, norms): measured 4.2e-7 of the output's scale.
DIT_FP32_RTOL = 1e-6


def _grid(tables, f: int, h: int, w: int) -> torch.Tensor:
    """The (tokens, 1, head_dim) table of an f x h x w latent grid, built as model_fn_wan_video does."""
    return torch.cat([tables[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                      tables[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                      tables[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_equals_diffsynth_rope_apply(dtype):
    heads, f, h, w = 3, 2, 5, 6
    tables = precompute_freqs_cis_3d(128)
    x = (torch.randn(2, f * h * w, heads * 128, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    ours = rotate(x, _grid(real_tables(tables), f, h, w), heads)
    theirs = rope_apply(x, _grid(tables, f, h, w), heads)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == x.shape
    difference = (ours.double() - theirs.double()).abs()
    scale = x.abs().max().item()
    if dtype == torch.float32:
        assert difference.max().item() <= ROTATE_FP32_RTOL * scale
    else:
        assert (difference <= BF16_ULP * theirs.double().abs() + ROTATE_FP32_RTOL * scale).all()
    # and it is a rotation: each channel pair keeps its length
    pair_norm = x.double().unflatten(-1, (-1, 2)).norm(dim=-1)
    assert torch.allclose(ours.double().unflatten(-1, (-1, 2)).norm(dim=-1), pair_norm,
                          rtol=BF16_ULP if dtype == torch.bfloat16 else 1e-6, atol=1e-6 * scale)


def _two_dits(tiny_diffusers, dtype: torch.dtype = torch.float32) -> tuple:
    """The same tiny DiT twice: one for the kit's path, one that only ever runs DiffSynth's own."""
    return tuple(load_dit(tiny_diffusers / "transformer", dtype=dtype)[0] for _ in range(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dit_equals_diffsynth_complex_rope(tiny_diffusers, dtype):
    ours, reference = _two_dits(tiny_diffusers, dtype)
    tolerance = DIT_FP32_RTOL if dtype == torch.float32 else BF16_ULP  # bf16: measured equal
    for frames, rope in [(2, "skip"), (2, "legacy"), (8, "skip"), (8, "legacy")]:
        inp = _dit_inputs(frames, text_dim=ours.text_embedding[0].in_features)
        x, t = inp["x"].to(dtype), inp["t"].to(dtype)
        kwargs = dict(context=inp["context"].to(dtype), clip_feature=inp["clip"].to(dtype), y=inp["y"].to(dtype))
        with torch.no_grad():
            got = chronoedit_model_fn(ours, x, t, rope=rope, **kwargs).double()
            with chronoedit_rope(reference, frames, rope=rope, real=False):  # the positions only
                expected = model_fn_wan_video(dit=reference, latents=x, timestep=t, **kwargs).double()
        scale = expected.abs().max().item()
        assert scale > 0.1
        assert (got - expected).abs().max().item() <= tolerance * scale, (frames, rope)
    assert all(type(block.self_attn) is RealRopeSelfAttention for block in ours.blocks)
    assert all(type(block.self_attn) is SelfAttention for block in reference.blocks)
    assert ours.freqs[0].is_complex()  # its own tables, given back after each call


def _traced_dtypes(block: torch.nn.Module, freqs: torch.Tensor, dim: int) -> tuple[object, set[torch.dtype]]:
    x, context, t_mod = torch.randn(1, freqs.shape[0], dim), torch.randn(1, 257 + 512, dim), torch.randn(1, 6, dim)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, context, t_mod, freqs)
    dtypes = {node.meta["example_value"].dtype for graph in explained.graphs for node in graph.graph.nodes
              if isinstance(node.meta.get("example_value"), torch.Tensor)}
    return explained, dtypes


def test_block_traces_whole_in_real_arithmetic(tiny_diffusers):
    """With the real rotation a DiT block is one graph without breaks and no float64/complex value,
    so Inductor can fuse all of it; DiffSynth's own block traces complex128 (the control)."""
    ours, reference = _two_dits(tiny_diffusers)
    with chronoedit_rope(ours, 2):
        explained, dtypes = _traced_dtypes(ours.blocks[0], _grid(ours.freqs, 2, 4, 4), ours.dim)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert dtypes == {torch.float32}
    _, reference_dtypes = _traced_dtypes(reference.blocks[0], _grid(reference.freqs, 2, 4, 4), reference.dim)
    assert torch.complex128 in reference_dtypes
