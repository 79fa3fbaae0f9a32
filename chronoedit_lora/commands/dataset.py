"""Prepare (`dataset prepare`) and check (`dataset check`) datasets of edit pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import check_dataset, format_report, has_fatal
from ..errors import ChronoEditError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="report every problem (row, column, reason, fix); exit 1 if any is fatal")
    check.add_argument("dataset", help="metadata.csv, or the folder holding it")
    check.add_argument("--height", type=int, help="fixed training height (with --width)")
    check.add_argument("--width", type=int, help="fixed training width (with --height)")
    check.add_argument("--max-pixels", type=int, help="aspect-bucket pixel budget instead of a fixed size "
                                                      "(default 1024x1024)")
    check.add_argument("--allow-outside", action="store_true", help="allow paths outside the CSV's folder")
    prep = sub.add_parser("prepare", help="write metadata.csv from before/ + after/ folders, NAME_before/NAME_after "
                                          "files or 2-frame MP4s")
    prep.add_argument("source", help="folder holding the pairs")
    prep.add_argument("--output", help="CSV to write, or its folder (default: SOURCE/metadata.csv)")
    prep.add_argument("--prompt", help="the same instruction for every pair")
    prep.add_argument("--prompt-template", help='instruction with {style} and {name} filled in per pair, e.g. '
                                                '"The user wants to transform the image into {style} style ..."')
    prep.add_argument("--style", help="fills {style} in the template")
    prep.add_argument("--captioner", metavar="MODULE:CALLABLE",
                      help="writes the prompts of pairs without a .txt file: f(before, after, hint) -> str, hint = the "
                           "--prompt or filled template (e.g. chronoedit_lora.captioners.qwen_vl:caption)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing CSV")


def resolve_csv(path: str | Path) -> Path:
    """``path`` if it is a CSV, ``path/metadata.csv`` if it is a folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "metadata.csv").is_file():
            raise ChronoEditError(f"{path} has no metadata.csv; write one with `chronoedit-lora dataset prepare {path}`.")
        return path / "metadata.csv"
    if not path.is_file():
        raise ChronoEditError(f"{path}: no such metadata CSV or folder.")
    return path


def run(args: argparse.Namespace) -> int:
    return _prepare(args) if args.dataset_command == "prepare" else _check(args)


def _prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import ensure_writable, prepare, resolve_output, write_metadata
    from ..plugins import load_callable

    source = Path(args.source)
    if not source.is_dir():
        raise ChronoEditError(f"{source}: no such folder.")
    csv_path = resolve_output(source, args.output)
    ensure_writable(csv_path, args.overwrite)  # before any captioning, which can take hours
    captioner = load_callable(args.captioner) if args.captioner else None
    result = prepare(source, csv_path, args.prompt, args.prompt_template, args.style, captioner, progress=True)
    write_metadata(result.rows, csv_path, args.overwrite)
    print(f"wrote {csv_path}: {len(result.rows)} pairs ({result.layout}; columns {','.join(result.rows[0])})")
    print("prompts: " + ", ".join(f"{count} from {origin}" for origin, count in result.prompt_sources.most_common()))
    if result.skipped:
        print(f"left out ({len(result.skipped)}):")
        print("\n".join(f"  {line}" for line in result.skipped))
    if any(value.startswith("../") for row in result.rows for key, value in row.items() if key != "prompt"):
        print("note: paths lead outside the CSV's folder; check and train with allow_outside (--allow-outside), "
              "or write the CSV next to the pairs.")
    print(f"next: chronoedit-lora dataset check {csv_path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    if args.max_pixels is not None and (args.height is not None or args.width is not None):
        raise ChronoEditError("give --height/--width for a fixed size or --max-pixels for aspect buckets, not both.")
    csv_path = resolve_csv(args.dataset)
    problems = check_dataset(csv_path, args.height, args.width, args.max_pixels, args.allow_outside)
    print(f"{csv_path}:")
    print(format_report(problems))
    return 1 if has_fatal(problems) else 0
