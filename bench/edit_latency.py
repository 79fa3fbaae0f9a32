"""Edit latency: base model vs a fused LoRA vs an unfused (hooked) LoRA vs model and block offload,
side by side in one run.

    python bench/edit_latency.py [--steps 8] [--repeats 5] [--size 64] [--json bench/edit_latency.json]
    python bench/edit_latency.py --compile [--model-size mid] [--size 128] [...]

Uses the kit's tiny checkpoint and a random rank-32 LoRA on every default target. Prints medians
and ratios to the base model; never asserts a time. On a CPU the offload variants move no bytes
(home and compute device are the same), so their ratio is the bookkeeping's cost alone.

``--compile`` instead compares the base model eager and with compiled DiT blocks (``--compile``,
regional ``torch.compile``) on ``--model-size`` (``mid``: ``make-tiny --size mid``, written once
into a temporary folder): median edit time of each, and the first compiled edit's extra time
(the compilation) separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def compare_compile(args: argparse.Namespace) -> dict:
    """Eager vs compiled blocks on one checkpoint, alternating edits; the first compiled edit apart."""
    import subprocess
    import sys

    from PIL import Image

    from chronoedit_lora.pipeline import ChronoEditPipeline

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / args.model_size
        subprocess.run([sys.executable, "-m", "chronoedit_lora.cli", "make-tiny", str(model), "--size", args.model_size],
                       check=True, capture_output=True)
        pipes = {name: ChronoEditPipeline.from_pretrained(model, dtype=torch.float32, compile=name == "compiled")
                 for name in ("eager", "compiled")}
        image = Image.new("RGB", (args.size, args.size), (120, 80, 200))

        def edit(pipe: ChronoEditPipeline) -> float:
            start = time.perf_counter()
            pipe(image, "The user wants to edit.", steps=args.steps, cfg=1.0, height=args.size, width=args.size,
                 progress=False)
            return time.perf_counter() - start

        first = {name: edit(pipe) for name, pipe in pipes.items()}  # compiles the blocks
        times: dict[str, list[float]] = {name: [] for name in pipes}
        for _ in range(args.repeats):
            for name, pipe in pipes.items():
                times[name].append(edit(pipe))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.model_size} model, {args.size}x{args.size}, {args.steps} steps, fp32, median of {args.repeats}")
    for name, seconds in medians.items():
        print(f"{name:<10}{seconds:>8.3f} s{seconds / medians['eager']:>8.3f}x   first edit {first[name]:.1f} s")
    compile_s = first["compiled"] - medians["compiled"]
    print(f"compilation (first compiled edit minus its median): {compile_s:.1f} s")
    return {"model_size": args.model_size, "size": args.size, "steps": args.steps, "seconds": times,
            "median": medians, "first": first, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="eager vs compiled DiT blocks instead")
    parser.add_argument("--model-size", choices=("tiny", "mid"), default="tiny", help="with --compile")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.compile:
        figures = compare_compile(args)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return
    from PIL import Image

    from chronoedit_lora.lora import LoraModule, save_lora
    from chronoedit_lora.pipeline import ChronoEditPipeline
    from chronoedit_lora.tiny import write_tiny_diffusers_checkpoint

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_diffusers_checkpoint(Path(tmp) / "tiny")
        pipes = {name: ChronoEditPipeline.from_pretrained(model, dtype=torch.float32) for name in ("base", "fused", "unfused")}
        pipes |= {f"offload {mode}": ChronoEditPipeline.from_pretrained(model, dtype=torch.float32, offload=mode)
                  for mode in ("model", "blocks")}
        targets = {n: m for n, m in pipes["base"].dit.named_modules()
                   if n.endswith(("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                                  "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"))}
        lora = {n: LoraModule(torch.randn(32, m.in_features) * 0.01, torch.randn(m.out_features, 32) * 0.01, 32.0)
                for n, m in targets.items()}
        save_lora(lora, Path(tmp) / "lora.safetensors")
        pipes["fused"].load_lora(Path(tmp) / "lora.safetensors")
        pipes["unfused"].load_lora(Path(tmp) / "lora.safetensors", fuse=False)
        image = Image.new("RGB", (args.size, args.size), (120, 80, 200))
        times: dict[str, list[float]] = {name: [] for name in pipes}
        for _ in range(args.repeats):
            for name, pipe in pipes.items():  # interleaved so load drifts hit all variants alike
                start = time.perf_counter()
                pipe(image, "The user wants to edit.", steps=args.steps, cfg=1.0, height=args.size, width=args.size, progress=False)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"tiny model, {args.size}x{args.size}, {args.steps} steps, rank-32 LoRA on {len(lora)} layers")
    for name, seconds in medians.items():
        print(f"{name:<16}{seconds:>8.3f} s{seconds / medians['base']:>8.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": times, "median": medians}, indent=2))


if __name__ == "__main__":
    main()
