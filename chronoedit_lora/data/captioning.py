"""Caption the pairs ``dataset prepare`` found without a prompt: in batches, with a progress bar, each
batch's results appended to a progress file beside the CSV (``NAME.captions.jsonl``), so that a
rerun, or a run after a crash, skips the pairs already captioned.

The progress file holds one JSON object per line: ``{"pair": KEY, "caption": ..., "caption_cot": ...}``
for a :class:`~chronoedit_lora.captioners.Caption`, ``{"pair": KEY, "prompt": ...}`` for a captioner
that returns one prompt. A line cut short by a crash is ignored (that pair is captioned again).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..captioners import Caption
from ..plugins import Plugin

Result = Caption | str


@dataclass(frozen=True)
class CaptionJob:
    """A pair to caption: ``key`` names it in the progress file (its paths, as the CSV writes them)."""

    key: str
    images: Callable[[], tuple[Image.Image, Image.Image]]  # loads (before, after) when its batch comes


def progress_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.stem + ".captions.jsonl")


def read_progress(path: Path) -> dict[str, Result]:
    """The results saved so far, by pair key (the last line of a pair wins)."""
    done: dict[str, Result] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            key = entry.pop("pair")
            done[key] = entry["prompt"] if "prompt" in entry else Caption(**entry)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue  # a line cut short by a crash
    return done


def _ends_with_newline(path: Path) -> bool:
    """Whether the file's last byte is a newline (read alone: the file grows with every batch)."""
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _append(path: Path, results: list[tuple[str, Result]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not _ends_with_newline(path)
    with path.open("a", encoding="utf-8") as f:
        if torn:  # end the line a crash cut short, so that it alone is lost
            f.write("\n")
        for key, result in results:
            entry = {"prompt": result} if isinstance(result, str) else asdict(result)
            f.write(json.dumps({"pair": key, **entry}, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def caption_pairs(jobs: Sequence[CaptionJob], captioner: Plugin, progress: Path, batch_size: int = 1,
                  keep_unchanged: bool = False) -> dict[str, Result]:
    """Every job's result, from ``progress`` when it is there, else from ``captioner`` (through its
    ``caption_batch`` if it has one, ``batch_size`` pairs at a time). With ``keep_unchanged``, a
    ``no change`` pair also gets its detailed prompt (one saved without it is captioned again)."""
    done = read_progress(progress)
    missing = [job for job in jobs if job.key not in done
               or (keep_unchanged and isinstance(done[job.key], Caption) and done[job.key].unchanged
                   and not done[job.key].caption_cot)]
    if len(missing) < len(jobs):
        print(f"{progress}: {len(jobs) - len(missing)} pairs already captioned, {len(missing)} to caption")
    batched = getattr(captioner, "caption_batch", None)
    with tqdm(total=len(missing), desc="captioning", unit="pair", disable=not missing) as bar:
        for start in range(0, len(missing), batch_size):
            group = missing[start:start + batch_size]
            pairs = [job.images() for job in group]
            about = [f"pair {job.key.replace('|', ' -> ')}" for job in group]
            results = batched(pairs, keep_unchanged, about=", ".join(about)) if batched else \
                [captioner(*pair, None, about=name) for pair, name in zip(pairs, about)]
            _append(progress, [(job.key, result) for job, result in zip(group, results)])
            done.update((job.key, result) for job, result in zip(group, results))
            bar.update(len(group))
    return {job.key: done[job.key] for job in jobs}
