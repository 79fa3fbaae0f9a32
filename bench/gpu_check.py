"""Measure GPU memory and speed on a real CUDA GPU, beside the figures memory_edit_14b.py computes.

    python bench/gpu_check.py --json out.json [--workdir runs/gpu_check] [--height 720 --width 1280]
    python bench/gpu_check.py --json out.json --dit-14b [--height 720 --width 1280] [--steps 8]

For the day a CUDA machine is at hand. It builds the mid-size checkpoint (``chronoedit-lora
make-tiny DIR --size mid``: a DiT in Wan2.1-1.3B's shapes, the real Wan2.1 VAE, umT5-XXL / ViT-H
widths with a few layers), then runs, each in its own process through the CLI:

* one edit per offload mode (``chronoedit-lora edit ... --offload none|model|blocks``);
* the edit caches side by side (``--offload none``): uncached (``--no-context-cache``), the context
  K/V cache (the default) and each step cache of :data:`STEP_CACHES`: pipeline seconds, peak memory,
  the ratio to uncached and the largest PNG difference from the uncached edit (:func:`cache_rows`);
* 20 training steps with ``--cache true --fp8_base true --activation_offload true``.

``--dit-14b`` runs instead the cache comparison on ChronoEdit-14B's shapes: a random bf16 DiT of as
many of its 40 blocks as fit the free memory (stated in the report), the kit's denoising loop
uncached, with the context cache and with each step cache (``bench/caches_14b.py``).

Each process is a small ``python -c`` wrapper around ``chronoedit_lora.cli.main`` that prints
``torch.cuda.max_memory_allocated()`` (and the time of the pipeline call) as one JSON line. The
JSON report puts each measurement beside the figure ``bench/memory_edit_14b.py`` (edits) or
``bench/memory_14b.py`` (training) computes for the same checkpoint shapes and size. Without CUDA
it refuses at once (exit code 2). ``bench/gpu_bundle.py run`` installs what it needs on a bare GPU
machine from carried wheels and runs it in one call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2**30
OFFLOAD_MODES = ("none", "model", "blocks")
COMPUTED_MODE = {"none": "none", "model": "model", "blocks": "blocks"}  # CLI --offload -> memory_edit_14b mode
TRAIN_MODE = "cached + fp8 base + activation offload"  # bench/memory_14b.py's row for the training flags
TRAIN_FLAGS = ("--cache", "true", "--fp8_base", "true", "--activation_offload", "true")
MARKER = "GPU_CHECK "
STEP_CACHES = ("first-block:fast", "tea:fast")  # mag needs a calibration of this checkpoint: calibrate-cache
CACHE_VARIANTS = {"uncached": ("--no-context-cache",), "context cache": (),
                  **{f"context + {spec}": ("--step-cache", spec) for spec in STEP_CACHES}}
PROMPT = "The user wants to turn the photo into a watercolor painting, keeping the composition."
NO_CUDA = ("gpu_check.py needs a CUDA GPU, and torch.cuda.is_available() is False here; nothing was run. "
           "For the computed figures without a GPU run: python bench/memory_edit_14b.py")

# Run in a fresh interpreter: the CLI, timed, then its CUDA peak as one JSON line on stdout.
WRAPPER = r"""
import json, sys, time
import torch
from chronoedit_lora import pipeline
from chronoedit_lora.cli import main

calls = []
call = pipeline.ChronoEditPipeline.__call__
def timed(self, *args, **kwargs):
    torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        return call(self, *args, **kwargs)
    finally:
        torch.cuda.synchronize()
        calls.append(time.perf_counter() - start)
pipeline.ChronoEditPipeline.__call__ = timed
start = time.perf_counter()
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else 1
print("GPU_CHECK " + json.dumps({
    "returncode": code, "max_memory_allocated": torch.cuda.max_memory_allocated(),
    "max_memory_reserved": torch.cuda.max_memory_reserved(), "seconds": time.perf_counter() - start,
    "pipeline_seconds": calls, "device": torch.cuda.get_device_name()}), flush=True)
