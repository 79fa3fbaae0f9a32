"""bench/memory_edit_14b.py: its live-tensor tracker counts what it should, its meta-device
measurements equal the same stages run on real CPU tensors of the tiny checkpoint, and its mode
figures are ordered as offloading must order them."""

from __future__ import annotations

import json

import pytest
import torch

from chronoedit_lora.models.dit import CHRONOEDIT_14B_KWARGS

from .bench_scripts import load_bench

SAME_PEAK_RTOL = 0.02
JSON_KEYS = {"model", "dit_kwargs", "encoder_kwargs", "sizes", "weights_GiB", "fp8_weights_GiB", "working_GiB",
             "peak_GiB", "variants", "goals_GiB", "reference_GB", "notes", "args"}
VARIANTS = {"batch 2", "batch 2, tiled decode", "batch 1", "batch 1, tiled decode"}
STAGES = {"text encoder", "CLIP", "VAE encode", "DiT batch 2", "DiT batch 1", "DiT fp8 batch 2", "DiT fp8 batch 1",
          "VAE decode", "VAE decode tiled"}


def _bench():
    return load_bench("memory_edit_14b")


@pytest.fixture(scope="module")
def full_14b():
    """The 14B figures at 720x1280 (one size keeps this to seconds)."""
    bench = _bench()
    return bench.compute(CHRONOEDIT_14B_KWARGS, {"720x1280": bench.SIZES["720x1280"]})


def test_tracker_counts_creation_to_release_and_ignores_existing_storage():
    bench = _bench()
    a = torch.zeros(1000, dtype=torch.float32)  # 4000 bytes, existed before: never counted
    with torch.no_grad(), bench.LiveTensors() as tracker:
        b = a * 2  # +4000
        view = b.view(10, 100)  # same storage: +0
        c = b.to(torch.float64)  # +8000 -> 12000
        del b  # still held by the view
        d = a + 1  # +4000 -> 16000 (peak)
        del view, c  # b's and c's storage released
        e = d.mul_(2)  # in place: +0
        alias = a[:10]  # view of an uncounted storage: +0
        f = torch.empty(250)  # +1000
    assert tracker.peak == 16000
    assert tracker.now == 5000
    del d, e, alias, f


def test_meta_block_and_stages_equal_real_cpu_tensors_of_the_tiny_checkpoint(tiny_diffusers):
    """The same code on real bf16 CPU tensors and on meta tensors allocates the same (flash
    accounting for attention in both; shapes of the tiny checkpoint)."""
    from chronoedit_lora.models.dit import load_dit
    from chronoedit_lora.models.vae import load_vae

    bench = _bench()
    dit_kwargs, encoder_kwargs = bench.checkpoint_kwargs(tiny_diffusers)
    meta = bench.build_models(dit_kwargs, sizes=encoder_kwargs)
    real_dit = load_dit(tiny_diffusers / "transformer", dtype=torch.bfloat16)[0].eval().requires_grad_(False)
    real = {"dit": real_dit, "vae": load_vae(tiny_diffusers / "vae", dtype=torch.bfloat16)}
    for tokens, batch in ((512, 1), (512, 2), (2048, 2)):
        on_meta, on_cpu = bench.block_peak(meta["dit"], tokens, batch), bench.block_peak(real_dit, tokens, batch)
        assert on_cpu > 0 and abs(on_meta / on_cpu - 1) < SAME_PEAK_RTOL, (tokens, batch, on_meta, on_cpu)
    args = (dit_kwargs, 5, 64, 96)
    for stage, kwargs, models in ((bench.dit_stage, {"batch": 2}, "dit"), (bench.dit_stage, {"batch": 1}, "dit"),
                                  (bench.vae_encode_stage, {}, "vae"), (bench.decode_stage, {}, "vae")):
        on_meta = bench.measure(stage, {models: meta[models]}, *args, **kwargs)
        on_cpu = bench.measure(stage, {models: real[models]}, *args, **kwargs)
        assert abs(on_meta / on_cpu - 1) < SAME_PEAK_RTOL, (stage.__name__, kwargs, on_meta, on_cpu)


