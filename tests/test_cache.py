"""Cached conditioning: same training result as encoding every step, reused until its inputs change."""

from __future__ import annotations

import csv

import pytest
import torch

from chronoedit_lora.lora import load_lora
from chronoedit_lora.train.loop.trainer import cache_conditioning, train

from .test_train import make_subset, tiny_config


# the loss recipe's options too: the change map comes from the cache entry (issue 33)
@pytest.mark.parametrize("recipe", [{}, {"change_weight": 3.0, "input_frame_weight": 0.5, "timestep_sampling": "logit_normal",
                                         "loss_weighting": "none"}], ids=["default", "recipe"])
def test_training_from_the_cache_equals_encoding_every_step(tiny_diffusers, tmp_path, recipe):
    dataset = make_subset(tmp_path / "data", 3)
    common = dict(max_steps=4, save_every=100, seed=5, **recipe)
    plain = train(tiny_config(tiny_diffusers, dataset, tmp_path / "plain", **common))
    shared = tmp_path / "shared-cache"
    assert cache_conditioning(tiny_config(tiny_diffusers, dataset, tmp_path / "c", cache_dir=shared, **common)) == 3
    cached = train(tiny_config(tiny_diffusers, dataset, tmp_path / "cached", cache=True, cache_dir=shared, **common))
    assert plain.loaded_encoders and not cached.loaded_encoders  # only the DiT was loaded
    a, b = load_lora(plain.lora)[0], load_lora(cached.lora)[0]
    assert max((a[k].up - b[k].up).abs().max().item() for k in a) <= 1e-6


def test_entries_are_reused_until_an_input_changes(tiny_diffusers, tmp_path):
    dataset = make_subset(tmp_path / "data", 3)
    config = tiny_config(tiny_diffusers, dataset, tmp_path / "run", cache=True)
    assert cache_conditioning(config) == 3
    assert cache_conditioning(config) == 0
    rows = list(csv.DictReader(dataset.open()))
    rows[1]["prompt"] += " Keep the sun."
    with dataset.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert cache_conditioning(config) == 1  # only the changed pair
    assert cache_conditioning(tiny_config(tiny_diffusers, dataset, tmp_path / "run", cache=True, height=48, width=48)) == 3
    assert cache_conditioning(tiny_config(tiny_diffusers, dataset, tmp_path / "run", cache=True, dtype="bfloat16")) == 3
    entries = list((tmp_path / "run" / "cache").rglob("*.safetensors"))
    assert len(entries) == 3 + 1 + 3 + 3
    from safetensors.torch import load_file

    sample = load_file(str(entries[0]))
    assert set(sample) == {"input_latents", "y", "clip_feature", "context", "change"}
    assert sample["input_latents"].shape[1:3] == (16, 2) and sample["y"].shape[1] == 20
    assert sample["context"].dtype in (torch.float32, torch.bfloat16)


def test_filling_the_cache_never_loads_dit_weights(tiny_diffusers, tmp_path):
    """The encoders-only pipeline that fills the cache holds the DiT as a weightless meta shell."""
    from chronoedit_lora.pipeline import ChronoEditPipeline
    from chronoedit_lora.train.loop.inputs import encode_clip

    encoders = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32, with_dit=False)
    full = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    assert all(p.is_meta for p in encoders.dit.parameters())
    video = torch.rand(3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours, reference = (encode_clip(pipe, video, "Make it a sketch.") for pipe in (encoders, full))
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key
