"""Dataset check speed: a generated dataset of N pairs checked cold (every file decoded, as every
run did before the check remembered its verdicts) and again warm (verdicts remembered), side by side.

    python bench/dataset_check.py [--pairs 10000] [--size 64] [--json out.json]

Prints pairs/s of each and their ratio; never asserts a time.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_dataset(folder: Path, pairs: int, size: int) -> Path:
    """``pairs`` random PNG pairs and their metadata.csv."""
    rng = np.random.default_rng(0)
    (folder / "before").mkdir(parents=True)
    (folder / "after").mkdir()
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["input_image", "edited_image", "prompt"])
        for i in range(pairs):
            for side in ("before", "after"):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / side / f"{i}.png")
            writer.writerow([f"before/{i}.png", f"after/{i}.png", f"The user wants edit {i}."])
    return folder / "metadata.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    from chronoedit_lora.data import check_dataset
    from chronoedit_lora.data.checked_files import CheckedFiles

    with tempfile.TemporaryDirectory() as tmp:
        csv_path = write_dataset(Path(tmp) / "data", args.pairs, args.size)
        seconds = {}
        for run in ("cold", "warm"):
            checked = CheckedFiles(Path(tmp) / "checked.json")
            start = time.perf_counter()
            check_dataset(csv_path, max_pixels=args.size * args.size, checked=checked)
            seconds[run] = time.perf_counter() - start
    rates = {run: args.pairs / s for run, s in seconds.items()}
    print(f"{args.pairs} pairs of {args.size}x{args.size} PNGs")
    for run in seconds:
        print(f"{run:<6}{seconds[run]:>8.2f} s{rates[run]:>10.0f} pairs/s")
    print(f"warm / cold: {rates['warm'] / rates['cold']:.1f}x the pairs per second")
    if args.json:
        Path(args.json).write_text(json.dumps({"pairs": args.pairs, "seconds": seconds, "pairs_per_second": rates}, indent=2))


if __name__ == "__main__":
    main()
