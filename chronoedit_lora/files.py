"""Files: the containment rule for files named by an index or a CSV (:func:`inside`), output checks
before any work, one atomic write used by every writer, images, clips.

Every file the kit writes (LoRAs, checkpoints, cache entries, images, CSVs, merged and tiny
shards) goes through :func:`atomic_path`: a temporary file in the target's folder, flushed to disk,
given the permissions of a normal new file (what the umask allows, e.g. 0644 under 0022, where
``tempfile.mkstemp`` alone would leave 0600), renamed over the target, and the folder synced.
A crash or a full disk leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import IO

from PIL import Image

from .errors import ChronoEditError

VIDEO_FPS = 8


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path``, a path relative to ``folder``, stays inside ``folder`` once every ``..`` and
    every symlink (in ``path`` and in ``folder``) is resolved.

    The one containment rule for files named by an index JSON or a CSV: a link whose target is
    inside the folder is fine, one whose target is outside is not. Absolute paths (``/x``, ``C:/x``)
    count as outside: such files are named relative to their folder.
    """
    if Path(path).is_absolute() or PureWindowsPath(path).drive:
        return False
    root = Path(folder).resolve()
    return (root / path).resolve().is_relative_to(root)


def check_writable(path: str | Path, suffixes: tuple[str, ...]) -> Path:
    """Fail early (before loading models) if ``path`` cannot be written or has the wrong type."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ChronoEditError(f"{path}: expected a {' or '.join(suffixes)} file name.")
    check_writable_folder(path.parent)
    return path


def check_writable_folder(folder: str | Path, flag: str = "--output") -> Path:
    """Create ``folder`` if needed and fail early if it cannot be written (``flag`` names the option)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ChronoEditError(f"Cannot create output folder {folder}: {exc.strerror}.") from None
    if not os.access(folder, os.W_OK):
        raise ChronoEditError(f"Output folder {folder} is not writable; choose another {flag}.")
    return folder


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask."""
    return 0o666 & ~_umask()


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a file name; on success it becomes
    ``path`` (see the module docstring). On error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """:func:`atomic_path` for a writer that takes an open file."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def replace_folder(staging: Path, final: Path) -> None:
    """Put a fully written folder in place: sync its files, rename it over ``final`` (removing an
    older ``final``), sync the parent."""
    for file in (p for p in staging.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A staging folder beside ``path`` for a writer that fills a whole folder (``save_pretrained``);
    on success it becomes ``path``, on error it is removed. ``path`` must not exist or be empty."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # what mkdir would give, not mkdtemp's 0700
        yield staging
        replace_folder(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def copy_file(source: str | Path, target: str | Path) -> None:
    """Copy a (small) file's bytes to ``target`` atomically."""
    with atomic_write(target) as f:
        f.write(Path(source).read_bytes())


def save_image(image: Image.Image, path: str | Path) -> None:
    """Write an image atomically, in the format its suffix names."""
    path = Path(path)
    with atomic_write(path) as f:
        image.save(f, format=Image.registered_extensions()[path.suffix.lower()])


def save_video(frames: list[Image.Image], path: str | Path, fps: int = VIDEO_FPS) -> None:
    """Write frames as an H.264 MP4 (through imageio-ffmpeg), atomically."""
    import imageio.v2 as imageio
    import numpy as np

    with atomic_path(path) as tmp:
        with imageio.get_writer(str(tmp), format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(np.asarray(frame.convert("RGB")))
