"""ChronoEdit's temporal-skip RoPE, the one model change from Wan2.1-I2V.

With 2 latent frames (input image + edited image) ChronoEdit places the frames at temporal
positions [0, skip_len - 1] = [0, 7] instead of [0, 1], as diffusers'
``ChronoEditTransformer3DModel`` does; any other frame count uses 0..F-1. DiffSynth's
``model_fn_wan_video`` slices ``dit.freqs[0][:F]``, so we lend it, for the duration of one call,
a temporal table whose first two rows are the rows of positions 0 and 7. Nothing in DiffSynth
is modified. ``rope="legacy"`` keeps [0, 1], the convention the original repository's DiffSynth
scripts trained and sampled with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffsynth.models.wan_video_dit import WanModel
from diffsynth.pipelines.wan_video import model_fn_wan_video

ROPE_MODES = ("skip", "legacy")


def temporal_positions(num_latent_frames: int, skip_len: int = 8, rope: str = "skip") -> list[int]:
    """Temporal RoPE positions of the latent frames under ChronoEdit's convention."""
    if rope not in ROPE_MODES:
        raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
    if rope == "skip" and num_latent_frames == 2:
        return [0, skip_len - 1]
    return list(range(num_latent_frames))


@contextmanager
def temporal_rope(dit: WanModel, num_latent_frames: int, skip_len: int = 8, rope: str = "skip") -> Iterator[None]:
    """Make ``dit`` use ChronoEdit's temporal positions inside the ``with`` block."""
    positions = temporal_positions(num_latent_frames, skip_len, rope)
    if positions == list(range(num_latent_frames)):
        yield
        return
    original = dit.freqs
    time_table = original[0]
    dit.freqs = (time_table[torch.tensor(positions)],) + tuple(original[1:])
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
    **kwargs,
) -> torch.Tensor:
    """DiffSynth's Wan model function with ChronoEdit's temporal positions."""
    with temporal_rope(dit, latents.shape[2], skip_len, rope):
        return model_fn_wan_video(dit=dit, latents=latents, timestep=timestep, **kwargs)
