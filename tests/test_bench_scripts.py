"""The benchmark scripts run end to end and write their JSON (figures are printed, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str, json_path: Path) -> dict:
    result = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(json_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(json_path.read_text())


@pytest.mark.slow
def test_train_step_bench_writes_both_modes_and_flops(tmp_path):
    figures = _run("train_step.py", "--repeats", "1", "--steps", "2", json_path=tmp_path / "train.json")
    summary = figures["summary"]
    assert set(figures["runs"]) == {"uncached", "cached"} and summary["dit_flops_per_step"] > 0
    for mode in ("uncached", "cached"):  # no step can beat the machine's own dense matmul rate
        assert 0 < summary[mode]["matmul_fraction"] <= 1


@pytest.mark.slow
def test_edit_latency_bench_writes_every_variant(tmp_path):
    figures = _run("edit_latency.py", "--repeats", "1", "--steps", "1", "--size", "32", json_path=tmp_path / "edit.json")
    assert set(figures["median"]) == {"base", "fused", "unfused", "offload model", "offload blocks"}


@pytest.mark.slow
def test_train_step_bench_compares_one_and_two_processes(tmp_path):
    figures = _run("train_step.py", "--processes", "2", "--repeats", "1", "--steps", "3", json_path=tmp_path / "dp.json")
    assert set(figures["median"]) == {"1", "2"} and figures["processes"] == 2
    assert all(figures["median"][n]["samples_per_s"] > 0 for n in ("1", "2")) and figures["samples_per_s_ratio"] > 0


@pytest.mark.slow
def test_vs_diffsynth_bench_writes_both_sides_and_modes(tmp_path):
    figures = _run("vs_diffsynth.py", "--repeats", "1", "--steps", "3", json_path=tmp_path / "vs.json")
    for mode in ("uncached", "cached"):
        assert set(figures["runs"][mode]) == {"kit", "diffsynth"}
        assert all(run["steps"] == 3 for side in figures["runs"][mode].values() for run in side)
        assert all(ratio > 0 for ratio in figures["summary"][mode]["kit ratio"].values())
        kit, diffsynth = (figures["runs"][mode][side][0]["s_per_step"] for side in ("kit", "diffsynth"))
        assert figures["summary"][mode]["kit paired"]["s_per_step"]["median"] == pytest.approx(kit / diffsynth)


@pytest.mark.slow
def test_edit_latency_bench_compares_eager_and_compiled(tmp_path):
    figures = _run("edit_latency.py", "--compile", "--repeats", "1", "--steps", "1", "--size", "32",
                   json_path=tmp_path / "compile.json")
    assert set(figures["median"]) == {"eager", "compiled"} and figures["first"]["compiled"] > 0


@pytest.mark.slow
def test_train_step_bench_compares_eager_and_compiled(tmp_path):
    figures = _run("train_step.py", "--compile", "--repeats", "1", "--steps", "2", json_path=tmp_path / "compile.json")
    assert set(figures["runs"]) == {"eager", "compiled"}
    assert all(0 < figures["summary"][mode]["matmul_fraction"] <= 1 for mode in ("eager", "compiled"))


@pytest.mark.slow
def test_eval_checkpoints_bench_runs_both_sides(tmp_path):
    figures = _run("eval_checkpoints.py", "--repeats", "1", "--steps", "1", "--size", "32", json_path=tmp_path / "eval.json")
    assert set(figures["median"]) == {"eval", "edit --batch x5"} and (figures["checkpoints"], figures["pairs"]) == (5, 4)
    assert all(figures["median"][side]["wall_s"] > 0 for side in figures["median"]) and figures["ratio"]["wall_s"] > 0


def test_vs_diffusers_edit_bench_pairs_whole_processes(tmp_path):
    figures = _run("vs_diffusers_edit.py", "--size", "tiny", "--repeats", "1", json_path=tmp_path / "edit.json")
    assert set(figures["runs"]) == {"kit", "diffusers"}
    for side in ("kit", "diffusers"):
        run = figures["runs"][side][0]
        assert 0 < run["load_s"] + run["edit_s"] < run["wall_s"] and 0 <= run["sys_s"] <= run["cpu_s"]
    kit, diffusers = (figures["runs"][side][0]["edit_s"] for side in ("kit", "diffusers"))
    assert figures["summary"]["paired"]["edit_s"]["median"] == pytest.approx(kit / diffusers)
    assert figures["png_difference_levels"] <= 2  # the same edit on both sides


@pytest.mark.slow
def test_edit_latency_bench_compares_the_caches(tmp_path):
    figures = _run("edit_latency.py", "--caches", "--repeats", "1", "--steps", "6", "--size", "32",
                   "--step-caches", "first-block:1e9,mag:0", json_path=tmp_path / "caches.json")
    calls, difference = figures["calls"], figures["max_difference"]
    assert set(figures["median"]) == {"uncached", "context cache", "context + first-block:1e9", "context + mag:0"}
    assert difference["context cache"] <= 1e-6 and difference["context + mag:0"] <= 1e-6  # exact variants
    assert calls["uncached"] == calls["context + mag:0"] == {"dit_calls": 6, "stack_passes": 6}
    assert calls["context + first-block:1e9"] == {"dit_calls": 6, "stack_passes": 2}  # first and last computed
    assert difference["context + first-block:1e9"] > 0


@pytest.mark.slow
def test_edit_latency_bench_times_the_denoising_loop_with_and_without_the_context_cache(tmp_path):
    figures = _run("edit_latency.py", "--caches", "--loop-only", "--repeats", "2", "--steps", "3", "--size", "32",
                   "--step-caches", "first-block:1e9", json_path=tmp_path / "loop.json")
    names = ("uncached", "context cache", "context + first-block:1e9")
    assert [len(figures["seconds"][name]) for name in names] == [2, 2, 2]
    assert figures["paired"]["uncached"] == [1.0, 1.0] and len(figures["paired"][names[2]]) == 2
    assert figures["max_difference"]["context cache"] == 0  # the context cache is exact
    assert figures["stack_passes"] == dict(zip(names, (3, 3, 2)))  # the step cache skipped the middle step
    assert figures["max_difference"][names[2]] > 0


@pytest.mark.slow
def test_vs_diffusers_edit_bench_adds_the_cached_kit_sides(tmp_path):
    figures = _run("vs_diffusers_edit.py", "--size", "tiny", "--steps", "3", "--repeats", "1", "--caches", "--step-caches",
                   "first-block:0", json_path=tmp_path / "edit.json")
    assert set(figures["runs"]) == {"kit", "diffusers", "kit uncached", "kit first-block:0"}
    caches = figures["summary"]["caches"]
    assert caches["kit"]["png_difference_levels"] == caches["kit first-block:0"]["png_difference_levels"] == 0
    assert caches["kit"]["vs_uncached"]["edit_s"]["median"] > 0


@pytest.mark.slow
def test_vs_diffusers_edit_bench_gives_cache_dit_the_kits_computed_steps(tmp_path):
    """cache-dit's DBCache on diffusers' pipeline computes the whole block stack at the steps the kit's
    step cache computed: the same DiT calls and block passes, counted by hooks in each child."""
    figures = _run("vs_diffusers_edit.py", "--size", "tiny", "--steps", "6", "--repeats", "1",
                   "--step-cache", "first-block:1e9", json_path=tmp_path / "peer.json")
    assert set(figures["runs"]) == {"kit", "diffusers", "kit first-block:1e9", "cache-dit first-block:1e9"}
    peer = figures["summary"]["step_cache"]
    kit, cache_dit = peer["kit first-block:1e9"], peer["cache-dit first-block:1e9"]
    assert kit["computed_steps"] == cache_dit["computed_steps"] == [0, 5]  # first and last: a threshold nothing stays under
    for side in (kit, cache_dit):  # 6 steps x 2 guidance branches; block 0 runs at every step on both sides
        assert side["dit_passes"] == side["first_block_passes"] == 12 and side["stack_passes"] == 4
    assert figures["runs"]["diffusers"][0]["stack_passes"] == 12  # uncached: every step
    runs = figures["runs"]
    assert peer["paired"]["edit_s"]["median"] == pytest.approx(
        runs["kit first-block:1e9"][0]["edit_s"] / runs["cache-dit first-block:1e9"][0]["edit_s"])
