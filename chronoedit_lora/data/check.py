"""``check_dataset``: every problem of a dataset in one pass, for ``dataset check`` and the training preflight."""

from __future__ import annotations

from pathlib import Path

from .buckets import SizePolicy, plan_pair
from .checked_files import CheckedFiles
from .identity import read_rows
from .metadata import PAIR, TRAJECTORY, EditPair
from .problems import Problem, format_report, has_fatal

__all__ = ["check_dataset", "format_report", "has_fatal"]


def check_dataset(csv_path: str | Path, height: int | None = None, width: int | None = None,
                  max_pixels: int | None = None, allow_outside: bool = False,
                  checked: CheckedFiles | None = None, trajectory_max_pixels: int | None = None,
                  prompt_column: str = "", keep_prompt: str | None = None) -> list[Problem]:
    """All problems of the dataset at ``csv_path``: the CSV itself, then every row's files, each
    decoded completely the first time it is seen (catches truncation; ``checked`` remembers the
    verdicts, see :mod:`.checked_files`), then the row's fit to its training size.

    Size options, ``prompt_column`` and ``keep_prompt`` (a folder of images as identity pairs, see
    :mod:`.identity`) are as for :class:`EditPairDataset`; invalid sizes raise ChronoEditError.
    """
    policies = {PAIR: SizePolicy.create(height, width, max_pixels),
                TRAJECTORY: SizePolicy.for_trajectories(height, width, max_pixels, trajectory_max_pixels)}
    checked = checked or CheckedFiles()
    pairs, problems = read_rows(csv_path, allow_outside, prompt_column, keep_prompt)
    for pair in pairs:
        sizes, found = pair_sizes(pair, checked)
        problems += found
        if sizes:
            source, edited = sizes
            problems += plan_pair(source, edited, policies[pair.kind].target(source), pair.row, pair.columns)[1]
    checked.save()
    return problems


def pair_sizes(pair: EditPair, checked: CheckedFiles) -> tuple[tuple | None, list[Problem]]:
    """The (source, edited) sizes of a row if its files decode (a trajectory: its first and last
    frame), and the problems of its files."""
    source_column, edited_column = pair.columns
    if pair.is_trajectory:
        ends, problems = checked.trajectory(pair.input_image, pair.row, source_column)
        return (tuple(ends) if ends and not has_fatal(problems) else None), problems
    if pair.is_video:
        frames, problems = checked.video(pair.input_image, pair.row, source_column)
        return ((frames[pair.input_frame], frames[pair.edited_frame]) if len(frames) >= 2 else None), problems
    source, problems = checked.image(pair.input_image, pair.row, source_column)
    if pair.edited_image == pair.input_image:  # an identity pair: one file, reported once
        return ((source, source) if source else None), problems
    edited, edited_problems = checked.image(pair.edited_image, pair.row, edited_column)
    return ((source, edited) if source and edited else None), problems + edited_problems
