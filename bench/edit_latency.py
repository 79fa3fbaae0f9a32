"""Edit latency: base model vs a fused LoRA vs an unfused (hooked) LoRA vs model and block offload,
side by side in one run.

    python bench/edit_latency.py [--steps 8] [--repeats 5] [--size 64] [--json bench/edit_latency.json]
    python bench/edit_latency.py --compile [--model-size mid] [--size 128] [...]
    python bench/edit_latency.py --caches [--model-size mid] [--size 128] [--steps 50] [--cfg 5] [...]
    python bench/edit_latency.py --caches --loop-only [--model-size mid | --model DIR] [--size 128] [--steps 50] [...]

Uses the kit's tiny checkpoint and a random rank-32 LoRA on every default target. Prints medians
and ratios to the base model; never asserts a time. On a CPU the offload variants move no bytes
(home and compute device are the same), so their ratio is the bookkeeping's cost alone.

``--compile`` instead compares the base model eager and with compiled DiT blocks (``--compile``,
regional ``torch.compile``) on ``--model-size`` (``mid``: ``make-tiny --size mid``, written once
into a temporary folder): median edit time of each, and the first compiled edit's extra time
(the compilation) separately.

``--caches`` instead compares, on one pipeline and alternating edits, the uncached edit
(``--no-context-cache``), the context K/V cache (the default) and each step cache on top of it
(``--step-caches``; mag with a calibration recorded from one uncached edit of the same image and
schedule): wall time per edit and its ratio to the uncached median, ratios of alternating pairs,
DiT calls made and block-stack passes computed, peak CUDA memory (on a GPU; the CPU has none to
report), and the largest difference of the decoded clip from the uncached one. With ``--loop-only``
it times the denoising loop alone (the inputs, vs_diffusers_edit.py's image and instruction, encoded
once beforehand), uncached, with the context cache and with each ``--step-caches`` value on top of
it: the caches' own saving, without the encoders and the VAE. ``--model DIR`` uses an existing checkpoint folder instead of writing one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_diffusers_edit import PROMPT as EDIT_PROMPT, make_input  # noqa: E402  (bench/ is not a package)

PROMPT = "The user wants to edit."  # the --caches edits' instruction


def compare_compile(args: argparse.Namespace) -> dict:
    """Eager vs compiled blocks on one checkpoint, alternating edits; the first compiled edit apart."""
    from PIL import Image

    from chronoedit_lora.pipeline import ChronoEditPipeline

    with tempfile.TemporaryDirectory() as tmp:
        model = _write_checkpoint(Path(tmp), args.model_size)
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


def record_calibration(pipe, image, prompt: str, steps: int, cfg: float):
    """The step-cache calibration of one uncached edit (what ``calibrate-cache`` records per row)."""
    from chronoedit_lora.step_cache import StepCache, calibration_from

    recorder = StepCache(pipe.dit, None, steps, record=True)
    negative = pipe.encode_prompt("") if cfg > 1 else None
    pipe.denoise(pipe.encode_prompt(prompt), negative, pipe.encode_image(image), pipe.condition_latents(image, 5), 0,
                 steps, cfg, None, 0, None, True, False, step_cache=recorder)
    return calibration_from([recorder], {"bench": "edit_latency --caches"})


def compare_caches(args: argparse.Namespace) -> dict:
    """Uncached vs context-cached vs each step cache, alternating edits on one pipeline."""
    from PIL import Image

    from chronoedit_lora.pipeline import EditRequest
    from chronoedit_lora.step_cache import parse_step_cache

    prompt = PROMPT
    with tempfile.TemporaryDirectory() as tmp:
        pipe = _pipeline(args, Path(tmp))
        image = Image.new("RGB", (args.size, args.size), (120, 80, 200))
        calibration = record_calibration(pipe, image, prompt, args.steps, args.cfg)
        variants = {"uncached": {"context_cache": False}, "context cache": {}}
        variants |= {f"context + {spec}": {"step_cache": parse_step_cache(spec), "cache_calibration": calibration}
                     for spec in args.step_caches.split(",")}
        head_calls = [0]
        pipe.dit.head.register_forward_hook(lambda *_: head_calls.__setitem__(0, head_calls[0] + 1))
        cuda = torch.device(pipe.device).type == "cuda"
        times = {name: [] for name in variants}
        calls, peak, difference, videos = {}, {}, {}, {}
        for _ in range(args.repeats):
            for name, settings in variants.items():
                kept, head_calls[0] = [], 0
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                video = next(pipe.edit_many([EditRequest(image, prompt)], steps=args.steps, cfg=args.cfg,
                                            height=args.size, width=args.size, progress=False, step_caches=kept,
                                            **settings)).video
                times[name].append(time.perf_counter() - start)
                skipped = kept[0].calls()[1] if kept else 0
                calls[name] = {"dit_calls": head_calls[0], "stack_passes": head_calls[0] - skipped}
                peak[name] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                videos.setdefault(name, video)
        for name, video in videos.items():
            difference[name] = (video - videos["uncached"]).abs().max().item()
    medians = {name: statistics.median(t) for name, t in times.items()}
    paired = {name: statistics.median(a / b for a, b in zip(t, times["uncached"])) for name, t in times.items()}
    print(f"{args.model_size} model, {args.size}x{args.size}, {args.steps} steps, cfg {args.cfg}, fp32, "
          f"median of {args.repeats} alternating edits")
    print(f"{'variant':<28}{'s/edit':>9}{'ratio':>8}{'paired':>8}{'calls':>7}{'passes':>8}{'max diff':>10}")
    for name in variants:
        print(f"{name:<28}{medians[name]:>9.3f}{medians[name] / medians['uncached']:>8.3f}{paired[name]:>8.3f}"
              f"{calls[name]['dit_calls']:>7}{calls[name]['stack_passes']:>8}{difference[name]:>10.2e}"
              + (f"  peak {peak[name]:.2f} GiB" if peak[name] is not None else ""))
    return {"model_size": args.model_size, "size": args.size, "steps": args.steps, "cfg": args.cfg,
            "seconds": times, "median": medians, "paired": paired, "calls": calls, "peak_gib": peak,
            "max_difference": difference}


def compare_context_loop(args: argparse.Namespace) -> dict:
    """The denoising loop alone (batched guidance), alternating: uncached, the context cache, and each
    ``--step-caches`` value on top of it; paired ratios to the uncached loop of the same repeat."""
    from PIL import Image

    from chronoedit_lora.step_cache import StepCache, parse_step_cache

    specs = {text: parse_step_cache(text) for text in args.step_caches.split(",") if text}
    with tempfile.TemporaryDirectory() as tmp:
        pipe = _pipeline(args, Path(tmp))
        image = Image.open(make_input(Path(tmp) / "input.png", args.size)).convert("RGB")  # as vs_diffusers_edit.py's
        with torch.no_grad():
            calibration = record_calibration(pipe, image, EDIT_PROMPT, args.steps, args.cfg) \
                if any(spec.method == "mag" for spec in specs.values()) else None
            inputs = (pipe.encode_prompt(EDIT_PROMPT), pipe.encode_prompt("") if args.cfg > 1 else None,
                      pipe.encode_image(image), pipe.condition_latents(image, 5))
        variants = {"uncached": (False, None), "context cache": (True, None)}
        variants |= {f"context + {text}": (True, spec) for text, spec in specs.items()}
        times, latents, passes = {name: [] for name in variants}, {}, {}
        for _ in range(args.repeats):
            for name, (reuse, spec) in variants.items():
                cache = StepCache(pipe.dit, spec, args.steps, calibration=calibration) if spec else None
                start = time.perf_counter()
                with torch.no_grad():
                    latents[name] = pipe.denoise(*inputs, 0, args.steps, args.cfg, None, 0, None, True, False,
                                                 reuse_context=reuse, step_cache=cache)[0]
                times[name].append(time.perf_counter() - start)
                passes[name] = cache.calls()[0] if cache else args.steps  # block-stack passes (batch-2 calls)
    paired = {name: [a / b for a, b in zip(seconds, times["uncached"])] for name, seconds in times.items()}
    difference = {name: (value - latents["uncached"]).abs().max().item() for name, value in latents.items()}
    print(f"{args.model_size} model, {args.size}x{args.size}, {args.steps} steps, cfg {args.cfg}, fp32, "
          f"denoising loop only, {args.repeats} alternating repeats")
    for name, seconds in times.items():
        print(f"{name:<30}" + " ".join(f"{t:8.2f}" for t in seconds) + f"  median {statistics.median(seconds):8.2f} s"
              f"  paired {' '.join(f'{r:.3f}' for r in paired[name])} (median {statistics.median(paired[name]):.3f})"
              f"  passes {passes[name]}/{args.steps}  max diff {difference[name]:.2e}")
    return {"model_size": args.model_size, "size": args.size, "steps": args.steps, "cfg": args.cfg, "seconds": times,
            "paired": paired, "paired_median": {name: statistics.median(r) for name, r in paired.items()},
            "stack_passes": passes, "max_difference": difference}


def _pipeline(args: argparse.Namespace, tmp: Path):
    """The float32 pipeline of ``--model``, else of ``make-tiny --size MODEL_SIZE`` written into ``tmp``."""
    from chronoedit_lora.pipeline import ChronoEditPipeline

    model = Path(args.model) if args.model else _write_checkpoint(tmp, args.model_size)
    return ChronoEditPipeline.from_pretrained(model, dtype=torch.float32)


def _write_checkpoint(folder: Path, size: str) -> Path:
    """``make-tiny --size SIZE`` into ``folder``."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "chronoedit_lora.cli", "make-tiny", str(folder / size), "--size", size],
                   check=True, capture_output=True)
    return folder / size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="eager vs compiled DiT blocks instead")
    parser.add_argument("--model-size", choices=("tiny", "mid"), default="tiny", help="with --compile or --caches")
    parser.add_argument("--caches", action="store_true", help="uncached vs context cache vs step caches instead")
    parser.add_argument("--cfg", type=float, default=5.0, help="with --caches")
    parser.add_argument("--step-caches", default="first-block:fast,tea:fast,mag:fast",
                        help="with --caches: the step caches compared (comma-separated --step-cache values)")
    parser.add_argument("--loop-only", action="store_true",
                        help="with --caches: the denoising loop alone, uncached vs context cache vs --step-caches")
    parser.add_argument("--model", help="with --caches: an existing checkpoint folder instead of make-tiny's")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.compile or args.caches:
        figures = (compare_context_loop(args) if args.caches and args.loop_only else compare_caches(args) if args.caches
                   else compare_compile(args))
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
