"""bench/gpu_check.py on a CPU machine: its arguments, its refusal without CUDA, the CLI commands it
would run, and the report it assembles (from fabricated measurement numbers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chronoedit_lora.cli import build_parser
from chronoedit_lora.commands.train import overrides_from
from chronoedit_lora.train.loop.config import load_config

from .bench_scripts import BENCH, load_bench

GIB = 2**30


def _bench():
    return load_bench("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("extra", [(), ("--dit-14b",)], ids=["mid", "dit-14b"])
def test_refuses_at_once_without_cuda(tmp_path, extra):
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--json", str(out),
                             "--workdir", str(tmp_path / "work"), *extra], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "work").exists()


def test_arguments_defaults_and_bad_values(capsys):
    bench = _bench()
    args = bench.parse_args(["--json", "x.json"])
    assert (args.height, args.width, args.steps, args.train_steps, args.rank) == (720, 1280, 8, 20, 32)
    for bad in (["--height", "700"], ["--steps", "0"], ["--train-width", "-16"]):
        with pytest.raises(SystemExit) as stop:
            bench.parse_args(["--json", "x.json", *bad])
        assert stop.value.code == 2
    with pytest.raises(SystemExit):
        bench.parse_args([])  # --json is required
    assert "--json" in capsys.readouterr().err


def test_commands_are_the_kit_cli_with_the_requested_flags(tmp_path):
    bench = _bench()
    args = bench.parse_args(["--json", "x.json", "--train-steps", "20"])
    model = tmp_path / "mid"
    for mode in bench.OFFLOAD_MODES:
        argv = bench.edit_argv(model, tmp_path / "in.png", tmp_path / "out.png", mode, args)
        assert argv[0] == "edit" and argv[argv.index("--offload") + 1] == mode
        assert argv[argv.index("--model") + 1] == str(model)
    train = bench.train_argv(model, tmp_path / "run", args)
    parsed, extra = build_parser().parse_known_args(train)
    config = load_config(None, overrides_from(parsed, extra))  # every flag is a real training setting
    assert (config.cache, config.fp8_base, config.activation_offload, config.max_steps) == (True, True, True, 20)
    assert Path(config.dataset).is_file() and config.mixed_precision == "bf16"


def test_wrapper_line_and_metrics_are_read(tmp_path):
    bench = _bench()
    line = {"returncode": 0, "max_memory_allocated": 3 * GIB}
    stdout = f"editing...\n{bench.MARKER}{{\"returncode\": 9}}\n{bench.MARKER}{json.dumps(line)}\n"
    assert bench.parse_measurement(stdout) == line
    assert bench.parse_measurement("no marker here") is None
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text(
        "step,loss,lr,seconds,samples,val_loss\n1,1.0,1e-4,9.0,0,\n2,1.0,1e-4,1.0,1,\n3,1.0,1e-4,2.0,2,\n"
        "4,1.0,1e-4,3.0,3,\n")
    assert bench.train_seconds_per_step(tmp_path) == 2.0  # the first (warm-up) step left out
    assert bench.train_seconds_per_step(tmp_path / "missing") is None
    assert "max_memory_allocated" in bench.WRAPPER and "cli import main" in bench.WRAPPER


def test_report_puts_measured_beside_computed():
    bench = _bench()
    args = bench.parse_args(["--json", "x.json"])
    edits = {"none": {"returncode": 0, "max_memory_allocated": 12 * GIB, "max_memory_reserved": 13 * GIB,
                      "pipeline_seconds": [16.0], "device": "NVIDIA Test GPU", "log": "none.log"},
             "model": {"returncode": 0, "max_memory_allocated": 6 * GIB, "max_memory_reserved": 7 * GIB,
                       "pipeline_seconds": [20.0], "log": "model.log"},
             "blocks": {"returncode": 1, "error": ["ChronoEditError: no such flag"], "log": "blocks.log"}}
    train = {"returncode": 0, "max_memory_allocated": 5 * GIB, "max_memory_reserved": 5 * GIB, "log": "train.log"}
    computed = {"edit_GiB": {"none": 10.0, "model": 5.0, "blocks": 2.0},
                "edit_batch_1_GiB": {"none": 9.5, "model": 4.5, "blocks": 1.5}, "train_GiB": 4.0}
    report = bench.assemble(edits, train, computed, args, train_s_per_step=1.5)
    assert set(report) == {"device", "settings", "edit", "edit_computed_batch_1_GiB", "train", "notes"}
    assert report["device"] == "NVIDIA Test GPU"
    none = report["edit"]["none"]
    assert none["measured_GiB"] == 12 and none["computed_GiB"] == 10 and none["measured_over_computed"] == 1.2
    assert none["s_per_step"] == 16.0 / args.steps and none["max_memory_reserved_GiB"] == 13
    failed = report["edit"]["blocks"]
    assert failed["returncode"] == 1 and failed["measured_GiB"] is None and failed["error"]
    assert report["train"]["measured_over_computed"] == 1.25 and report["train"]["s_per_step"] == 1.5
    json.dumps(report)  # JSON-ready
    bench.print_report(report)


def test_computed_figures_for_a_checkpoint_folder(tiny_diffusers):
    bench = _bench()
    args = bench.parse_args(["--json", "x.json", "--height", "64", "--width", "96", "--train-height", "64",
                             "--train-width", "64", "--rank", "4"])
    computed = bench.computed_figures(tiny_diffusers, args)
    assert set(computed["edit_GiB"]) == set(bench.OFFLOAD_MODES) == set(computed["edit_batch_1_GiB"])
    edit = computed["edit_GiB"]
    # (with 2 blocks, block offload saves nothing here: its resident non-block weights even add a little)
    assert 0 < edit["model"] <= edit["none"] and edit["blocks"] > 0 and computed["train_GiB"] > 0


def test_cache_variants_are_edit_flags_and_rows_compare_to_uncached(tmp_path):
    """The cache comparison: each variant's flags parse as edit flags, and its row holds the ratio to the
    uncached edit and the PNG difference from it (fabricated measurements, real PNGs)."""
    from PIL import Image

    bench = _bench()
    args = bench.parse_args(["--json", "x.json"])
    for name, extra in bench.CACHE_VARIANTS.items():
        parsed = build_parser().parse_args(bench.edit_argv(tmp_path / "mid", tmp_path / "in.png", tmp_path / "o.png",
                                                           "none", args, extra))
        assert parsed.context_cache == (name != "uncached")
        assert (parsed.step_cache is None) == (name in ("uncached", "context cache"))
    outputs = {name: tmp_path / f"{i}.png" for i, name in enumerate(("uncached", "context cache", "context + tea:fast"))}
    for level, path in zip((10, 10, 13), outputs.values()):
        Image.new("RGB", (4, 4), (level, 0, 0)).save(path)
    measured = {"uncached": {"returncode": 0, "pipeline_seconds": [4.0], "max_memory_allocated": 2 * GIB},
                "context cache": {"returncode": 0, "pipeline_seconds": [3.0], "max_memory_allocated": 3 * GIB},
                "context + tea:fast": {"returncode": 1, "error": ["boom"]}}
    rows = bench.cache_rows(measured, outputs)
    assert rows["context cache"] == {"pipeline_s": 3.0, "ratio_to_uncached": 0.75, "max_memory_allocated_GiB": 3.0,
                                     "png_difference_levels": 0, "returncode": 0}
    assert rows["context + tea:fast"]["ratio_to_uncached"] is None
    assert rows["context + tea:fast"]["png_difference_levels"] == 3 and rows["context + tea:fast"]["error"] == ["boom"]


def test_dit_14b_plan_fits_what_offload_auto_counts():
    """--dit-14b keeps as many of 14B's 40 blocks as fit: its need is offload.needs of that many bf16 blocks
    with the two-branch context cache, within the free memory, and one block more would not fit."""
    from chronoedit_lora.models.context_cache import dit_cache_bytes
    from chronoedit_lora.offload import needs

    caches_14b = load_bench("caches_14b")
    assert caches_14b.plan(80 * GIB, 720, 1280)["blocks"] == 40
    planned = caches_14b.plan(30 * GIB, 720, 1280)
    assert planned["tokens"] == 2 * 45 * 80 and 0 < planned["blocks"] < 40

    def need(blocks: int) -> float:
        dit = caches_14b.meta_model(blocks)
        return needs({"text_encoder": None, "image_encoder": None, "vae": None, "dit": dit}, planned["tokens"], 0,
                     dit_cache_bytes(dit, 2, torch.bfloat16))["none"]

    assert planned["needs_GiB"] * GIB == pytest.approx(need(planned["blocks"])) and need(planned["blocks"]) <= 30 * GIB
    assert need(planned["blocks"] + 1) > 30 * GIB
    with pytest.raises(SystemExit, match="not even one of ChronoEdit-14B's blocks fits"):
        caches_14b.plan(2 * GIB, 720, 1280)


def test_dit_14b_variants_on_a_small_random_dit(tiny_diffusers):
    """The timing loop of --dit-14b, run on the CPU with the tiny checkpoint's shapes: the context cache is
    exact, a threshold nothing stays under computes only the first and last step, threshold 0 skips none."""
    from chronoedit_lora.models.dit import inspect_dit

    caches_14b = load_bench("caches_14b")
    kwargs = inspect_dit(tiny_diffusers / "transformer").kwargs
    pipe = caches_14b.random_pipeline(2, "cpu", torch.float32, kwargs)
    rows = caches_14b.time_variants(pipe, 32, 32, steps=4, step_caches=("first-block:1e9", "tea:0"), repeats=1)
    assert list(rows) == ["uncached", "context cache", "context + first-block:1e9", "context + tea:0"]
    assert all(row["dit_calls"] == 4 and row["peak_GiB"] is None and row["seconds"] > 0 for row in rows.values())
    assert [row["stack_passes"] for row in rows.values()] == [4, 4, 2, 4]
    assert rows["context cache"]["max_abs_difference"] <= 1e-6 and rows["context + tea:0"]["max_abs_difference"] <= 1e-6
    assert rows["context + first-block:1e9"]["max_abs_difference"] > 1e-6  # random weights: skipping changes the result
    assert rows["uncached"]["ratio_to_uncached"] == 1.0