sys.exit(code or 0)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="write the report here")
    parser.add_argument("--workdir", default="runs/gpu_check", help="mid checkpoint, images, training run")
    parser.add_argument("--height", type=int, default=720, help="edit height")
    parser.add_argument("--width", type=int, default=1280, help="edit width")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per edit")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--train-height", type=int, default=512)
    parser.add_argument("--train-width", type=int, default=512)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank for training")
    parser.add_argument("--dit-14b", action="store_true", help="instead: the edit caches on a random DiT of "
                        "ChronoEdit-14B's shapes, as many of its 40 blocks as fit (bench/caches_14b.py)")
    args = parser.parse_args(argv)
    for name in ("height", "width", "train_height", "train_width"):
        if getattr(args, name) <= 0 or getattr(args, name) % 16:
            parser.error(f"--{name.replace('_', '-')} must be a positive multiple of 16, got {getattr(args, name)}")
    for name in ("steps", "train_steps", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def edit_argv(model: Path, image: Path, output: Path, mode: str, args: argparse.Namespace,
              extra: tuple[str, ...] = ()) -> list[str]:
    """``chronoedit-lora edit`` arguments for one offload mode (``extra``: more edit flags)."""
    return ["edit", "--model", str(model), "--image", str(image), "--prompt", PROMPT, "--output", str(output),
            "--offload", mode, "--height", str(args.height), "--width", str(args.width),
            "--steps", str(args.steps), "--device", "cuda", *extra]


def png_difference(a: Path, b: Path) -> int | None:
    """The largest difference of two PNGs in 8-bit levels (None if either is missing)."""
    import numpy as np
    from PIL import Image

    if not (a.is_file() and b.is_file()):
        return None
    return int(np.abs(np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16)).max())


def cache_rows(measured: dict[str, dict], outputs: dict[str, Path]) -> dict[str, dict]:
    """Each cache variant's pipeline seconds, peak GiB, ratio to the uncached edit and PNG difference from it."""
    def seconds(name: str) -> float | None:
        calls = measured[name].get("pipeline_seconds") or []
        return calls[0] if calls else None

    base = seconds("uncached")
    return {name: {"pipeline_s": seconds(name),
                   "ratio_to_uncached": seconds(name) / base if base and seconds(name) is not None else None,
                   "max_memory_allocated_GiB": m["max_memory_allocated"] / GIB if "max_memory_allocated" in m else None,
                   "png_difference_levels": png_difference(outputs[name], outputs["uncached"]),
                   "returncode": m.get("returncode"), **({"error": m["error"]} if "error" in m else {})}
            for name, m in measured.items()}


def train_argv(model: Path, output: Path, args: argparse.Namespace) -> list[str]:
    """``chronoedit-lora train`` arguments: the example dataset, cached, fp8 base, activation offload."""
    return ["train", "--model", str(model), "--dataset", str(REPO / "data" / "example_dataset" / "metadata.csv"),
            "--output", str(output), "--max_steps", str(args.train_steps), *TRAIN_FLAGS,
            "--height", str(args.train_height), "--width", str(args.train_width), "--rank", str(args.rank),
            "--dtype", "bfloat16", "--mixed_precision", "bf16", "--save_every", str(args.train_steps),
            "--overwrite"]


def parse_measurement(stdout: str) -> dict | None:
    """The wrapper's JSON line (the last one, if the CLI printed look-alikes), or None."""
    lines = [line[len(MARKER):] for line in stdout.splitlines() if line.startswith(MARKER)]
    return json.loads(lines[-1]) if lines else None


