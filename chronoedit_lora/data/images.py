"""Decode images: the two of an edit pair (problems instead of exceptions) and a user's input image,
upright (EXIF orientation) and RGB."""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..errors import ChronoEditError
from .metadata import EditPair
from .problems import Problem

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
# What decoding a broken file can raise (UnidentifiedImageError and truncation are OSErrors).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
VIDEO_ERRORS = (OSError, RuntimeError, ValueError, IndexError)
# An input image (edit --image, the web app's uploads) over this many pixels is refused from its header,
# before decoding: 80 megapixels (e.g. 10000x8000), below PIL's own 89.5-megapixel warning.
MAX_INPUT_PIXELS = 80_000_000
_ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
_MODE_NAMES = {"1": "black-and-white (1)", "L": "grayscale (L)", "P": "palette (P)",
               "LA": "grayscale+alpha (LA)", "PA": "palette+alpha (PA)"}


@dataclass
class PairImages:
    """The decoded pair (None where a file could not be read) and what was found on the way."""

    source: Image.Image | None
    edited: Image.Image | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Both images decoded."""
        return self.source is not None and self.edited is not None


def load_pair(pair: EditPair) -> PairImages:
    """Fully decode both images of ``pair`` as upright RGB.

    Conversions (grayscale, palette, RGBA over white, CMYK, 16-bit) are reported as non-fatal
    problems; missing, empty, truncated or unreadable files as fatal ones.
    """
    source_column, edited_column = pair.columns
    if pair.is_video:
        frames, problems = read_video_frames(pair.input_image, pair.row, source_column)
        if len(frames) < 2:
            return PairImages(None, None, problems)
        return PairImages(frames[pair.input_frame], frames[pair.edited_frame], problems)
    source, problems = read_image(pair.input_image, pair.row, source_column)
    if pair.edited_image == pair.input_image:  # an identity pair: one file, decoded and reported once
        return PairImages(source, source, problems)
    edited, edited_problems = read_image(pair.edited_image, pair.row, edited_column)
    return PairImages(source, edited, problems + edited_problems)


def read_image(path: Path, row: int | None, column: str) -> tuple[Image.Image | None, list[Problem]]:
    """Decode ``path`` completely, apply its EXIF orientation and convert it to RGB."""
    problem = file_problem(path, row, column)
    if problem is None and path.suffix.lower() in VIDEO_SUFFIXES:
        problem = Problem(row, column, f"{path.name} is a video, not an image.",
                          "Use the video,prompt layout for 2-frame MP4s, or give an image file here.")
    if problem:
        return None, [problem]
    try:
        with Image.open(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        return None, [Problem(row, column, f"{path.name} is not an image PIL can read (or its header is cut off).",
                              "Re-export it as PNG or JPEG, or remove the row.")]
    except _IMAGE_ERRORS as exc:
        return None, [Problem(row, column, f"{path.name} is unreadable or truncated ({exc}).",
                              "Re-export or re-download the file, or remove the row.")]
    rgb, note = to_rgb(upright)
    return rgb, [Problem(row, column, f"{path.name}: {note}", "Nothing to do; save as 8-bit RGB to silence this.",
                         fatal=False)] if note else []



def open_image(path: str | Path, option: str = "--image") -> Image.Image:
    """Fully decode a user's input image as upright RGB, or raise a :class:`ChronoEditError` naming it
    (one over :data:`MAX_INPUT_PIXELS` is refused from its header, before its pixels are decoded)."""
    path = Path(path)
    if not path.is_file():
        raise ChronoEditError(f"{option} {path}: image not found.")
    check_pixels(path, option)
    image, problems = read_image(path, None, option)
    if image is None:  # the dataset loader's reason, without its CSV-specific fix
        raise ChronoEditError(f"{option} {path}: {problems[0].reason} Give a readable PNG or JPEG.")
    return image


def check_pixels(path: Path, option: str) -> None:
    """Refuse an input image over :data:`MAX_INPUT_PIXELS` from its header alone. Files PIL cannot
    open are left to :func:`read_image`, which names what is wrong with them."""
    try:
        with Image.open(path) as image:
            size = image.size
    except Image.DecompressionBombError:  # over twice PIL's own limit: PIL will not even open it
        size = None
    except _IMAGE_ERRORS:
        return
    if size is None or size[0] * size[1] > MAX_INPUT_PIXELS:
        shown = f"{size[0]}x{size[1]}" if size else f"over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"
        raise ChronoEditError(f"{option} {path}: the image is {shown}; an input image may have at most "
                              f"{MAX_INPUT_PIXELS / 1e6:.0f} megapixels (an edit is made at about 1 megapixel). "
                              "Downscale it first.")


def read_video_frames(path: Path, row: int, column: str) -> tuple[list[Image.Image], list[Problem]]:
    """The first two frames of a video as RGB images; fewer than two is a fatal problem, more a warning."""
    problem = file_problem(path, row, column)
    if problem:
        return [], [problem]
    import imageio.v2 as imageio

    try:
        with imageio.get_reader(path, format="ffmpeg") as reader:
            frames = [Image.fromarray(np.asarray(frame)) for frame in itertools.islice(reader, 3)]
    except VIDEO_ERRORS as exc:
        return [], [Problem(row, column, f"{path.name} is not a readable video ({error_text(exc)}).",
                            "Re-encode it as an H.264 MP4 with 2 frames, or remove the row.")]
    if len(frames) < 2:
        return frames, [Problem(row, column, f"{path.name} has {len(frames)} frame(s); a pair video needs 2.",
                                "Write frame 0 = source image and frame 1 = edited image.")]
    if len(frames) > 2:
        return frames[:2], [Problem(row, column, f"{path.name} has more than 2 frames; frame 0 is used as the "
                                    "source and frame 1 as the edited image.",
                                    "Write 2-frame videos if that is not what you meant.", fatal=False)]
    return frames, []


def error_text(exc: BaseException) -> str:
    """The first line of a decoder's error (ffmpeg's run to pages), or its type if it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_source_size(pair: EditPair) -> tuple[tuple[int, int] | None, list[Problem]]:
    """Upright (width, height) of the pair's source image from the file header, without decoding pixels
    (videos: the first frame is decoded)."""
    if pair.is_video:
        frames, problems = read_video_frames(pair.input_image, pair.row, pair.columns[0])
        return (frames[0].size if len(frames) >= 2 else None), problems
    return image_size(pair.input_image, pair.row, pair.columns[0])


