"""Writing results: output-path checks up front, atomic image saves, MP4 clips."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image

from .errors import ChronoEditError

VIDEO_FPS = 8


def check_writable(path: str | Path, suffixes: tuple[str, ...]) -> Path:
    """Fail early (before loading models) if ``path`` cannot be written or has the wrong type."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ChronoEditError(f"{path}: expected a {' or '.join(suffixes)} file name.")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ChronoEditError(f"Cannot create output folder {folder}: {exc.strerror}.") from None
    if not os.access(folder, os.W_OK):
        raise ChronoEditError(f"Output folder {folder} is not writable; choose another --output.")
    return path


def save_image(image: Image.Image, path: str | Path) -> None:
    """Write an image atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=Image.registered_extensions()[path.suffix.lower()])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_video(frames: list[Image.Image], path: str | Path, fps: int = VIDEO_FPS) -> None:
    """Write frames as an H.264 MP4 (through imageio-ffmpeg)."""
    import imageio.v2 as imageio
    import numpy as np

    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame.convert("RGB")))