def run_measured(argv: list[str], log: Path) -> dict:
    """One CLI run in its own process; its measurement (or why there is none), output logged to ``log``."""
    result = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(argv)], capture_output=True, text=True,
                            cwd=REPO)
    log.write_text(f"$ chronoedit-lora {' '.join(argv)}\n\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    measured = parse_measurement(result.stdout) or {"returncode": result.returncode}
    if measured.get("returncode"):
        measured["error"] = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
    measured["log"] = str(log)
    return measured


def train_seconds_per_step(run_dir: Path) -> float | None:
    """Median ``seconds`` of the run's metrics.csv, first step (warm-up, cache filling) left out."""
    import csv

    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f) if row.get("seconds")]
    return statistics.median(seconds[1:] or seconds) if seconds else None


def computed_figures(model: Path, args: argparse.Namespace) -> dict:
    """What memory_edit_14b.py (edit, per mode) and memory_14b.py (training) compute for ``model``'s shapes."""
    import memory_14b
    import memory_edit_14b

    dit_kwargs, encoder_kwargs = memory_edit_14b.checkpoint_kwargs(model)
    size = f"{args.height}x{args.width}"
    edit = memory_edit_14b.compute(dit_kwargs, {size: (args.height, args.width, memory_edit_14b.EDIT_FRAMES)},
                                   encoder_kwargs, model=str(model))
    counts = memory_14b.count(args.train_height, args.train_width, args.rank, dit_kwargs)
    train = memory_14b.modes(counts, dit_kwargs["num_layers"], gpus=1)[TRAIN_MODE]
    return {"edit_GiB": {mode: edit["peak_GiB"][COMPUTED_MODE[mode]][size]["GiB"] for mode in OFFLOAD_MODES},
            "edit_batch_1_GiB": {mode: edit["variants"]["batch 1"][COMPUTED_MODE[mode]][size]["GiB"]
                                 for mode in OFFLOAD_MODES},
            "train_GiB": train["GPU total"]}


def assemble(edits: dict[str, dict], train: dict, computed: dict, args: argparse.Namespace,
             train_s_per_step: float | None) -> dict:
    """The report: each measurement (GiB, s/step) beside its computed figure and their ratio."""
    def row(measured: dict, computed_gib: float, steps: int, seconds_per_step: float | None = None) -> dict:
        gib = measured.get("max_memory_allocated", 0) / GIB if "max_memory_allocated" in measured else None
        calls = measured.get("pipeline_seconds") or []
        if seconds_per_step is None and calls:
            seconds_per_step = calls[0] / steps
        return {"measured_GiB": gib, "computed_GiB": computed_gib,
                "measured_over_computed": gib / computed_gib if gib is not None and computed_gib else None,
                "max_memory_reserved_GiB": measured.get("max_memory_reserved", 0) / GIB if gib is not None else None,
                "s_per_step": seconds_per_step, "returncode": measured.get("returncode"),
                **({"error": measured["error"]} if "error" in measured else {}), "log": measured.get("log")}

    device = next((m["device"] for m in (*edits.values(), train) if "device" in m), None)
    return {
        "device": device,
        "settings": {"edit_size": f"{args.height}x{args.width}", "edit_steps": args.steps,
                     "train_size": f"{args.train_height}x{args.train_width}", "train_steps": args.train_steps,
                     "rank": args.rank, "train_flags": " ".join(TRAIN_FLAGS)},
        "edit": {mode: row(edits[mode], computed["edit_GiB"][mode], args.steps) for mode in edits},
        "edit_computed_batch_1_GiB": computed["edit_batch_1_GiB"],
        "train": row(train, computed["train_GiB"], args.train_steps, train_s_per_step),
        "notes": ["measured: torch.cuda.max_memory_allocated() of the whole process (loading included); "
                  "computed: bench/memory_edit_14b.py / bench/memory_14b.py for the same shapes (no CUDA "
                  "context, no allocator slack)",
                  "edit s_per_step: the pipeline call (encoders, denoising, decode) / steps",
                  "train s_per_step: median seconds of logs/metrics.csv after the first step; the measured "
                  "peak includes filling the conditioning cache"],
    }


