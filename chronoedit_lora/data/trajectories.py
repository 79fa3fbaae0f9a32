"""Trajectory rows: a video, or a folder of numbered frames, of an edit happening (a sketch being
drawn, an object moving, a time-lapse) whose first frame is the input and last frame the edit.

A trajectory trains ChronoEdit's temporal-reasoning clip of 29 frames (8 latents). Resampling rule:
clip frame ``i`` (0..28) is source frame ``floor(i * (N - 1) / 28 + 1/2)`` of the ``N`` source
frames, i.e. evenly spaced nearest frames (a tie goes to the later frame), so the first and the
last frame are kept exactly; a trajectory of fewer than 29 frames holds frames, a longer one skips
them. Fewer than 3 frames is refused: two frames are an edit pair. A frame folder's frames are its
image files, each named by its number (``00.png``, ``2.png``, ``frame_0010.png``: the same prefix,
digits last), in numeric order, and all must have one size. Names that are not numbers (``first.png``,
``end.png``) are refused rather than sorted as words, which could run a clip backwards.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..video import REASONING_FRAMES
from .images import IMAGE_SUFFIXES, VIDEO_ERRORS, error_text, file_problem, image_size, read_image
from .problems import Problem

MIN_FRAMES = 3


def resample_indices(count: int, frames: int = REASONING_FRAMES) -> list[int]:
    """The source frame of each of ``frames`` clip frames, for a trajectory of ``count`` frames."""
    return [(2 * i * (count - 1) + frames - 1) // (2 * (frames - 1)) for i in range(frames)]


def frame_files(folder: Path) -> list[Path]:
    """A frame folder's image files in natural order (numbers compared as numbers)."""
    def natural(path: Path) -> list:
        return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]

    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=natural)


def misnumbered_frames(files: list[Path]) -> list[str]:
    """The frames whose names do not give their place: no number at the end of the name, another
    prefix than the rest's, or a number another frame has too."""
    numbered = {file.name: re.fullmatch(r"(.*?)(\d+)", file.stem) for file in files}
    prefixes = [match.group(1).lower() for match in numbered.values() if match]
    common = max(set(prefixes), key=prefixes.count) if prefixes else None
    numbers = [int(match.group(2)) for match in numbered.values() if match]
    return [name for name, match in numbered.items()
            if not match or match.group(1).lower() != common or numbers.count(int(match.group(2))) > 1]


def first_frame_size(path: Path, row: int, column: str) -> tuple[tuple[int, int] | None, list[Problem]]:
    """Upright (width, height) of a trajectory's first frame (a folder: from the file header)."""
    if path.is_dir():
        files = frame_files(path)
        if not files:
            return None, [_no_frames(path, row, column)]
        return image_size(files[0], row, column)
    frames, _, problems = _video_frames(path, row, column, wanted={0})
    return (frames[0].size if frames else None), problems


def check_trajectory(path: Path, row: int, column: str) -> tuple[list[tuple[int, int]], list[Problem]]:
    """Decode every frame: the (first, last) frame sizes and the problems (too short, undecodable
    frames, frames whose size differs from the first)."""
    if path.is_dir():
        files = frame_files(path)
        if not files:
            return [], [_no_frames(path, row, column)]
        sizes, problems = [], []
        for file in files:
            image, found = read_image(file, row, column)
            problems += _in_folder(path, found)
            sizes.append(image.size if image else None)
        problems += _size_changes(path, files, sizes, row, column)
        known = [size for size in sizes if size]
        count = len(files)
    else:  # a video's frames all have the stream's size
        frames, count, problems = _video_frames(path, row, column, wanted={0}, read_all=True)
        known = [frames[0].size] if frames else []
    if not problems and count < MIN_FRAMES:
        problems.append(_too_short(path, count, row, column))
    return ([known[0], known[-1]] if known else []), problems


