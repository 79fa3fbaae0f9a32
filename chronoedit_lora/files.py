"""Files: the containment rule (:func:`resolved_inside`, and :func:`inside` for files named by an
index or a CSV), output checks before any work, one atomic write used by every writer, images, clips.

Every file the kit writes (LoRAs, checkpoints, cache entries, images, clips, CSVs, merged and tiny
shards) goes through :func:`atomic_path`: a temporary file in the target's folder, flushed to disk,
given the permissions of a normal new file (what the umask allows, e.g. 0644 under 0022, where
``tempfile.mkstemp`` alone would leave 0600), renamed over the target, and the folder synced.
A crash or a full disk leaves either the old file or the new one, never half of one, and a failed
write is a :class:`WriteError` naming the path (:func:`writing`), never a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import IO

from PIL import Image
from safetensors import SafetensorError

from .errors import ChronoEditError

VIDEO_FPS = 8


class WriteError(ChronoEditError, OSError):
    """A file could not be written (disk full, read-only or vanished folder): one line naming the
    path. Nothing half-written is left under the file's name, and what was there is untouched."""

    def __init__(self, path: str | Path, reason: str, code: int | None = None):
        OSError.__init__(self, code or errno.EIO, reason, str(path))

    def advice(self, then: str) -> str:
        """The message, ending with what to do once the cause is fixed."""
        return (f"could not write {self.filename}: {self.strerror}. Nothing half-written was left there and the "
                f"previous file, if any, is untouched; free some space (or fix the folder), then {then}.")

    def __str__(self) -> str:
        return self.advice("run the same command again")


def _reason(exc: BaseException) -> tuple[str, int | None]:
    """The OS's words for a failed write (safetensors wraps them in its own error text)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror, exc.errno
    found = re.search(r"([^:]+) \(os error (\d+)\)", str(exc))  # "...: I/O error: No space left on device (os error 28)"
    if found:
        return found.group(1).strip(), int(found.group(2))
    return (str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__), None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OS or safetensors write failure inside the block into a :class:`WriteError` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, SafetensorError) as exc:
        reason, code = _reason(exc)
        raise WriteError(path, reason, code) from None


def resolved_inside(path: str | Path, folders: Iterable[str | Path | None]) -> Path | None:
    """``path`` with every ``..`` and every symlink resolved, if that lies inside one of ``folders``
    (resolved too; None entries are skipped), else None.

    The one containment rule: a link whose target is inside the folder is fine, one whose target is
    outside is not. The web app checks every path it serves or hands to a command with it.
    """
    resolved = Path(path).resolve()
    roots = [Path(folder).resolve() for folder in folders if folder is not None]
    return resolved if any(resolved.is_relative_to(root) for root in roots) else None


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path``, a path relative to ``folder``, stays inside ``folder`` by
    :func:`resolved_inside`: the rule for files named by an index JSON or a CSV. Absolute paths
    (``/x``, ``C:/x``) count as outside: such files are named relative to their folder.
    """
    if Path(path).is_absolute() or PureWindowsPath(path).drive:
        return False
    return resolved_inside(Path(folder) / path, [folder]) is not None


def check_writable(path: str | Path, suffixes: tuple[str, ...], flag: str = "--output") -> Path:
    """Fail early (before loading models) if ``path`` cannot be written or has the wrong type; the
    message names ``flag``, the option (or CSV column) the path came from."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ChronoEditError(f"{flag} {path}: expected a {' or '.join(suffixes)} file name.")
    if path.is_dir():
        raise ChronoEditError(f"{flag} {path} is a folder; give a file name.")
    check_writable_folder(path.parent, flag, path)
    return path


def check_writable_folder(folder: str | Path, flag: str = "--output", path: Path | None = None) -> Path:
    """Create ``folder`` if needed and fail early if it cannot be written (``flag`` names the option,
    ``path`` the file to be written in it, if any)."""
    folder = Path(folder)
    named = f"{flag} {path}: its folder {folder}" if path else f"{flag} {folder}: the folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ChronoEditError(f"{named} cannot be created ({exc.strerror}).") from None
    if not os.access(folder, os.W_OK):
        raise ChronoEditError(f"{named} is not writable; choose another {flag}.")
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
    with writing(path):
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
    """Put a fully written folder in place: give its files and folders the modes a normal write
    gives (library writers such as ``save_pretrained`` may leave 0600), sync them, rename it over
    ``final`` (removing an older ``final``), sync the parent."""
    with writing(final):
        for entry in [staging, *staging.rglob("*")]:
            if entry.is_symlink():
                continue
            os.chmod(entry, 0o777 & ~_umask() if entry.is_dir() else new_file_mode())
            if entry.is_file():
                with open(entry, "rb") as f:
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
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        try:
            yield staging
        except (OSError, SafetensorError) as exc:  # a file inside: name the folder the user asked for
            raise WriteError(path, *_reason(exc)) from None
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
    """Write frames as an H.264 MP4 (ffmpeg from imageio-ffmpeg), atomically. ffmpeg's own failure
    (a full disk, say, which it reports only in its exit status) is a :class:`WriteError`."""
    import imageio_ffmpeg

    width, height = frames[0].size
    raw = b"".join(frame.convert("RGB").tobytes() for frame in frames)
    with atomic_path(path) as tmp:
        # crf 10 is imageio's quality=8; yuv420p is what players expect
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
                   "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt",
                   "yuv420p", "-crf", "10", "-f", "mp4", str(tmp)]
        done = subprocess.run(command, input=raw, capture_output=True)
        if done.returncode:
            said = done.stderr.decode(errors="replace").strip()
            full = os.strerror(errno.ENOSPC) in said
            reason = os.strerror(errno.ENOSPC) if full else (said.splitlines() or [f"exit status {done.returncode}"])[-1]
            raise WriteError(path, f"ffmpeg: {reason}", errno.ENOSPC if full else None)