def print_report(report: dict) -> None:
    print(f"GPU: {report['device']}")
    print("| run | measured GiB | computed GiB | measured / computed | s/step |\n|---|---|---|---|---|")
    rows = [(f"edit --offload {mode}", r) for mode, r in report["edit"].items()] + [("train", report["train"])]
    for name, r in rows:
        def fmt(v, spec):
            return format(v, spec) if v is not None else "-"
        print(f"| {name} | {fmt(r['measured_GiB'], '.2f')} | {fmt(r['computed_GiB'], '.2f')} | "
              f"{fmt(r['measured_over_computed'], '.2f')} | {fmt(r['s_per_step'], '.2f')} |"
              + (f" failed: {r['error']}" if r.get("error") else ""))


def make_image(path: Path, height: int, width: int) -> Path:
    """A structured RGB test image (gradients and a square)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, ((x // 64 + y // 64) % 2) * 255], axis=-1).astype(np.uint8)
    rgb[height // 4: height // 2, width // 4: width // 2] = (250, 40, 40)
    Image.fromarray(rgb).save(path)
    return path


def check_14b(args: argparse.Namespace) -> int:
    """``--dit-14b``: uncached vs context cache vs each step cache on 14B's shapes (bench/caches_14b.py)."""
    import caches_14b
    import torch

    planned = caches_14b.plan(torch.cuda.mem_get_info()[0], args.height, args.width)
    pipe = caches_14b.random_pipeline(planned["blocks"], "cuda")
    rows = caches_14b.time_variants(pipe, args.height, args.width, args.steps, STEP_CACHES)
    report = {"device": torch.cuda.get_device_name(), "plan": planned, "height": args.height, "width": args.width,
              "steps": args.steps, "caches": rows}
    print(f"GPU: {report['device']}; ChronoEdit-14B shapes, {planned['blocks']} of {planned['of']} blocks, bf16, random "
          f"weights, {args.width}x{args.height} ({planned['tokens']} tokens), {args.steps} steps, cfg 5, batched guidance")
    print("| cache | denoising s | / uncached | DiT calls | stack passes | peak GiB | max abs diff |\n|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.2f} | {row['ratio_to_uncached']:.3f} | {row['dit_calls']} | "
              f"{row['stack_passes']} | {row['peak_GiB']:.1f} | {row['max_abs_difference']:.2e} |")
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not cuda_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if args.dit_14b:
        return check_14b(args)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = work / "mid"
    if not (model / "model_index.json").is_file():
        subprocess.run([sys.executable, "-m", "chronoedit_lora.cli", "make-tiny", str(model), "--size", "mid"],
                       check=True, cwd=REPO)
    image = make_image(work / "input.png", args.height, args.width)
    edits = {mode: run_measured(edit_argv(model, image, work / f"edit_{mode}.png", mode, args),
                                work / f"edit_{mode}.log") for mode in OFFLOAD_MODES}
    outputs = {name: work / f"cache_{name.replace(' ', '_').replace(':', '_').replace('+', '')}.png"
               for name in CACHE_VARIANTS}
    caches = cache_rows({name: run_measured(edit_argv(model, image, outputs[name], "none", args, extra),
                                            outputs[name].with_suffix(".log"))
                         for name, extra in CACHE_VARIANTS.items()}, outputs)
    train_dir = work / "train"
    train = run_measured(train_argv(model, train_dir, args), work / "train.log")
    report = assemble(edits, train, computed_figures(model, args), args, train_seconds_per_step(train_dir))
    report["edit_caches"] = caches
    print_report(report)
    print("| cache | pipeline s | / uncached | peak GiB | PNG diff |\n|---|---|---|---|---|")
    for name, row in caches.items():
        print(f"| {name} | {row['pipeline_s']} | {row['ratio_to_uncached']} | {row['max_memory_allocated_GiB']} | "
              f"{row['png_difference_levels']} |")
    Path(args.json).write_text(json.dumps(report, indent=2))
    failed = [name for name, r in (*report["edit"].items(), *caches.items(), ("train", report["train"]))
              if r["returncode"]]
    if failed:
        print(f"failed: {', '.join(failed)} (see the logs in {work})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