def load_trajectory(path: Path, row: int, column: str,
                    frames: int = REASONING_FRAMES) -> tuple[list[Image.Image], list[Problem]]:
    """The trajectory resampled to ``frames`` upright RGB frames (decoding only the frames used)."""
    if path.is_dir():
        files = frame_files(path)
        if len(files) < MIN_FRAMES:
            return [], [_too_short(path, len(files), row, column) if files else _no_frames(path, row, column)]
        chosen = resample_indices(len(files), frames)
        images, problems = {}, []
        for index in dict.fromkeys(chosen):
            images[index], found = read_image(files[index], row, column)
            problems += _in_folder(path, found)
        if any(image is None for image in images.values()):
            return [], problems
        sizes = {image.size for image in images.values()}
        if len(sizes) > 1:
            return [], _size_changes(path, [files[i] for i in images], [im.size for im in images.values()], row, column)
        return [images[i] for i in chosen], problems
    count = video_frame_count(path)
    if count is None or count < MIN_FRAMES:  # unreadable: let the decoder say why
        problems = _video_frames(path, row, column, wanted={0})[2] if count is None else []
        return [], problems or [_too_short(path, count or 0, row, column)]
    chosen = resample_indices(count, frames)
    decoded, _, problems = _video_frames(path, row, column, wanted=set(chosen))
    if not problems and len(decoded) < len(set(chosen)):
        problems = [Problem(row, column, f"{path.name} ends before the {count} frames its stream reports.",
                            "Re-encode the video (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4), or remove the row.")]
    if problems:
        return [], problems
    return [decoded[i] for i in chosen], []


def video_frame_count(path: Path) -> int | None:
    """How many frames the video at ``path`` has (ffmpeg counts them), or None if it cannot be read.
    Remembered per file version, so the loader of every epoch and ``dataset prepare`` count once."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _count_frames(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _count_frames(path: str, size: int, mtime_ns: int) -> int | None:  # noqa: ARG001 (size, time: the key)
    import imageio_ffmpeg

    try:
        return imageio_ffmpeg.count_frames_and_secs(path)[0]
    except (RuntimeError, OSError, ValueError):
        return None


def _video_frames(path: Path, row: int, column: str, wanted: set[int],
                  read_all: bool = False) -> tuple[dict[int, Image.Image], int, list[Problem]]:
    """Decode the video once: its frames at the ``wanted`` indices as RGB images, and how many
    frames were read (all of them with ``read_all``, as a full check needs; else up to the last
    wanted one)."""
    problem = file_problem(path, row, column)
    if problem:
        return {}, 0, [problem]
    import imageio.v2 as imageio

    frames, read = {}, 0
    try:
        with imageio.get_reader(path, format="ffmpeg") as reader:
            for index, frame in enumerate(reader):
                read = index + 1
                if index in wanted:
                    frames[index] = Image.fromarray(np.asarray(frame)).convert("RGB")
                if not read_all and len(frames) == len(wanted):
                    break
    except VIDEO_ERRORS as exc:
        return {}, read, [Problem(row, column, f"{path.name} is not a readable video ({error_text(exc)}).",
                                  "Re-encode it as an H.264 MP4, or give a folder of numbered frames, or remove the row.")]
    return frames, read, []


def _size_changes(folder: Path, files: list[Path], sizes: list, row: int, column: str) -> list[Problem]:
    known = [(file, size) for file, size in zip(files, sizes) if size]
    changed = next(((file, size) for file, size in known if size != known[0][1]), None)
    if changed is None:
        return []
    (first, first_size), (file, size) = known[0], changed
    return [Problem(row, column, f"{folder.name}: frames change size ({file.name} is {size[0]}x{size[1]}, "
                    f"{first.name} is {first_size[0]}x{first_size[1]}).",
                    "Resize or crop every frame of the trajectory to one size.")]


def _in_folder(folder: Path, problems: list[Problem]) -> list[Problem]:
    """A frame's problems, its name prefixed with the folder's (``walk/03.png is truncated``)."""
    return [Problem(p.row, p.column, f"{folder.name}/{p.reason}", p.fix, p.fatal) for p in problems]


def _too_short(path: Path, count: int, row: int, column: str) -> Problem:
    return Problem(row, column, f"{path.name} has {count} frame(s); a trajectory needs at least {MIN_FRAMES}.",
                   "Give the whole sequence (first frame the input, last the edit), or write a 2-frame "
                   "pair as input_image/edited_image instead.")


def _no_frames(path: Path, row: int, column: str) -> Problem:
    return Problem(row, column, f"{path.name}/ holds no image files.",
                   f"Put the frames in it as numbered images ({', '.join(sorted(IMAGE_SUFFIXES)[:3])}, ...), "
                   "or point the trajectory at a video file.")