def test_14b_modes_are_ordered_and_fp8_saves(full_14b):
    size = "720x1280"
    peak = {mode: row[size]["GiB"] for mode, row in full_14b["peak_GiB"].items()}
    assert peak["model"] <= peak["none"]
    assert peak["blocks"] < peak["model"]
    assert peak["model + fp8 DiT"] < peak["model"]
    assert peak["blocks + fp8 DiT"] <= peak["blocks"]
    assert full_14b["fp8_weights_GiB"]["DiT"] < 0.55 * full_14b["weights_GiB"]["DiT"]
    batch1, tiled = full_14b["variants"]["batch 1"], full_14b["variants"]["batch 2, tiled decode"]
    for mode in peak:
        assert batch1[mode][size]["GiB"] <= peak[mode]
        assert tiled[mode][size]["GiB"] <= peak[mode]
    work = full_14b["working_GiB"][size]
    assert work["DiT batch 1"] < work["DiT batch 2"] and work["VAE decode tiled"] < work["VAE decode"]
    # the DiT stage = one block's intermediates + what is kept across blocks + the pipeline's few tensors
    info = full_14b["sizes"][size]
    across = info["block_peak_batch_2_GiB"] + info["kept_across_blocks_batch_2_GiB"]
    assert across <= work["DiT batch 2"] < 1.05 * across
    assert info["tokens"] == 2 * 45 * 80 and info["decode_tiles"] > 1
    # the weights: 14B DiT as in bench/memory_14b.py, umT5-XXL about 5.7 B parameters in bf16
    assert 30 < full_14b["weights_GiB"]["DiT"] < 31 and 10 < full_14b["weights_GiB"]["umT5-XXL"] < 11


def test_script_on_tiny_shapes_writes_documented_json(tiny_diffusers, tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "edit.json"
    bench.main(["--model", str(tiny_diffusers), "--only", "1024x1024", "--only", "720x1280 reasoning",
                "--json", str(out)])
    printed = capsys.readouterr().out
    assert "not measured on a GPU" in printed and "34 GB" in printed and "38 GB" in printed
    result = json.loads(out.read_text())
    assert set(result) == JSON_KEYS
    assert set(result["variants"]) == VARIANTS and result["peak_GiB"] == result["variants"]["batch 2"]
    assert set(result["sizes"]) == {"1024x1024", "720x1280 reasoning"}
    assert result["sizes"]["720x1280 reasoning"]["latent_frames"] == 8
    for size, work in result["working_GiB"].items():
        assert set(work) == STAGES and all(v > 0 for v in work.values()), size
    for mode, row in result["peak_GiB"].items():
        assert mode in bench.MODES
        for size, cell in row.items():
            assert cell["GiB"] > 0 and cell["stage"] in bench.STAGES, (mode, size)


def test_stage_peaks_put_only_the_running_component_on_the_gpu():
    bench = _bench()
    gib = 2**30
    weights = {"DiT": 30 * gib, "DiT block": gib, "DiT non-block": gib // 2, "umT5-XXL": 10 * gib, "CLIP": gib,
               "VAE": gib // 4}
    fp8 = dict(weights, **{"DiT": 15 * gib, "DiT block": gib // 2})
    work = dict.fromkeys(STAGES, gib)
    none, model = bench.stage_peaks(weights, fp8, work, "none"), bench.stage_peaks(weights, fp8, work, "model")
    assert none["DiT"] == (30 + 10 + 1 + 0.25 + 1) * gib
    assert model == {"text encoder": 11 * gib, "CLIP": 2 * gib, "VAE encode": 1.25 * gib, "DiT": 31 * gib,
                     "VAE decode": 1.25 * gib}
    assert bench.stage_peaks(weights, fp8, work, "model + fp8 DiT")["DiT"] == 16 * gib
    assert bench.stage_peaks(weights, fp8, work, "blocks")["DiT"] == (0.5 + 2 + 1) * gib
    assert bench.stage_peaks(weights, fp8, work, "blocks")["text encoder"] == (0.5 + 10 + 1) * gib
