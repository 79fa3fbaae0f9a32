"""Evaluating checkpoints: one `chronoedit-lora eval` over 5 LoRAs x 4 held-out pairs against 5
separate `chronoedit-lora edit --batch` runs (one per LoRA, each loading the model and editing the
same 4 inputs), side by side in one run.

    python bench/eval_checkpoints.py [--model-size tiny|mid] [--size 64] [--steps 8] [--repeats 3] [--json out.json]

Both sides run as fresh processes (imports and model loading included), alternating, and use the
same edit settings (fp32, cfg 1). The eval side does more: it also scores the base model, the
held-out loss at 5 timestep quantiles and PSNR/SSIM, and writes its CSV, plots and grid; its
LoRAs run through hooks (unfused). Prints the median wall-clock and CPU seconds of each side, their
ratios and each side's count of DiT evaluations; never asserts a time. On the tiny model a load
costs almost nothing, so the eval's single load saves little there; with a real checkpoint each
load of the 14B model is minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from chronoedit_lora.eval.metrics import QUANTILES

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "example_dataset"
CHECKPOINTS, PAIRS = 5, 4


def write_loras(folder: Path, model: Path) -> list[Path]:
    """5 random rank-32 LoRA files on the training's default targets."""
    from chronoedit_lora.lora import LoraModule, save_lora
    from chronoedit_lora.models.components import discover_components
    from chronoedit_lora.models.dit import inspect_dit, meta_dit
    from chronoedit_lora.train.loop.config import DEFAULT_TARGETS

    folder.mkdir()
    skeleton = meta_dit(inspect_dit(discover_components(model).dit))
    suffixes = tuple(f".{target}" for target in DEFAULT_TARGETS)  # as peft matches the training targets
    layers = {n: m for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)}
    loras = []
    for index in range(CHECKPOINTS):
        generator = torch.Generator().manual_seed(index)
        weights = {n: LoraModule(torch.randn(32, m.in_features, generator=generator) * 0.01,
                                 torch.randn(m.out_features, 32, generator=generator) * 0.01, 32.0) for n, m in layers.items()}
        loras.append(folder / f"lora-{index}.safetensors")
        save_lora(weights, loras[-1])
    return loras


def timed(commands: list[list[str]]) -> dict[str, float]:
    """Wall-clock and CPU seconds (user + system of the child processes) of running ``commands`` in turn."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.perf_counter() - start,
            "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", choices=("tiny", "mid"), default="tiny")
    parser.add_argument("--size", type=int, default=64, help="edit height and width")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "chronoedit_lora.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        subprocess.run(cli + ["make-tiny", str(model), "--size", args.model_size], check=True, capture_output=True)
        loras = write_loras(tmp / "loras", model)
        dataset = EXAMPLE / "metadata.csv"  # its first PAIRS rows are the held-out pairs
        common = ["--model", str(model), "--steps", str(args.steps), "--cfg", "1", "--height", str(args.size),
                  "--width", str(args.size), "--dtype", "float32"]
        eval_command = cli + ["eval", *common, "--dataset", str(dataset), "--count", str(PAIRS), "--output", str(tmp / "eval"),
                              *(x for lora in loras for x in ("--lora", str(lora)))]
        with dataset.open() as f:
            held_out = list(csv.DictReader(f))[:PAIRS]
        batches = []
        for index, lora in enumerate(loras):
            folder = tmp / f"batch-{index}"
            folder.mkdir()
            with (folder / "edits.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["image", "prompt", "output"])
                for row in held_out:
                    writer.writerow([str(dataset.parent / row["input_image"]), row["prompt"], f"out/{Path(row['input_image']).name}"])
            batches.append(cli + ["edit", *common, "--batch", str(folder / "edits.csv"), "--allow-outside", "--lora", str(lora)])
        runs: dict[str, list[dict]] = {"eval": [], "edit --batch x5": []}
        for _ in range(args.repeats):  # alternating, so drifts in the machine's speed hit both sides alike
            runs["eval"].append(timed([eval_command]))
            for folder in tmp.glob("batch-*/out"):
                shutil.rmtree(folder)  # a batch skips existing outputs
            runs["edit --batch x5"].append(timed(batches))
    median = {side: {k: statistics.median(r[k] for r in results) for k in ("wall_s", "cpu_s")} for side, results in runs.items()}
    ratio = {k: median["eval"][k] / median["edit --batch x5"][k] for k in ("wall_s", "cpu_s")}
    # DiT evaluations of each side: eval also scores the base and runs the loss at 5 quantiles
    dit_calls = {"eval": (CHECKPOINTS + 1) * PAIRS * (args.steps + len(QUANTILES)),
                 "edit --batch x5": CHECKPOINTS * PAIRS * args.steps}
    print(f"{args.model_size} model, {CHECKPOINTS} LoRAs x {PAIRS} pairs, {args.size}x{args.size}, {args.steps} steps, "
          f"fp32, median of {args.repeats}")
    for side, figures in median.items():
        print(f"{side:<18}{figures['wall_s']:>9.1f} s wall{figures['cpu_s']:>9.1f} s CPU{dit_calls[side]:>6} DiT calls "
              f"({'1 model load, LoRAs through hooks' if side == 'eval' else f'{CHECKPOINTS} model loads, LoRAs fused'})")
    print(f"eval / edit --batch x5: {ratio['wall_s']:.2f}x wall, {ratio['cpu_s']:.2f}x CPU")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_size": args.model_size, "size": args.size, "steps": args.steps,
                                               "checkpoints": CHECKPOINTS, "pairs": PAIRS, "runs": runs, "median": median,
                                               "ratio": ratio, "dit_calls": dit_calls}, indent=2))


if __name__ == "__main__":
    main()
