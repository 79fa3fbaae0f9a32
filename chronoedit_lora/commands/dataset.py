"""Check a dataset of edit pairs (`dataset check`): every problem in one pass, before training."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import check_dataset, format_report, has_fatal
from ..errors import ChronoEditError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="report every problem (row, column, reason, fix); exit 1 if any is fatal")
    check.add_argument("dataset", help="metadata.csv, or the folder holding it")
    check.add_argument("--height", type=int)
    check.add_argument("--width", type=int)
    check.add_argument("--max-pixels", type=int, help="aspect-bucket pixel budget (default 1024x1024)")
    check.add_argument("--allow-outside", action="store_true", help="allow paths outside the CSV's folder")


def resolve_csv(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.csv"
    if not path.is_file():
        raise ChronoEditError(f"{path}: no such metadata CSV.")
    return path


def run(args: argparse.Namespace) -> int:
    csv_path = resolve_csv(args.dataset)
    problems = check_dataset(csv_path, args.height, args.width, args.max_pixels, args.allow_outside)
    print(f"{csv_path}:")
    print(format_report(problems))
    return 1 if has_fatal(problems) else 0
