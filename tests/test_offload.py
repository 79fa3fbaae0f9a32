"""Offloaded edits: which components are on the compute device at each stage, and the same pixels."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.lora import save_lora
from chronoedit_lora.offload import GIB, Placement, choose_mode
from chronoedit_lora.pipeline import ChronoEditPipeline

EDIT = dict(prompt="Make it a pencil sketch.", steps=2, cfg=4.0, height=32, width=32, seed=1, progress=False)


@pytest.fixture(scope="module")
def pipes(tiny_diffusers):
    return {mode: ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32, offload=mode)
            for mode in ("none", "model", "blocks")}


def record_stages(monkeypatch) -> list[tuple[str, frozenset]]:
    """(stage, components on the compute device) each time a stage takes the device."""
    seen = []
    use = Placement.use

    def recording_use(self, name):
        use(self, name)
        if not seen or seen[-1][0] != name:
            seen.append((name, frozenset(self.resident)))

    monkeypatch.setattr(Placement, "use", recording_use)
    return seen


def test_model_offload_keeps_one_component_on_the_device_per_stage(pipes, input_image, monkeypatch):
    seen = record_stages(monkeypatch)
    pipe = pipes["model"]
    pipe(input_image, **EDIT)
    assert seen == [("text_encoder", {"text_encoder"}), ("image_encoder", {"image_encoder"}), ("vae", {"vae"}),
                    ("dit", {"dit"}), ("vae", {"vae"})]
    pipe.placement.release()
    assert pipe.placement.resident == set()


def test_block_offload_streams_at_most_two_blocks(pipes, input_image, monkeypatch):
    seen = record_stages(monkeypatch)
    pipe = pipes["blocks"]
    streamer = pipe.placement.streamer
    streamer.log.clear()
    pipe(input_image, **EDIT)
    assert ("dit", {"dit"}) in seen
    blocks = len(pipe.dit.blocks)
    # cfg 4, batched guidance: 1 DiT call per step, 2 steps; each block computes with itself and the next resident
    assert len(streamer.log) == 2 * blocks
    assert all(len(resident) <= 2 for resident in streamer.log)
    assert [resident[0] for resident in streamer.log] == list(range(blocks)) * 2
    pipe.placement.release()
    assert streamer.on_device == [] and pipe.placement.resident == set()


@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_offloaded_edits_are_bit_identical(pipes, input_image, mode):
    reference = pipes["none"](input_image, **EDIT).video
    assert torch.equal(pipes[mode](input_image, **EDIT).video, reference)


def test_unfused_lora_and_fp8_under_block_offload(tiny_diffusers, random_lora, input_image, tmp_path):
    save_lora(random_lora, tmp_path / "l.safetensors")
    results = []
    for mode in ("none", "blocks"):
        pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32, offload=mode, fp8_base=True)
        pipe.load_lora(tmp_path / "l.safetensors", 0.5, fuse=False)
        results.append(pipe(input_image, **EDIT).video)
    assert torch.equal(results[0], results[1])
    fused = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32, offload="model")
    fused.load_lora(tmp_path / "l.safetensors", 0.5)
    plain = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    plain.load_lora(tmp_path / "l.safetensors", 0.5)
    assert torch.equal(fused(input_image, **EDIT).video, plain(input_image, **EDIT).video)


def test_auto_picks_the_least_offloading_that_fits(pipes):
    from chronoedit_lora.offload import needs

    pipe = pipes["none"]
    modules = {"text_encoder": pipe.components.text_encoder, "image_encoder": pipe.components.image_encoder,
               "vae": pipe.components.vae, "dit": pipe.dit}
    gpu = torch.device("cuda")
    assert choose_mode(modules, torch.device("cpu"), tokens=7200, pixels=720 * 1280)[0] == "none"
    need = needs(modules, tokens=1000, pixels=64 * 64)
    assert need["blocks"] <= need["model"] <= need["none"]
    for free, expected in ((need["none"], "none"), (need["none"] - 1, "model"), (need["model"] - 1, "blocks"),
                           (need["blocks"] - 1, "blocks")):
        mode, why = choose_mode(modules, gpu, tokens=1000, pixels=64 * 64, free_bytes=math.ceil(free))
        assert mode == expected and "GiB free" in why, (free, mode)
    # the untiled VAE decode of a large frame can need more than the DiT's step
    big = needs(modules, tokens=1000, pixels=4096 * 4096)
    assert big["model"] - need["model"] > 100 * GIB


def test_offload_with_sequence_parallel_is_refused(tiny_diffusers):
    with pytest.raises(ChronoEditError, match="--offload model cannot be combined with --sequence-parallel"):
        ChronoEditPipeline.from_pretrained(tiny_diffusers, offload="model", sequence_parallel=True)


def test_a_batch_moves_each_component_once_per_chunk(pipes, input_image, monkeypatch):
    from chronoedit_lora.pipeline import EditRequest

    seen = record_stages(monkeypatch)
    pipe = pipes["model"]
    pipe.placement.release()
    requests = [EditRequest(input_image, f"Edit number {i}.", seed=i) for i in range(3)]
    settings = {k: v for k, v in EDIT.items() if k not in ("prompt", "seed")}
    batch = [r.video for r in pipe.edit_many(requests, **settings)]
    assert [stage for stage, _ in seen] == ["text_encoder", "image_encoder", "vae", "dit", "vae"]  # not 3 x 5
    singles = [pipes["none"](input_image, r.prompt, seed=r.seed, **settings).video for r in requests]
    assert all(torch.equal(a, b) for a, b in zip(batch, singles))


@pytest.mark.parametrize("settings", [dict(cfg=4.0), dict(cfg=4.0, batched_guidance=False), dict(cfg=1.0)],
                         ids=["batched", "separate", "no-guidance"])
def test_auto_counts_the_context_cache_it_will_hold(pipes, input_image, monkeypatch, settings):
    """--offload auto adds the context cache's bytes: the estimate equals the K/V tensors an edit holds."""
    from chronoedit_lora import pipeline
    from chronoedit_lora.models.context_cache import dit_cache_bytes, guidance_branches
    from chronoedit_lora.offload import needs

    pipe, held = pipes["none"], []
    real = pipeline.context_cache

    def measuring(dit, enabled=True):
        with real(dit, enabled) as cache:
            yield cache
            held.append(sum(t.numel() * t.element_size() for entry in cache.entries.values() for t in entry))

    monkeypatch.setattr(pipeline, "context_cache", contextmanager(measuring))
    pipe(input_image, **{**EDIT, **settings})
    estimate = dit_cache_bytes(pipe.dit, guidance_branches(settings["cfg"]), pipe.dtype)
    assert held == [estimate] and estimate > 0
    assert dit_cache_bytes(pipe.dit, guidance_branches(settings["cfg"], enabled=False), pipe.dtype) == 0

    modules = {"text_encoder": pipe.components.text_encoder, "image_encoder": pipe.components.image_encoder,
               "vae": pipe.components.vae, "dit": pipe.dit}
    # small frame: the DiT stage is the largest in every mode, so the cache adds to each peak in full
    plain, cached = needs(modules, 1000, 16 * 16), needs(modules, 1000, 16 * 16, context_bytes=estimate)
    assert {mode: cached[mode] - plain[mode] for mode in plain} == pytest.approx(dict.fromkeys(plain, estimate))


def test_context_cache_at_14b_is_the_documented_figure():
    """14B's own shapes (a meta-device DiT), bf16, guidance: the 1.17 GiB docs/performance.md states."""
    from diffsynth.models.wan_video_dit import WanModel

    from chronoedit_lora.models.context_cache import dit_cache_bytes
    from chronoedit_lora.models.dit import CHRONOEDIT_14B_KWARGS

    with torch.device("meta"):
        dit = WanModel(**CHRONOEDIT_14B_KWARGS)
    assert dit_cache_bytes(dit, 2, torch.bfloat16) / GIB == pytest.approx(1.17, abs=0.005)
    docs = (Path(__file__).parents[1] / "docs" / "performance.md").read_text()
    assert "**1.17 GiB with guidance's two branches**" in docs
