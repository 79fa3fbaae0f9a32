"""``check_dataset``: every problem of a dataset in one pass, for ``dataset check`` and the training preflight."""

from __future__ import annotations

from pathlib import Path

from .buckets import SizePolicy, plan_pair
from .images import load_pair
from .metadata import read_metadata
from .problems import Problem, format_report, has_fatal

__all__ = ["check_dataset", "format_report", "has_fatal"]


def check_dataset(csv_path: str | Path, height: int | None = None, width: int | None = None,
                  max_pixels: int | None = None, allow_outside: bool = False) -> list[Problem]:
    """All problems of the dataset at ``csv_path``: the CSV itself, then every pair's files, each
    decoded completely (catches truncation), then the pair's fit to its training size.

    Size options are as for :class:`EditPairDataset`; invalid ones raise ChronoEditError.
    """
    policy = SizePolicy.create(height, width, max_pixels)
    pairs, problems = read_metadata(csv_path, allow_outside)
    for pair in pairs:
        images = load_pair(pair)
        problems += images.problems
        if images.ok:
            target = policy.target(images.source.size)
            problems += plan_pair(images.source.size, images.edited.size, target, pair.row, pair.columns)[1]
    return problems
