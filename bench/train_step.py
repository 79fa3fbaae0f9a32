"""Training step time, peak memory and FLOPs utilisation: encoding every step (the original recipe
and DiffSynth's stock trainer) vs training from cached conditioning, measured side by side in one run.

    python bench/train_step.py [--size tiny|mid] [--steps N] [--repeats 3] [--json out.json]
    python bench/train_step.py --processes 2 [...]   # samples/s of 1 vs 2 processes (CPU, gloo)

``tiny`` is the kit's 36 MB test checkpoint at 64x64; ``mid`` (written once, about 4 GB, 1 minute) has
a DiT in Wan2.1-1.3B's shapes, the real Wan2.1 VAE and umT5-XXL / ViT-H widths with a few layers,
trained at 128x128. Each training run is its own process (so peak RSS is its own); runs of the two
modes alternate, so machine load affects both columns alike. Then, in a further process: the DiT's
forward+backward FLOPs of one step (counted by ``torch.utils.flop_counter`` on a cached pair) and
the machine's dense float32 matmul throughput. Prints medians and ratios; never asserts a time.

``--compile`` instead compares eager and compiled DiT blocks (``compile = true``, regional
``torch.compile``), both training from cached conditioning: s/step after the first step, the first
step's extra time (the compilation) reported separately, and each one's share of the matmul peak.

``--processes N`` instead compares data-parallel throughput: training from cached conditioning with
1 process and with N processes (configs/accelerate/cpu_2proc.yaml, gloo), each run its own launch,
alternating, and reports samples/s (processes x batch / median s/step of rank 0) side by side. On a
CPU the N processes share its cores (torchrun gives each one thread), so this measures the
multi-process plumbing's overhead, not a GPU speed-up.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.toml"
MULTI_PROCESS = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
SIDE = {"tiny": 64, "mid": 128}  # training height = width
DEFAULT_STEPS = {"tiny": 12, "mid": 5}

# One training step of the DiT under the FLOP counter, then a float32 matmul roofline.
MEASURE_FLOPS = r"""
import json, statistics, sys, time
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.train.loop.config import load_config
from chronoedit_lora.train.objective.lora_module import LoraTrainingModule
config_path, model, cache_entry = sys.argv[1:4]
config = load_config(config_path, {"model": model})
pipe = ChronoEditPipeline.from_pretrained(model, dtype=torch.float32, encoders=False)
module = LoraTrainingModule(pipe, config.rank, config.alpha, config.targets, config.shift,
                            config.gradient_checkpointing, config.activation_offload)
with FlopCounterMode(display=False) as counter:
    module(load_file(cache_entry)).backward()
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
seconds = []
for _ in range(12):
    start = time.perf_counter(); a @ b; seconds.append(time.perf_counter() - start)
print(json.dumps({"dit_flops_per_step": counter.get_total_flops(),
                  "matmul_flops_per_s": 2 * 2048**3 / statistics.median(seconds[2:])}))
"""


def cli(*args: str) -> None:
    """Run a ``chronoedit-lora`` command in a child process."""
    subprocess.run([sys.executable, "-m", "chronoedit_lora.cli", *args], check=True, capture_output=True)


def train_args(model: Path, output: Path, side: int) -> list[str]:
    return ["--config", str(CONFIG), "--model", str(model), "--output", str(output),
            "--height", str(side), "--width", str(side)]


def run_once(model: Path, output: Path, cache: bool, steps: int, side: int, compile: bool = False) -> dict:
    """Train in a child process; returns median s/step (after the first step), the first step's
    time beyond that median (warm-up; with ``compile``, the compilation) and its peak RSS."""
    args = ["train", *train_args(model, output, side), "--max_steps", str(steps), "--save_every", "100000",
            "--cache", str(cache).lower(), "--compile", str(compile).lower()]
    code = (f"import resource; from chronoedit_lora.cli import main; main({args!r}); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_kb = int(result.stdout.split("PEAK_RSS_KB")[-1].split()[0])
    seconds = step_seconds(output)
    first = float(next(csv.DictReader((output / "logs" / "metrics.csv").open()))["seconds"])
    return {"s_per_step": seconds, "first_step_extra_s": first - seconds, "peak_rss_mb": peak_kb / 1024}


def step_seconds(output: Path) -> float:
    """Median s/step of a finished run, from rank 0's metrics (the first step, warm-up, left out)."""
    return statistics.median(float(r["seconds"]) for r in list(csv.DictReader((output / "logs" / "metrics.csv").open()))[1:])


def run_processes(model: Path, output: Path, processes: int, steps: int, side: int) -> dict:
    """Train from the cache with ``processes`` ranks (one: a plain process; more: accelerate launch over gloo)."""
    args = [*train_args(model, output, side), "--max_steps", str(steps), "--save_every", "100000", "--cache", "true"]
    launcher = [sys.executable, "-m", "chronoedit_lora.cli", "train"] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTI_PROCESS),
        "--num_processes", str(processes), str(ROOT / "scripts" / "train.py")]
    subprocess.run([*launcher, *args], check=True, capture_output=True)
    seconds = step_seconds(output)
    batch = tomllib.loads(CONFIG.read_text())["batch_size"]
    return {"s_per_step": seconds, "samples_per_s": processes * batch / seconds}


