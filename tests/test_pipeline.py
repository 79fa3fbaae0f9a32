"""End to end: our edit pipeline vs diffusers' ChronoEditPipeline on the same tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ChronoEditPipeline as ReferencePipeline
from diffusers import FlowMatchEulerDiscreteScheduler

import chronoedit_lora.pipeline as pipeline_module
from chronoedit_lora.models.vae import AUTO_TILING_PIXELS, use_tiling
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.sampling import EulerSampler
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
def reference_unipc(tiny_diffusers):
    """diffusers' pipeline as it loads, with the folder's scheduler (UniPC, flow shift 5)."""
    pipe = ReferencePipeline.from_pretrained(tiny_diffusers, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(reference_unipc):
    """diffusers' pipeline with a flow-matching Euler scheduler set to our sigmas (shift applied once)."""
    sigmas = EulerSampler(STEPS, SHIFT).scheduler.sigmas.tolist()

    class FixedSigmasEuler(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=sigmas, device=device)

    pipe = ReferencePipeline(**{**reference_unipc.components,
                                "scheduler": FixedSigmasEuler(shift=1.0, num_train_timesteps=1000)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_frames(video: torch.Tensor) -> torch.Tensor:
    """Our (1, 3, T, H, W) clip in [-1, 1] as diffusers' (T, 3, H, W) frames in [0, 1]."""
    return ((video[0].permute(1, 0, 2, 3) + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_edit_matches_diffusers(ours, reference, input_image, cfg):
    # 32x32 input = CLIP input size and output size: no resize on either side, so preprocessing is
    # identical (diffusers' CLIP processor would centre-crop and PIL-resize other sizes; we resize
    # the whole image with torch bicubic like the original Wan code).
    result = ours(input_image, PROMPT, steps=STEPS, cfg=cfg, shift=SHIFT, seed=3, height=32, width=32, progress=False,
                  scheduler="euler")
    expected = reference(image=input_image, prompt=PROMPT, negative_prompt="", height=32, width=32,
                         num_inference_steps=STEPS, guidance_scale=cfg, generator=torch.Generator().manual_seed(3),
                         output_type="pt").frames[0]  # (T, 3, H, W) in [0, 1]
    got = as_frames(result.video)
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
                  temporal_reasoning_steps=STEPS, progress=False, scheduler="euler")
    expected = reference(image=input_image, prompt=PROMPT, height=32, width=32, num_inference_steps=STEPS,
                         guidance_scale=1.0, generator=torch.Generator().manual_seed(5), output_type="pt",
                         enable_temporal_reasoning=True, num_frames=29,
                         num_temporal_reasoning_steps=STEPS).frames[0]
    got = as_frames(result.video)
    assert got.shape == expected.shape == (29, 3, 32, 32)
    assert (got - expected).abs().max().item() <= FRAME_ATOL


@pytest.mark.parametrize("cfg, reasoning_steps", [(1.0, 0), (4.0, 0), (4.0, 2), (1.0, STEPS)])
def test_unipc_edit_matches_diffusers_default_scheduler(ours, reference_unipc, input_image, cfg, reasoning_steps):
    """The folder's UniPC (our default here) against diffusers' pipeline as it loads: no reasoning,
    reasoning cut after 2 of 4 steps (the solver's history cut with the clip), reasoning throughout."""
    assert ours.default_scheduler == "unipc"
    reasoning = {"enable_temporal_reasoning": True, "num_frames": 29,
                 "num_temporal_reasoning_steps": reasoning_steps} if reasoning_steps else {}
    result = ours(input_image, PROMPT, steps=STEPS, cfg=cfg, seed=7, height=32, width=32,
                  temporal_reasoning_steps=reasoning_steps, progress=False)
    expected = reference_unipc(image=input_image, prompt=PROMPT, negative_prompt="", height=32, width=32,
                               num_inference_steps=STEPS, guidance_scale=cfg, generator=torch.Generator().manual_seed(7),
                               output_type="pt", **reasoning).frames[0]
    got = as_frames(result.video)
    if 0 < reasoning_steps < STEPS:  # diffusers decodes only [input, edit]; we also decode the reasoning frames
        assert got.shape == (29, 3, 32, 32) and expected.shape == (5, 3, 32, 32)
        got, expected = got[-4:], expected[1:]  # the 4 frames decoded from the edit latent
    assert got.shape == expected.shape
    assert expected.std() > 0.05
    assert (got - expected).abs().max().item() <= FRAME_ATOL
    png_expected = np.round(expected[-1].permute(1, 2, 0).numpy() * 255)
    assert np.abs(np.asarray(result.image, dtype=np.float64) - png_expected).max() <= PNG_MAX_LEVELS


def test_cut_reasoning_clip_uses_the_active_samplers_sigma(ours, input_image, monkeypatch):
    """The reasoning frames of a cut clip decode ``latents - sigma * velocity`` of the step before the
    cut, with the sigma of the sampler in use (UniPC's here)."""
    samplers, steps = [], []
    make_sampler, guided_velocity = pipeline_module.make_sampler, ours.guided_velocity

    def recording_make_sampler(*args, **kwargs):
        samplers.append(make_sampler(*args, **kwargs))
        return samplers[-1]

    def recording_guided_velocity(latents, *args, **kwargs):
        steps.append((latents, guided_velocity(latents, *args, **kwargs)))
        return steps[-1][1]

    monkeypatch.setattr(pipeline_module, "make_sampler", recording_make_sampler)
    monkeypatch.setattr(ours, "guided_velocity", recording_guided_velocity)
    result = ours(input_image, PROMPT, steps=STEPS, cfg=1.0, seed=2, height=32, width=32,
                  temporal_reasoning_steps=2, progress=False)
    assert type(samplers[0]).__name__ == "UniPCSampler"
    latents, velocity = steps[1]
    clean = latents - samplers[0].sigmas[1] * velocity
    expected = ours.components.vae.decode(clean[:, :, :-1], device="cpu")
    assert torch.equal(result.video[:, :, :25], expected)


def test_unipc_and_euler_differ(ours, input_image):
    kwargs = dict(steps=STEPS, cfg=1.0, seed=0, height=32, width=32, progress=False)
    unipc = ours(input_image, PROMPT, **kwargs).video
    assert torch.equal(unipc, ours(input_image, PROMPT, scheduler="unipc", **kwargs).video)
    assert (unipc - ours(input_image, PROMPT, scheduler="euler", **kwargs).video).abs().max() > 1e-3


# Batched and two-call guidance differ only by the batch's float rounding.
GUIDANCE_ATOL = 1e-5


def test_batched_guidance_equals_two_calls(ours, input_image, monkeypatch):
    batch_sizes = []
    model_fn = pipeline_module.chronoedit_model_fn

    def counting_model_fn(dit, latents, *args, **kwargs):
        batch_sizes.append(latents.shape[0])
        return model_fn(dit, latents, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "chronoedit_model_fn", counting_model_fn)
    kwargs = dict(steps=2, cfg=4.0, seed=1, height=32, width=32, temporal_reasoning_steps=1, progress=False)
    batched = ours(input_image, PROMPT, **kwargs).video  # batched by default
    assert batch_sizes == [2, 2]
    batch_sizes.clear()
    separate = ours(input_image, PROMPT, batched_guidance=False, **kwargs).video
    assert batch_sizes == [1, 1, 1, 1]
    batch_sizes.clear()
    ours(input_image, PROMPT, **{**kwargs, "cfg": 1.0})
    assert batch_sizes == [1, 1]  # no guidance: one prompt, one call
    assert (batched - separate).abs().max().item() <= GUIDANCE_ATOL


# A 64x64 edit (8x8 latents) in 2x2 VAE tiles of 48 pixels (6 latents, stride 2) against one pass,
# through the encode of y and the decode. The tiny random VAE sees far beyond a 48-pixel tile, so
# the seams are large: measured max abs diff 0.468 and mean 0.0425 on frames in [-1, 1] (frame std
# 0.33). These bounds are the tiny model's; a real VAE with DiffSynth's 272-pixel tiles is not measured here.
TILES = {"tile_size": (6, 6), "tile_stride": (2, 2)}
TILED_MAX_ATOL, TILED_MEAN_ATOL = 0.5, 0.05


def test_tiled_vae_is_close_to_untiled(ours, input_image, monkeypatch):
    image = input_image.resize((64, 64))
    kwargs = dict(steps=2, cfg=1.0, seed=0, height=64, width=64, progress=False, scheduler="euler")
    plain = ours(image, PROMPT, vae_tiling="off", **kwargs).video
    assert torch.equal(plain, ours(image, PROMPT, vae_tiling="auto", **kwargs).video)  # 64x64 is below auto's size
    tiles = []
    tiled_decode = ours.components.vae.tiled_decode
    monkeypatch.setattr(ours.components.vae, "tiled_decode", lambda z, *a: tiles.append(z.shape) or tiled_decode(z, *a))
    tiled = ours(image, PROMPT, vae_tiling="on", **TILES, **kwargs).video
    assert tiles == [(1, 16, 2, 8, 8)]  # DiffSynth's tiled path decoded the edit
    diff = (plain - tiled).abs()
    assert 0.0 < diff.max().item() <= TILED_MAX_ATOL and diff.mean().item() <= TILED_MEAN_ATOL


def test_auto_tiling_threshold():
    assert AUTO_TILING_PIXELS == 1024 * 1024
    sizes = [default_size(w, h) for w in (512, 720, 1000, 1280, 1920, 3000) for h in (512, 720, 1000, 1280, 1920)]
    assert not any(use_tiling("auto", h, w) for w, h in sizes)  # the default sizes never tile
    assert use_tiling("auto", 1088, 1088) and use_tiling("auto", 1440, 2560)
    assert use_tiling("on", 32, 32) and not use_tiling("off", 1440, 2560)


@pytest.mark.parametrize("scheduler", ["euler", "unipc"])
def test_wan_layout_edits_identically(ours, tiny_wan, input_image, scheduler):
    wan = ChronoEditPipeline.from_pretrained(tiny_wan, dtype=torch.float32)
    assert wan.default_scheduler == "euler"  # the Wan layout has no scheduler config
    kwargs = dict(steps=2, cfg=2.0, seed=0, height=32, width=32, progress=False, scheduler=scheduler)
    assert torch.equal(ours(input_image, PROMPT, **kwargs).video, wan(input_image, PROMPT, **kwargs).video)


def test_default_size_preserves_aspect_and_area():
    assert default_size(1280, 720) == (1280, 720)
    w, h = default_size(1000, 1000)
    assert w == h and w % 16 == 0 and abs(w * h - 720 * 1280) / (720 * 1280) < 0.02
    w, h = default_size(600, 1200)
    assert w % 16 == 0 and h % 16 == 0 and abs(h / w - 2) < 0.05
