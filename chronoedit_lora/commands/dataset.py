"""Prepare (`dataset prepare`) and check (`dataset check`) datasets of edit pairs and trajectories."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import check_dataset, format_report, has_fatal
from ..errors import ChronoEditError, listing
from ..settings import check_range
from ..user_files import check_regular


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="report every problem (row, column, reason, fix); exit 1 if any is fatal")
    check.add_argument("dataset", help="metadata.csv, or the folder holding it, or a training config (.toml): every "
                                       "dataset it trains on, each with its own size and prompt settings, and its "
                                       "preservation_dataset")
    check.add_argument("--height", type=int)
    check.add_argument("--width", type=int)
    check.add_argument("--max-pixels", type=int, help="aspect-bucket pixel budget (default 1024x1024)")
    check.add_argument("--trajectory-max-pixels", type=int,
                       help="trajectory rows' pixel budget (default: a quarter of the pairs')")
    check.add_argument("--allow-outside", action="store_true", help="allow paths outside the CSV's folder")
    check.add_argument("--prompt-column", default="", help="the column trained on (default: a row's caption_cot if "
                                                           "filled, else its prompt), as the prompt_column setting")
    prep = sub.add_parser("prepare", help="write metadata.csv from before/ + after/ folders, NAME_before/NAME_after "
                                          "files or 2-frame MP4s, plus trajectories (longer videos, frame folders)")
    prep.add_argument("source", help="folder holding the pairs and/or trajectories")
    prep.add_argument("--output", help="CSV to write (default: SOURCE/metadata.csv)")
    prep.add_argument("--prompt", help="the same instruction for every pair")
    prep.add_argument("--prompt-template", help="placeholders {style} and {name} (the pair's name), e.g. "
                                                '"The user wants to transform the image into {style} style ..."')
    prep.add_argument("--style", default="", help="fills {style} in the template (needed when it uses {style})")
    prep.add_argument("--captioner", metavar="MODULE:CALLABLE",
                      help="fills missing prompts: f(before, after, hint) -> str, or both prompts of the original "
                           "release's labelling (caption and caption_cot columns), e.g. "
                           "chronoedit_lora.captioners.qwen_vl:caption")
    prep.add_argument("--caption-batch-size", type=int, default=4, help="pairs captioned per model call")
    prep.add_argument("--keep-unchanged", action="store_true",
                      help="keep pairs the captioner calls 'no change' (as edits that keep the image)")
    prep.add_argument("--degrade", action="append", default=[], metavar="GENERATOR",
                      help="SOURCE holds finished images: pair each with a degraded copy as the input (repeatable): "
                           "downscale[:FACTOR], jpeg[:QUALITY], blur[:RADIUS], noise[:SIGMA], grayscale, "
                           "mask[:AREA_SHARE], or a plugin MODULE:CALLABLE f(image, seed) -> image; each built-in has "
                           "its own instruction (--prompt / --prompt-template win)")
    prep.add_argument("--seed", type=int, default=0, help="with --degrade: the seed of every random choice (the same "
                                                         "seed writes the same bytes)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing CSV")


def resolve_csv(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.csv"
    check_regular(path)
    if not path.is_file():
        raise ChronoEditError(f"{path}: no such metadata CSV.")
    return path


def run(args: argparse.Namespace) -> int:
    return _prepare(args) if args.dataset_command == "prepare" else _check(args)


def _prepare(args: argparse.Namespace) -> int:
    from ..data.captioning import progress_path
    from ..data.prepare import check_output, prepare, write_metadata
    from ..plugins import load_callable

    source = Path(args.source)
    if not source.is_dir():
        raise ChronoEditError(f"{source}: no such folder.")
    csv_path = Path(args.output) if args.output else source / "metadata.csv"
    check_range("--caption-batch-size", args.caption_batch_size, 1)
    check_output(csv_path, args.overwrite)
    if args.degrade:
        return _prepare_degraded(args, source, csv_path)
    captioner = load_callable(args.captioner) if args.captioner else None
    result = prepare(source, csv_path, args.prompt, args.prompt_template, args.style, captioner,
                     args.caption_batch_size, args.keep_unchanged)
    write_metadata(result.rows, csv_path, args.overwrite)
    pairs = len(result.rows) - result.trajectories
    print(f"{csv_path}: {pairs} pairs ({result.layout})" + (f", {result.trajectories} trajectories" if result.trajectories else ""))
    for line in result.unmatched:
        print(f"  unmatched: {line}")
    if result.unchanged:
        print(f"  no change: {listing('pair(s) left out (--keep-unchanged keeps them)', result.unchanged)}")
    if captioner is not None:
        print(f"  captions: {progress_path(csv_path)} (a rerun skips the pairs it holds)")
    _note_outside(result.rows)
    return 0


def _note_outside(rows: list[dict[str, str]]) -> None:
    if any(value.startswith("../") for row in rows for value in row.values()):
        print("  note: paths lead outside the CSV's folder; train with allow_outside = true, or write the CSV "
              "next to the pairs.")


def _prepare_degraded(args: argparse.Namespace, source: Path, csv_path: Path) -> int:
    """``--degrade``: pairs from the finished images in ``source``, every generator checked first."""
    from ..data.degrade import parse_generator
    from ..data.prepare import prepare_degraded, write_metadata
    from ..settings import check_seed

    if args.captioner:
        raise ChronoEditError("--captioner with --degrade: the degraded pairs take their generators' instructions "
                              "(or --prompt / --prompt-template); drop one of the two.")
    check_seed("--seed", args.seed)
    generators = [parse_generator(spec) for spec in args.degrade]
    result = prepare_degraded(source, csv_path, generators, args.seed, args.prompt, args.prompt_template, args.style)
    write_metadata(result.rows, csv_path, args.overwrite)
    print(f"{csv_path}: {len(result.rows)} pairs ({result.layout}); degraded copies in "
          f"{csv_path.parent / 'degraded'}")
    _note_outside(result.rows)
    return 0


def _check(args: argparse.Namespace) -> int:
    if Path(args.dataset).suffix.lower() == ".toml":  # every dataset a training config trains on, as training reads it
        from ..train.loop.config import dataset_specs, load_config

        config = load_config(args.dataset, {})
        checks = [(spec.csv, spec.height, spec.width, spec.max_pixels, config.allow_outside,
                   config.trajectory_max_pixels, spec.prompt_column) for spec in dataset_specs(config)]
    else:
        checks, config = [(resolve_csv(args.dataset), args.height, args.width, args.max_pixels, args.allow_outside,
                           args.trajectory_max_pixels, args.prompt_column)], None
    reports = [(csv_path, check_dataset(csv_path, height, width, max_pixels, allow_outside,
                                        trajectory_max_pixels=trajectory_max_pixels, prompt_column=prompt_column))
               for csv_path, height, width, max_pixels, allow_outside, trajectory_max_pixels, prompt_column in checks]
    if config is not None and config.preservation_dataset:  # a CSV, or a folder of images as identity pairs
        from ..train.loop.data import preservation_problems

        reports.append((config.preservation_dataset, preservation_problems(config)))
    fatal = False
    for csv_path, problems in reports:
        print(f"{csv_path}:")
        print(format_report(problems))
        fatal = fatal or has_fatal(problems)
    return 1 if fatal else 0