def image_size(path: Path, row: int, column: str) -> tuple[tuple[int, int] | None, list[Problem]]:
    """Upright (width, height) of the image at ``path`` from its header, without decoding pixels."""
    problem = file_problem(path, row, column)
    if problem:
        return None, [problem]
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(ExifTags.Base.Orientation) in _ROTATED_ORIENTATIONS:
                width, height = height, width
    except _IMAGE_ERRORS as exc:
        return None, [Problem(row, column, f"{path.name} is not a readable image ({exc}).",
                              "Re-export it as PNG or JPEG, or remove the row.")]
    return (width, height), []


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """``image`` as 8-bit RGB, and a note saying what was converted (None if it already was RGB).

    Transparency is composited over white; 16-bit and 32-bit single-channel images are scaled to
    8 bits; CMYK uses PIL's plain conversion (no colour profile).
    """
    mode = image.mode
    name = _MODE_NAMES.get(mode, mode)
    transparent = "transparency" in image.info or any(band in ("A", "a") for band in image.getbands())
    if mode == "RGB" and not transparent:
        return image, None
    if mode.startswith("I") or mode == "F":
        note = f"{mode} image (16/32-bit samples) scaled to 8 bits and converted to RGB."
        return _to_8bit(image).convert("RGB"), note
    if transparent:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas, f"{name} image with transparency composited over white and converted to RGB."
    if mode == "CMYK":
        return image.convert("RGB"), "CMYK image converted to RGB (colours approximate; no colour profile used)."
    return image.convert("RGB"), f"{name} image converted to RGB."


def _to_8bit(image: Image.Image) -> Image.Image:
    """A single-channel image with more than 8 bits per sample as mode L, scaled from its range."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def file_problem(path: Path, row: int | None, column: str) -> Problem | None:
    """A fatal problem if the file ``path`` is missing or empty."""
    if not path.is_file():
        return Problem(row, column, f"{path} not found.", "Fix the path in the CSV or add the file.")
    if path.stat().st_size == 0:
        return Problem(row, column, f"{path.name} is empty (0 bytes).",
                       "Re-export or re-copy the file, or remove the row.")
    return None
