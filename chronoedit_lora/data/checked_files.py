"""What the dataset check learnt about each file, remembered so a rerun (or ``--resume``) does not
decode it again.

A file's verdict (its upright size, or its frames' sizes, and the problems found) is kept in
``checked-files.json`` under the user's cache folder (``$CHRONOEDIT_LORA_CACHE``, else
``$XDG_CACHE_HOME/chronoedit-lora``, else ``~/.cache/chronoedit-lora``), keyed by the file's
resolved path, size and modification time (a trajectory's frame folder: those of every frame),
and the check's version: any change to the file, or to how files are checked, makes it be checked
again. Files are still decoded completely the first
time, since only a full decode finds a truncated image. The file is derived state: entries that
are not of the form this module writes are dropped (said once), and the file is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..files import write_text
from .images import read_image, read_video_frames
from .problems import Problem
from .trajectories import check_trajectory, frame_files

CHECK_VERSION = 2  # bump when what read_image / read_video_frames / check_trajectory report changes
FILE_NAME = "checked-files.json"
MAX_ENTRIES = 200_000  # oldest forgotten first; ~100 bytes each


def cache_folder() -> Path:
    """Where the kit keeps per-user caches."""
    if os.environ.get("CHRONOEDIT_LORA_CACHE"):
        return Path(os.environ["CHRONOEDIT_LORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chronoedit-lora"


class CheckedFiles:
    """Verdicts by file; :meth:`save` writes the new ones (best effort: an unwritable cache only
    means the next check decodes again)."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_folder() / FILE_NAME
        self.hits = self.misses = 0
        self.entries: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        """The remembered verdicts that have the form :meth:`_verdict` writes; the rest is dropped."""
        try:
            found = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError:  # none yet, or an unusable cache folder: nothing remembered
            return {}
        except ValueError:
            found = None
        entries = {key: entry for key, entry in found.items() if _well_formed(entry)} if isinstance(found, dict) else {}
        if found is None or not isinstance(found, dict) or len(entries) < len(found):
            print(f"note: {self.path} was damaged or written by something else; its unreadable entries were dropped "
                  "(those files are checked again).")
            self.misses += 1  # rewrite it at save()
        return entries

    def image(self, path: Path, row: int, column: str) -> tuple[tuple[int, int] | None, list[Problem]]:
        """The upright size of the image at ``path`` (None if unreadable) and its problems."""
        def check() -> dict:
            image, problems = read_image(path, row, column)
            return {"sizes": [list(image.size)] if image else [], "problems": problems}

        sizes, problems = self._verdict(path, row, column, check)
        return (tuple(sizes[0]) if sizes else None), problems

    def video(self, path: Path, row: int, column: str) -> tuple[list[tuple[int, int]], list[Problem]]:
        """The sizes of a pair video's first frames and its problems."""
        def check() -> dict:
            frames, problems = read_video_frames(path, row, column)
            return {"sizes": [list(frame.size) for frame in frames], "problems": problems}

        sizes, problems = self._verdict(path, row, column, check)
        return [tuple(size) for size in sizes], problems

    def trajectory(self, path: Path, row: int, column: str) -> tuple[list[tuple[int, int]], list[Problem]]:
        """A trajectory's (first, last) frame sizes and its problems."""
        def check() -> dict:
            sizes, problems = check_trajectory(path, row, column)
            return {"sizes": [list(size) for size in sizes], "problems": problems}

        sizes, problems = self._verdict(path, row, column, check)
        return [tuple(size) for size in sizes], problems

    def _verdict(self, path: Path, row: int, column: str, check) -> tuple[list, list[Problem]]:
        key = self._key(path)
        entry = self.entries.get(key) if key else None
        if entry is None:
            self.misses += 1
            found = check()
            entry = {"sizes": found["sizes"], "problems": [[p.reason, p.fix, p.fatal] for p in found["problems"]]}
            if key:
                self.entries[key] = entry
        else:
            self.hits += 1
            self.entries[key] = self.entries.pop(key)  # most recently used last
        return entry["sizes"], [Problem(row, column, reason, fix, fatal) for reason, fix, fatal in entry["problems"]]

    @staticmethod
    def _key(path: Path) -> str | None:
        try:
            if path.is_dir():  # a frame folder: every frame's name, size and time, in one digest
                stats = [(p.name, (s := p.stat()).st_size, s.st_mtime_ns) for p in frame_files(path)]
                return f"v{CHECK_VERSION}:{path.resolve()}/:{hashlib.sha256(repr(stats).encode()).hexdigest()}"
            stat = path.stat()
        except OSError:
            return None  # missing: nothing to remember
        return f"v{CHECK_VERSION}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    def save(self) -> None:
        """Write the verdicts if anything changed (best effort, see the class)."""
        if not self.misses:
            return
        kept = dict(list(self.entries.items())[-MAX_ENTRIES:])
        try:
            write_text(self.path, json.dumps(kept))
        except OSError:
            pass  # a read-only home: checks are simply not remembered


def _well_formed(entry: object) -> bool:
    """``{"sizes": [[w, h], ...], "problems": [[reason, fix, fatal], ...]}``, as :meth:`CheckedFiles._verdict` writes."""
    if not isinstance(entry, dict) or set(entry) != {"sizes", "problems"}:
        return False
    sizes, problems = entry["sizes"], entry["problems"]
    return (isinstance(sizes, list) and isinstance(problems, list)
            and all(isinstance(s, list) and len(s) == 2 and all(type(v) is int and v > 0 for v in s) for s in sizes)
            and all(isinstance(p, list) and len(p) == 3 and isinstance(p[0], str) and isinstance(p[1], str)
                    and isinstance(p[2], bool) for p in problems))
