"""Batch edits: a CSV of (image, prompt, output[, seed]) rows, validated up front, resumed where a
stopped batch left off, and split across torchrun processes."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ChronoEditError
from .files import check_writable, inside

REQUIRED = ("image", "prompt", "output")


@dataclass(frozen=True)
class EditJob:
    image: Path
    prompt: str
    output: Path
    seed: int
    row: int | None  # CSV row (header = row 1), None for a single edit


def read_batch(csv_path: str | Path, default_seed: int, allow_outside: bool = False) -> list[EditJob]:
    """Rows of an edits CSV; every problem (row and fix) is reported at once.

    ``image`` and ``output`` are relative to the CSV's folder and must stay inside it (symlinks
    resolved, see :func:`~chronoedit_lora.files.inside`) unless ``allow_outside``; a path that
    leads out is neither read nor written, not even to check it.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ChronoEditError(f"--batch {csv_path}: file not found.")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise ChronoEditError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                                  f"expected image,prompt,output[,seed], found {','.join(columns) or 'nothing'}.")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    folder = csv_path.parent
    jobs, problems, outputs = [], [], {}
    for number, row in enumerate(rows, start=2):
        image, output = folder / row["image"], folder / row["output"]
        outside = [] if allow_outside else [c for c in ("image", "output") if row[c] and not inside(row[c], folder)]
        for column in outside:
            where = ("is an absolute path" if Path(row[column]).is_absolute()
                     else f"leads to {(folder / row[column]).resolve()}")
            problems.append(f"row {number}: {column} {row[column]!r} {where}, outside the CSV's folder "
                            f"{folder.resolve()}; move the file into that folder and write its path relative to "
                            "the CSV, or pass --allow-outside")
        if "image" not in outside and (not row["image"] or not image.is_file()):
            problems.append(f"row {number}: image {row['image']!r} not found")
        if not row["prompt"]:
            problems.append(f"row {number}: empty prompt")
        if output in outputs:
            problems.append(f"row {number}: output {row['output']} is also written by row {outputs[output]}")
        outputs[output] = number
        try:
            seed = int(row["seed"]) if row.get("seed") else default_seed
        except ValueError:
            problems.append(f"row {number}: seed {row['seed']!r} is not a whole number")
            continue
        if outside:
            continue
        try:
            check_writable(output, (".png",))
        except ChronoEditError as exc:
            problems.append(f"row {number}: {exc}")
            continue
        jobs.append(EditJob(image, row["prompt"], output, seed, number))
    if problems:
        raise ChronoEditError(f"{csv_path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return jobs


@dataclass(frozen=True)
class BatchPlan:
    """What this process edits, and how many of the batch's outputs already existed."""

    todo: list[EditJob]
    done: int
    rank: int
    world: int


def plan_batch(jobs: list[EditJob], skip_existing: bool = True, split: bool = True) -> BatchPlan:
    """This process's share of ``jobs`` under torchrun (every WORLD_SIZE-th from RANK, or all of them
    unless ``split``), less the jobs whose output exists (``skip_existing``: a batch resumes).

    The whole list is split before anything is skipped: another rank may already be writing its
    outputs while this one starts, and must not change this rank's share.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    share = jobs[rank::world] if split else jobs
    done = {job.output for job in jobs if skip_existing and job.output.exists()}
    return BatchPlan([job for job in share if job.output not in done], len(done), rank, world)
