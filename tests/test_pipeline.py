"""End to end: our edit pipeline vs diffusers' ChronoEditPipeline on the same tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ChronoEditPipeline as ReferencePipeline
from diffusers import FlowMatchEulerDiscreteScheduler

from chronoedit_lora.pipeline import ChronoEditPipeline, sampling_scheduler
from chronoedit_lora.video import default_size

STEPS = 4
SHIFT = 5.0
PROMPT = "The user wants to add sunglasses to the cat's face."
# Float frames: both run fp32 from the same weights, noise and sigmas; they differ by float
# rounding (DiffSynth computes the timestep sinusoid and RoPE in float64, diffusers in float32).
FRAME_ATOL = 1e-4
# Saved PNGs: rounding to 8 bits can flip a level where the float frames differ by 1e-4.
PNG_MAX_LEVELS = 1


@pytest.fixture(scope="module")
def ours(tiny_diffusers):
    return ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tiny_diffusers):
    """diffusers' pipeline with a flow-matching Euler scheduler set to our sigmas (shift applied once)."""
    sigmas = sampling_scheduler(STEPS, SHIFT).sigmas.tolist()

    class FixedSigmasEuler(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=sigmas, device=device)

    pipe = ReferencePipeline.from_pretrained(tiny_diffusers, torch_dtype=torch.float32)
    pipe.scheduler = FixedSigmasEuler(shift=1.0, num_train_timesteps=1000)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_edit_matches_diffusers(ours, reference, input_image, cfg):
    # 32x32 input = CLIP input size and output size: no resize on either side, so preprocessing is
    # identical (diffusers' CLIP processor would centre-crop and PIL-resize other sizes; we resize
    # the whole image with torch bicubic like the original Wan code).
    result = ours(input_image, PROMPT, steps=STEPS, cfg=cfg, shift=SHIFT, seed=3, height=32, width=32, progress=False)
    expected = reference(image=input_image, prompt=PROMPT, negative_prompt="", height=32, width=32,
                         num_inference_steps=STEPS, guidance_scale=cfg, generator=torch.Generator().manual_seed(3),
                         output_type="pt").frames[0]  # (T, 3, H, W) in [0, 1]
    got = ((result.video[0].permute(1, 0, 2, 3) + 1) / 2).clamp(0, 1)
    assert got.shape == expected.shape == (5, 3, 32, 32)
    assert expected.std() > 0.05
    assert (got - expected).abs().max().item() <= FRAME_ATOL
    png_expected = np.round(expected[-1].permute(1, 2, 0).numpy() * 255)
    assert np.abs(np.asarray(result.image, dtype=np.float64) - png_expected).max() <= PNG_MAX_LEVELS


def test_seed_and_prompt_change_the_edit(ours, input_image):
    def edit(seed, prompt):
        return ours(input_image, prompt, steps=2, cfg=1.0, seed=seed, height=32, width=32, progress=False).video

    base = edit(0, PROMPT)
    assert torch.equal(base, edit(0, PROMPT))
    assert (base - edit(1, PROMPT)).abs().max() > 1e-3
    assert (base - edit(0, "Make it night.")).abs().max() > 1e-4


@pytest.mark.parametrize("reasoning_steps", [2, 3])
def test_temporal_reasoning_clip(ours, input_image, reasoning_steps):
    # 8 latent frames for K steps, then [first, last]: the reasoning frames decode from the first 7
    # latents (25 frames), then the 4 frames of the edit follow.
    result = ours(input_image, PROMPT, steps=3, cfg=1.0, seed=0, height=32, width=32,
                  temporal_reasoning_steps=reasoning_steps, progress=False)
    assert result.video.shape == (1, 3, 29, 32, 32)
    assert len(result.frames) == 29 and result.image.size == (32, 32)
    plain = ours(input_image, PROMPT, steps=3, cfg=1.0, seed=0, height=32, width=32, progress=False)
    assert (plain.video[:, :, -1] - result.video[:, :, -1]).abs().max() > 1e-3  # reasoning changes the edit


def test_full_reasoning_matches_diffusers_decode_order(ours, reference, input_image):
    """When reasoning lasts all steps, the clip is diffusers' (its Euler path cannot trim mid-way)."""
    result = ours(input_image, PROMPT, steps=STEPS, cfg=1.0, shift=SHIFT, seed=5, height=32, width=32,
                  temporal_reasoning_steps=STEPS, progress=False)
    expected = reference(image=input_image, prompt=PROMPT, height=32, width=32, num_inference_steps=STEPS,
                         guidance_scale=1.0, generator=torch.Generator().manual_seed(5), output_type="pt",
                         enable_temporal_reasoning=True, num_frames=29,
                         num_temporal_reasoning_steps=STEPS).frames[0]
    got = ((result.video[0].permute(1, 0, 2, 3) + 1) / 2).clamp(0, 1)
    assert got.shape == expected.shape == (29, 3, 32, 32)
    assert (got - expected).abs().max().item() <= FRAME_ATOL


def test_wan_layout_edits_identically(ours, tiny_wan, input_image):
    wan = ChronoEditPipeline.from_pretrained(tiny_wan, dtype=torch.float32)
    a = ours(input_image, PROMPT, steps=2, cfg=2.0, seed=0, height=32, width=32, progress=False).video
    b = wan(input_image, PROMPT, steps=2, cfg=2.0, seed=0, height=32, width=32, progress=False).video
    assert torch.equal(a, b)


def test_default_size_preserves_aspect_and_area():
    assert default_size(1280, 720) == (1280, 720)
    w, h = default_size(1000, 1000)
    assert w == h and w % 16 == 0 and abs(w * h - 720 * 1280) / (720 * 1280) < 0.02
    w, h = default_size(600, 1200)
    assert w % 16 == 0 and h % 16 == 0 and abs(h / w - 2) < 0.05
