"""``check_dataset``: every problem of a dataset in one pass, for ``dataset check`` and the training preflight."""

from __future__ import annotations

from pathlib import Path

from .buckets import SizePolicy, plan_pair
from .checked_files import CheckedFiles
from .metadata import EditPair, read_metadata
from .problems import Problem, format_report, has_fatal

__all__ = ["check_dataset", "format_report", "has_fatal"]


def check_dataset(csv_path: str | Path, height: int | None = None, width: int | None = None,
                  max_pixels: int | None = None, allow_outside: bool = False,
                  checked: CheckedFiles | None = None) -> list[Problem]:
    """All problems of the dataset at ``csv_path``: the CSV itself, then every pair's files, each
    decoded completely the first time it is seen (catches truncation; ``checked`` remembers the
    verdicts, see :mod:`.checked_files`), then the pair's fit to its training size.

    Size options are as for :class:`EditPairDataset`; invalid ones raise ChronoEditError.
    """
    policy = SizePolicy.create(height, width, max_pixels)
    checked = checked or CheckedFiles()
    pairs, problems = read_metadata(csv_path, allow_outside)
    for pair in pairs:
        sizes, found = pair_sizes(pair, checked)
        problems += found
        if sizes:
            source, edited = sizes
            problems += plan_pair(source, edited, policy.target(source), pair.row, pair.columns)[1]
    checked.save()
    return problems


def pair_sizes(pair: EditPair, checked: CheckedFiles) -> tuple[tuple | None, list[Problem]]:
    """The (source, edited) sizes of a pair if both decode, and the problems of its files."""
    source_column, edited_column = pair.columns
    if pair.is_video:
        frames, problems = checked.video(pair.input_image, pair.row, source_column)
        return ((frames[pair.input_frame], frames[pair.edited_frame]) if len(frames) >= 2 else None), problems
    source, problems = checked.image(pair.input_image, pair.row, source_column)
    edited, edited_problems = checked.image(pair.edited_image, pair.row, edited_column)
    return ((source, edited) if source and edited else None), problems + edited_problems
