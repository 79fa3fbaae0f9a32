"""Calibrate the step cache on held-out edits: uncached edits record, per step, the block stack's
residual-magnitude ratio (MagCache) and the timestep modulation's change against the residual's
(TeaCache's polynomial), written as a small JSON for `edit --step-cache ... --cache-calibration`.

With --check, each setting (default: every method's slow and fast preset) edits the same rows and
is scored against the uncached edits: calls saved, PSNR, SSIM (LPIPS with --lpips), as a table and
a plot beside the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.buckets import DEFAULT_MAX_PIXELS
from ..errors import ChronoEditError
from ..files import atomic_write, check_writable
from ..lora import parse_lora_spec
from ..settings import check_range
from ..step_cache import METHODS, PRESETS, StepCacheSpec, check_skippable, parse_step_cache
from .edit import check_sampling, sampling_settings
from .eval import add_sampling_arguments, held_out_items
from .model_args import add_model_arguments, model_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="LoRA fused into the DiT for the calibration (repeatable): calibrate what you edit with")
    parser.add_argument("--dataset", required=True, help="CSV of held-out pairs in the dataset format")
    parser.add_argument("--count", type=int, help="use the CSV's first COUNT rows only (default: all)")
    parser.add_argument("--height", type=int, help="fixed size of the edits (with --width)")
    parser.add_argument("--width", type=int, help="fixed width (with --height)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="pixel budget of the aspect buckets without --height/--width")
    parser.add_argument("--allow-outside", action="store_true", help="allow dataset paths outside the CSV's folder")
    parser.add_argument("--output", required=True, help="the calibration JSON to write")
    add_sampling_arguments(parser)  # calibrate with the steps, cfg, shift and sampler the edits will use
    parser.add_argument("--check", nargs="?", const="presets", metavar="SETTINGS",
                        help="also score cached edits against the uncached ones: comma-separated --step-cache "
                             "values (default: " + ", ".join(f"{m}:{p}" for m in METHODS for p in PRESETS[m]) + ")")
    parser.add_argument("--lpips", metavar="DIR", help="with --check: LPIPS from a local folder (as eval --lpips)")


def check_specs(value: str | None, steps: int) -> list[StepCacheSpec]:
    """The --check settings, each checked against the schedule."""
    if value is None:
        return []
    names = [f"{m}:{p}" for m in METHODS for p in PRESETS[m]] if value == "presets" else value.split(",")
    specs = [parse_step_cache(name.strip(), "--check") for name in names]
    for spec in specs:  # mag's calibration is the one being written, for these steps
        check_skippable(spec, steps, 0, "--check")
    return specs


def run(args: argparse.Namespace) -> int:
    settings = sampling_settings(args)
    check_sampling(args, settings)
    check_range("--max-pixels", args.max_pixels, 16 * 16)
    if args.count is not None:
        check_range("--count", args.count, 1)
    output = check_writable(args.output, (".json",))
    specs = check_specs(args.check, settings["steps"])
    loras = [parse_lora_spec(v) for v in args.lora]
    from ..eval.runner import MetricFolders

    MetricFolders(Path(args.lpips) if args.lpips else None, None, None, None).check()
    items = held_out_items(args)
    if any(item["kind"] != "pair" for item in items):
        raise ChronoEditError(f"--dataset {args.dataset}: calibrate-cache uses image pairs; trajectory rows are "
                              "edited in temporal reasoning throughout, where no step may be skipped. Remove them.")

    from ..eval.cache_check import check_plot, check_settings, check_table
    from ..eval.held_out import EditSettings, edit_pair, encode_pairs, negative_embedding
    from ..pipeline import ChronoEditPipeline
    from ..step_cache import StepCache, calibration_from

    pipe = ChronoEditPipeline.from_pretrained(**model_options(args))
    for path, scale in loras:
        pipe.load_lora(path, scale)
    edit_settings = EditSettings(steps=settings["steps"], cfg=settings["cfg"], shift=settings["shift"],
                                 scheduler=args.scheduler, seed=args.seed, negative_prompt=args.negative_prompt)
    pairs = encode_pairs(pipe, items, 0, args.seed)
    negative = negative_embedding(pipe, edit_settings)
    recorders = [StepCache(pipe.dit, None, settings["steps"], record=True) for _ in pairs]
    uncached = [edit_pair(pipe, pair, edit_settings, negative, recorder) for pair, recorder in zip(pairs, recorders)]
    about = {"model": str(args.model), "loras": args.lora, "dataset": str(args.dataset), "rows": len(pairs),
             "cfg": settings["cfg"], "shift": settings["shift"], "scheduler": args.scheduler or pipe.default_scheduler,
             "sizes": sorted({f"{p.source.width}x{p.source.height}" for p in pairs}), "dtype": args.dtype}
    calibration = calibration_from(recorders, about)
    with atomic_write(output, "w") as handle:
        json.dump(calibration.to_json(), handle, indent=1)
    print(f"wrote {output} ({settings['steps']} steps, {len(pairs)} edits)")
    if specs:
        lpips = None
        if args.lpips:
            from ..eval.lpips import Lpips

            lpips = Lpips(args.lpips)
        rows = check_settings(pipe, pairs, edit_settings, negative, calibration, uncached, specs, lpips)
        print(check_table(rows))
        print(f"wrote {check_plot(rows, output.with_name(output.stem + '-check.png'))}")
    return 0
