"""Batch edits: a CSV of (image, prompt, output[, seed]) rows, validated up front, resumed where a
stopped batch left off, and split across torchrun processes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ChronoEditError
from .files import check_writable, inside
from .settings import check_seed
from .user_files import check_regular, not_utf8, read_csv

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
    check_regular(csv_path)
    if not csv_path.is_file():
        raise ChronoEditError(f"--batch {csv_path}: file not found.")
    records, stopped = read_csv(csv_path)
    header = [name.strip() for name in records[0]] if records else []
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ChronoEditError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                              f"expected image,prompt,output[,seed], found {','.join(header) or 'nothing'}.")
    problems = [f"row {len(records) + 1}: {stopped}"] if stopped else []
    rows = []
    for number, fields in enumerate(records[1:], start=2):
        undecodable = [name for name, value in zip(header, fields) if name and not_utf8(value)]
        if undecodable:
            problems.append(f"row {number}: {', '.join(undecodable)} holds bytes that are not UTF-8; save the CSV as UTF-8")
        elif any(field.strip() for field in fields):
            rows.append((number, {name: (fields[i] if i < len(fields) else "").strip() for i, name in enumerate(header) if name}))
    folder = csv_path.parent
    jobs, outputs = [], {}
    for number, row in rows:
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
        written = Path(os.path.realpath(output))  # the file itself, however the path spells it (.., links)
        if row["output"] and written in outputs:
            problems.append(f"row {number}: output {row['output']} is the file row {outputs[written]} writes")
        outputs.setdefault(written, number)
        try:
            seed = int(row["seed"]) if row.get("seed") else default_seed
            check_seed("seed", seed)
        except ValueError:
            problems.append(f"row {number}: seed {row['seed']!r} is not a whole number")
            continue
        except ChronoEditError as exc:
            problems.append(f"row {number}: {exc}")
            continue
        if outside:
            continue
        try:
            check_writable(output, (".png",), "output")
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
