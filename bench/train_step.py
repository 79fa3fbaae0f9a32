"""Training step time and peak memory: encoding every step (the original recipe and DiffSynth's
stock trainer) vs training from cached conditioning, measured side by side in one run.

    python bench/train_step.py [--steps 12] [--repeats 3] [--json bench/train_step.json]

Each configuration runs in its own process (so peak RSS is its own), on the kit's tiny checkpoint
and the example dataset. Prints medians and the ratio; never asserts a time.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(model: Path, output: Path, cache: bool, steps: int) -> dict:
    """Train in a child process; returns median s/step (after the first step) and its peak RSS."""
    code = (
        "import resource, sys; from chronoedit_lora.cli import main; "
        f"main(['train', '--config', '{ROOT / 'configs/tiny_cpu.toml'}', '--model', '{model}', "
        f"'--output', '{output}', '--max_steps', '{steps}', '--save_every', '100000', '--cache', '{str(cache).lower()}', "
        "'--height', '64', '--width', '64']); "
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_kb = int(result.stdout.split("PEAK_RSS_KB")[-1].split()[0])
    seconds = [float(r["seconds"]) for r in csv.DictReader((output / "logs" / "metrics.csv").open())][1:]
    return {"s_per_step": statistics.median(seconds), "peak_rss_mb": peak_kb / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "tiny"
        subprocess.run([sys.executable, "-m", "chronoedit_lora.cli", "make-tiny", str(model)], check=True, capture_output=True)
        figures: dict[str, list[dict]] = {"uncached": [], "cached": []}
        for repeat in range(args.repeats):
            for mode in figures:  # interleaved, so machine load affects both columns alike
                output = tmp / f"{mode}-{repeat}"
                if mode == "cached":
                    prepare_cache(tmp / "cache-source", output, model)
                figures[mode].append(run_once(model, output, mode == "cached", args.steps))
    summary = {mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for mode, runs in figures.items()}
    summary["speedup_cached"] = summary["uncached"]["s_per_step"] / summary["cached"]["s_per_step"]
    summary["rss_ratio_cached"] = summary["cached"]["peak_rss_mb"] / summary["uncached"]["peak_rss_mb"]
    print(f"{'tiny config (64x64, CPU)':<28}{'uncached':>12}{'cached':>12}{'ratio':>10}")
    print(f"{'s/step (median)':<28}{summary['uncached']['s_per_step']:>12.3f}{summary['cached']['s_per_step']:>12.3f}"
          f"{summary['speedup_cached']:>9.2f}x")
    print(f"{'peak RSS MB (median)':<28}{summary['uncached']['peak_rss_mb']:>12.0f}{summary['cached']['peak_rss_mb']:>12.0f}"
          f"{summary['rss_ratio_cached']:>9.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": figures, "summary": summary}, indent=2))


def prepare_cache(source: Path, output: Path, model: Path) -> None:
    """Fill the conditioning cache once (not timed) and point the cached run at a copy of it."""
    import shutil

    if not source.exists():
        code = (f"from chronoedit_lora.cli import main; main(['cache', '--config', '{ROOT / 'configs/tiny_cpu.toml'}', "
                f"'--model', '{model}', '--output', '{source}', '--height', '64', '--width', '64'])")
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    shutil.copytree(source / "cache", output / "cache")


if __name__ == "__main__":
    main()