def compare_processes(model: Path, cache: Path, tmp: Path, processes: int, repeats: int, steps: int, side: int) -> dict:
    """1 vs ``processes`` processes, alternating runs; per-run figures and their medians."""
    runs: dict[str, list[dict]] = {"1": [], str(processes): []}
    for repeat in range(repeats):
        for count in runs:
            output = tmp / f"processes{count}-{repeat}"
            shutil.copytree(cache, output / "cache")
            runs[count].append(run_processes(model, output, int(count), steps, side))
    median = {count: {key: statistics.median(r[key] for r in results) for key in results[0]} for count, results in runs.items()}
    print(f"data-parallel training from cached conditioning, CPU over gloo, {steps} steps, median of {repeats}")
    print(f"{'processes':<12}{'s/step':>10}{'samples/s':>12}")
    for count, figures in median.items():
        print(f"{count:<12}{figures['s_per_step']:>10.3f}{figures['samples_per_s']:>12.2f}")
    return {"runs": runs, "median": median,
            "samples_per_s_ratio": median[str(processes)]["samples_per_s"] / median["1"]["samples_per_s"]}


def model_and_cache(tmp: Path, size: str, side: int) -> tuple[Path, Path]:
    """Write the ``size`` checkpoint under ``tmp`` and fill a conditioning cache for it (not timed)."""
    model = tmp / size
    cli("make-tiny", str(model), "--size", size)
    cache = tmp / "cache-source" / "cache"
    cli("cache", *train_args(model, cache.parent, side))
    return model, cache


def measure_flops(model: Path, cache: Path) -> dict:
    entry = next(cache.rglob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", MEASURE_FLOPS, str(CONFIG), str(model), str(entry)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIDE), default="tiny")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1,
                        help="> 1: compare samples/s of 1 and this many processes instead of cached vs uncached")
    parser.add_argument("--compile", action="store_true",
                        help="compare eager and compiled DiT blocks (both cached) instead of cached vs uncached")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    steps, side = args.steps or DEFAULT_STEPS[args.size], SIDE[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, cache = model_and_cache(tmp, args.size, side)
        if args.processes > 1:
            result = compare_processes(model, cache, tmp, args.processes, args.repeats, steps, side)
            if args.json:
                Path(args.json).write_text(json.dumps({"size": args.size, "side": side, "steps": steps,
                                                       "processes": args.processes, **result}, indent=2))
            return
        # mode -> (cached, compiled)
        runs = {"eager": (True, False), "compiled": (True, True)} if args.compile else \
            {"uncached": (False, False), "cached": (True, False)}
        figures: dict[str, list[dict]] = {mode: [] for mode in runs}
        for repeat in range(args.repeats):
            for mode, (cached, compiled) in runs.items():
                output = tmp / f"{mode}-{repeat}"
                if cached:
                    shutil.copytree(cache, output / "cache")
                figures[mode].append(run_once(model, output, cached, steps, side, compiled))
        flops = measure_flops(model, cache)
    summary: dict = {mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for mode, runs in figures.items()}
    for mode in figures:
        achieved = flops["dit_flops_per_step"] / summary[mode]["s_per_step"]
        summary[mode].update(dit_flops_per_s=achieved, matmul_fraction=achieved / flops["matmul_flops_per_s"])
    baseline, other = figures
    summary.update(flops, speedup=summary[baseline]["s_per_step"] / summary[other]["s_per_step"],
                   rss_ratio=summary[other]["peak_rss_mb"] / summary[baseline]["peak_rss_mb"])
    print_table(args.size, side, summary, baseline, other)
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "side": side, "steps": steps, "runs": figures,
                                               "summary": summary}, indent=2))


def print_table(size: str, side: int, s: dict, baseline: str, other: str) -> None:
    a, b = s[baseline], s[other]
    rows = [
        ("s/step (median)", f"{a['s_per_step']:.3f}", f"{b['s_per_step']:.3f}", f"{s['speedup']:.2f}x faster"),
        ("first step extra s", f"{a['first_step_extra_s']:.2f}", f"{b['first_step_extra_s']:.2f}", ""),
        ("peak RSS MB (median)", f"{a['peak_rss_mb']:.0f}", f"{b['peak_rss_mb']:.0f}", f"{s['rss_ratio']:.2f}x"),
        ("DiT GFLOP/s", f"{a['dit_flops_per_s'] / 1e9:.1f}", f"{b['dit_flops_per_s'] / 1e9:.1f}", ""),
        ("  / fp32 matmul peak", f"{a['matmul_fraction']:.1%}", f"{b['matmul_fraction']:.1%}", ""),
    ]
    print(f"{size} config ({side}x{side}, CPU, float32); DiT forward+backward {s['dit_flops_per_step'] / 1e9:.1f} "
          f"GFLOP/step; fp32 matmul peak {s['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (2048^3, same run)")
    print(f"{'':<24}{baseline:>12}{other:>12}{'':>4}ratio")
    for name, *values in rows:
        print(f"{name:<24}{values[0]:>12}{values[1]:>12}    {values[2]}")


if __name__ == "__main__":
    main()
