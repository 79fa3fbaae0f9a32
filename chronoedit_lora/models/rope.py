"""ChronoEdit's RoPE: the temporal-skip positions (the one model change from Wan2.1-I2V), rotated
in real arithmetic.

Positions. With 2 latent frames (input image + edited image) ChronoEdit places the frames at
temporal positions [0, skip_len - 1] = [0, 7] instead of [0, 1], as diffusers'
``ChronoEditTransformer3DModel`` does; any other frame count uses 0..F-1. ``rope="legacy"`` keeps
[0, 1], the convention the original repository's DiffSynth scripts trained and sampled with.

Rotation. DiffSynth's ``rope_apply`` turns q and k into float64 complex numbers and back in every
self-attention: the largest working-memory term of a block (8x the bytes of a bf16 q) and an op
Inductor cannot fuse. Here the same rotation is done on (cos, sin) pairs in float32 and written
back in q's dtype (:func:`rotate`; equal to DiffSynth's and diffusers' to float32 rounding,
tests/test_rope.py).

Both are lent to DiffSynth's ``model_fn_wan_video`` for one call by :func:`chronoedit_rope`, the
one place they are applied, for editing and training alike: ``dit.freqs`` becomes real
(positions, frequencies, [cos, sin]) tables, which the model function slices and concatenates as
it does its complex ones, and each block's self-attention is a :class:`RealRopeSelfAttention`
(DiffSynth's class with only the rotation replaced; set on first use). Nothing in DiffSynth is
modified. Under sequence parallelism DiffSynth's xfuser attention replaces the self-attention's
forward and applies its own complex rotation, so there the tables stay complex.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffsynth.models.wan_video_dit import SelfAttention, WanModel
from diffsynth.pipelines.wan_video import model_fn_wan_video

from .lean_ops import use_lean_ops

ROPE_MODES = ("skip", "legacy")


def temporal_positions(num_latent_frames: int, skip_len: int = 8, rope: str = "skip") -> list[int]:
    """Temporal RoPE positions of the latent frames under ChronoEdit's convention."""
    if rope not in ROPE_MODES:
        raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
    if rope == "skip" and num_latent_frames == 2:
        return [0, skip_len - 1]
    return list(range(num_latent_frames))


def rotate(x: torch.Tensor, freqs: torch.Tensor, num_heads: int) -> torch.Tensor:
    """RoPE on q or k ``(batch, tokens, heads * head_dim)``: each channel pair (a, b) of a head becomes
    (a cos - b sin, a sin + b cos), computed in float32, returned in ``x``'s dtype. ``freqs``:
    ``(tokens, 1, head_dim)``, the pairs' cos and sin interleaved (what the real tables give)."""
    pairs = x.unflatten(-1, (num_heads, -1, 2))
    a, b = pairs.unbind(-1)
    cos, sin = freqs.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(pairs)
    out[..., 0] = (a * cos).sub_(b * sin)
    out[..., 1] = (a * sin).add_(b * cos)
    return out.flatten(2)


class RealRopeSelfAttention(SelfAttention):
    """DiffSynth's Wan self-attention with :func:`rotate` in place of its complex ``rope_apply``."""

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        q = rotate(self.norm_q(self.q(x)), freqs, self.num_heads)
        k = rotate(self.norm_k(self.k(x)), freqs, self.num_heads)
        return self.o(self.attn(q, k, self.v(x)))


def use_real_rope(dit: WanModel) -> None:
    """Make every block's self-attention a :class:`RealRopeSelfAttention` (in place, idempotent; the
    weights and any LoRA layers inside stay as they are)."""
    for block in dit.blocks:
        if type(block.self_attn) is SelfAttention:
            block.self_attn.__class__ = RealRopeSelfAttention


def real_tables(tables: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """DiffSynth's complex RoPE tables (positions, frequencies) as float32 (positions, frequencies,
    [cos, sin]) tables."""
    return tuple(torch.view_as_real(table).float() for table in tables)


@contextmanager
def chronoedit_rope(dit: WanModel, num_latent_frames: int, skip_len: int = 8, rope: str = "skip",
                    real: bool = True) -> Iterator[None]:
    """Inside the ``with`` block, ``dit`` uses ChronoEdit's temporal positions and (``real``) the
    real-valued rotation."""
    positions = temporal_positions(num_latent_frames, skip_len, rope)
    original = dit.freqs
    time_table = original[0] if positions == list(range(num_latent_frames)) else original[0][torch.tensor(positions)]
    tables = (time_table,) + tuple(original[1:])
    if real:
        use_real_rope(dit)
        tables = real_tables(tables)
    dit.freqs = tables
    try:
        yield
    finally:
        dit.freqs = original


def chronoedit_model_fn(
    dit: WanModel,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    skip_len: int = 8,
    rope: str = "skip",
    stack: torch.nn.Module | None = None,
    **kwargs,
) -> torch.Tensor:
    """DiffSynth's Wan model function with ChronoEdit's RoPE and the lean block ops of
    :mod:`.lean_ops` (``kwargs``: its other arguments). ``stack``: a module called once as
    ``stack(x, context, t_mod, freqs)`` in place of the block loop (the step cache's
    :class:`~chronoedit_lora.step_cache.CachedStack`), lent as ``dit.blocks`` for this call."""
    use_lean_ops(dit)
    real = not kwargs.get("use_unified_sequence_parallel", False)
    with chronoedit_rope(dit, latents.shape[2], skip_len, rope, real):
        if stack is None:
            return model_fn_wan_video(dit=dit, latents=latents, timestep=timestep, **kwargs)
        blocks, dit.blocks = dit.blocks, torch.nn.ModuleList([stack])
        try:
            return model_fn_wan_video(dit=dit, latents=latents, timestep=timestep, **kwargs)
        finally:
            dit.blocks = blocks
