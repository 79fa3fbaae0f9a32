"""The web app's edit history: one folder per edit holding the input, the edit, its clip and a
``settings.json`` sidecar (every setting, the LoRAs, and the equivalent ``chronoedit-lora edit``
command)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..files import resolved_inside, save_image, save_video, write_text

SIDECAR = "settings.json"
EDIT, INPUT, CLIP = "edit.png", "input.png", "clip.mp4"


@dataclass(frozen=True)
class Entry:
    """One saved edit."""

    folder: Path

    @property
    def edit(self) -> Path:
        return self.folder / EDIT

    @property
    def clip(self) -> Path:
        return self.folder / CLIP

    def settings(self) -> dict:
        return json.loads((self.folder / SIDECAR).read_text())


def save(history: Path, source: Image.Image, frames: list[Image.Image]) -> Entry:
    """Write one edit's images (the edit is the last of ``frames``) into a new folder of ``history``;
    :func:`write_settings` completes it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = history / stamp
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = history / f"{stamp}-{suffix}"
    folder.mkdir(parents=True)
    entry = Entry(folder)
    save_image(source, folder / INPUT)
    save_image(frames[-1], entry.edit)
    save_video(frames, entry.clip)
    return entry


def write_settings(entry: Entry, settings: dict) -> None:
    """The sidecar, written last: a folder with one holds a complete edit."""
    write_text(entry.folder / SIDECAR, json.dumps(settings, indent=2))


def entries(history: Path, limit: int = 60) -> list[Entry]:
    """Complete saved edits, newest first (an entry whose files are links leading out of ``history`` is
    left out: the page never shows them)."""
    if not history.is_dir():
        return []
    found = [Entry(p.parent) for p in history.glob(f"*/{SIDECAR}") if (p.parent / EDIT).is_file()
             and all(resolved_inside(path, [history]) for path in (p, p.parent / EDIT))]
    return sorted(found, key=lambda e: (e.folder / SIDECAR).stat().st_mtime, reverse=True)[:limit]
