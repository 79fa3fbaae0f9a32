"""Image-pair decoding on real files: EXIF orientation, mode conversions, broken files, 2-frame MP4s."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from chronoedit_lora.data import (EditPair, Problem, load_pair, open_image, read_image, read_source_size,
                                  read_video_frames)
from chronoedit_lora.data.images import MAX_INPUT_PIXELS
from chronoedit_lora.errors import ChronoEditError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def pixel(image: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(image, dtype=int)[xy[1], xy[0]]


def marked_jpeg(path: Path, orientation: int | None, colour: tuple[int, int, int]) -> Path:
    """A 48x32 white JPEG with a 12x12 coloured square at the stored top-left corner."""
    image = Image.new("RGB", (48, 32), WHITE)
    image.paste(colour, (0, 0, 12, 12))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)
    return path


def noise_png(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_video(path: Path, colours: list[tuple[int, int, int]], size: tuple[int, int] = (32, 32)) -> Path:
    with imageio.get_writer(path, fps=8, codec="libx264", quality=9, macro_block_size=1) as writer:
        for colour in colours:
            writer.append_data(np.full((size[1], size[0], 3), colour, np.uint8))
    return path


def test_exif_orientation_6_rotates_both_images(tmp_path: Path) -> None:
    pair = EditPair(marked_jpeg(tmp_path / "src.jpg", 6, RED), marked_jpeg(tmp_path / "tgt.jpg", 6, BLUE), "x", 2)
    images = load_pair(pair)
    assert images.problems == []
    for image, colour in ((images.source, RED), (images.edited, BLUE)):
        # Orientation 6: displayed rotated 90 degrees clockwise, so the stored top-left goes top-right.
        assert image.size == (32, 48)
        assert np.abs(pixel(image, (32 - 6, 6)) - colour).max() <= 12  # JPEG tolerance
        assert np.abs(pixel(image, (6, 6)) - WHITE).max() <= 12
    assert read_source_size(pair) == ((32, 48), [])


def test_without_orientation_the_image_is_unchanged(tmp_path: Path) -> None:
    image, problems = read_image(marked_jpeg(tmp_path / "a.jpg", None, RED), 2, "input_image")
    assert problems == [] and image.size == (48, 32)
    assert np.abs(pixel(image, (6, 6)) - RED).max() <= 12


def assert_note(problems: list[Problem], words: str) -> None:
    assert len(problems) == 1 and not problems[0].fatal, problems
    assert (problems[0].row, problems[0].column) == (2, "input_image")
    assert words in problems[0].reason


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    image, problems = read_image(tmp_path / "c.jpg", 2, "input_image")
    assert image.mode == "RGB" and np.abs(pixel(image, (8, 8)) - RED).max() <= 6
    assert_note(problems, "CMYK")


def test_16_bit_png_is_scaled_to_8_bits(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    image, problems = read_image(tmp_path / "g16.png", 2, "input_image")
    assert np.asarray(image)[0].tolist() == [[0] * 3, [128] * 3, [255] * 3, [4] * 3]  # round(v / 257)
    assert_note(problems, "16")


def test_palette_png_with_transparency_is_composited_over_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 1))
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.putdata([0, 1, 0, 1])
    image.save(tmp_path / "p.png", transparency=0)
    loaded, problems = read_image(tmp_path / "p.png", 2, "input_image")
    assert np.asarray(loaded)[0].tolist() == [list(WHITE), list(BLUE)] * 2
    assert_note(problems, "transparency")


def test_rgba_png_is_composited_over_white(tmp_path: Path) -> None:
    Image.fromarray(np.array([[[255, 0, 0, 255], [255, 0, 0, 128], [0, 0, 0, 0]]], np.uint8)).save(tmp_path / "a.png")
    loaded, problems = read_image(tmp_path / "a.png", 2, "input_image")
    got = np.asarray(loaded, dtype=int)[0]
    assert got[0].tolist() == [255, 0, 0] and got[2].tolist() == [255, 255, 255]
    assert np.abs(got[1] - [255, 127, 127]).max() <= 1  # half red over white
    assert_note(problems, "RGBA")


def test_grayscale_png(tmp_path: Path) -> None:
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    loaded, problems = read_image(tmp_path / "l.png", 2, "input_image")
    assert loaded.mode == "RGB" and pixel(loaded, (1, 1)).tolist() == [77, 77, 77]
    assert_note(problems, "grayscale")


@pytest.mark.parametrize("kind", ["truncated_png", "truncated_jpeg", "header_only", "zero_bytes", "text", "video"])
def test_broken_files_are_fatal_problems_with_row_and_column(tmp_path: Path, kind: str) -> None:
    good = noise_png(tmp_path / "good.png")
    data = good.read_bytes()
    path = tmp_path / ("bad.mp4" if kind == "video" else "bad.jpg" if kind == "truncated_jpeg" else "bad.png")
    if kind == "truncated_png":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_jpeg":
        Image.open(good).save(tmp_path / "good.jpg")
        path.write_bytes((tmp_path / "good.jpg").read_bytes()[:-400])
    elif kind == "header_only":
        path.write_bytes(data[:40])
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image")
    else:
        write_video(path, [RED, BLUE])
    images = load_pair(EditPair(good, path, "x", 7))
    assert images.source is not None and images.edited is None and not images.ok
    (problem,) = images.problems
    assert (problem.row, problem.column, problem.fatal) == (7, "edited_image", True)
    expected = {"truncated_png": "truncated", "truncated_jpeg": "truncated", "header_only": "not an image",
                "zero_bytes": "0 bytes", "text": "not an image", "video": "is a video"}[kind]
    assert expected in problem.reason and problem.fix


def test_two_frame_mp4(tmp_path: Path) -> None:
    path = write_video(tmp_path / "pair.mp4", [RED, BLUE], size=(48, 32))
    images = load_pair(EditPair(path, path, "x", 2, input_frame=0, edited_frame=1))
    assert images.problems == [] and images.source.size == images.edited.size == (48, 32)
    # H.264 (yuv420p) on flat colours: within 12 levels.
    assert np.abs(pixel(images.source, (20, 16)) - RED).max() <= 12
    assert np.abs(pixel(images.edited, (20, 16)) - BLUE).max() <= 12
    assert read_source_size(EditPair(path, path, "x", 2, 0, 1)) == ((48, 32), [])


def test_video_frame_counts(tmp_path: Path) -> None:
    frames, problems = read_video_frames(write_video(tmp_path / "one.mp4", [RED]), 4, "video")
    assert len(frames) == 1 and problems[0].fatal and "1 frame" in problems[0].reason
    assert (problems[0].row, problems[0].column) == (4, "video")
    frames, problems = read_video_frames(write_video(tmp_path / "three.mp4", [RED, BLUE, RED]), 4, "video")
    assert len(frames) == 2 and not problems[0].fatal and "more than 2" in problems[0].reason
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 10)
    frames, problems = read_video_frames(tmp_path / "junk.mp4", 4, "video")
    assert frames == [] and problems[0].fatal and "not a readable video" in problems[0].reason


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` RGB pixels, in a few bytes: its pixel data is
    cut short, so decoding it would allocate the whole image before failing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width, height, shown", [(40_000, 40_000, "over 179 megapixels"),
                                                  (10_000, 8_001, "10000x8001")])
def test_an_input_image_over_the_pixel_cap_is_refused_from_its_header(tmp_path: Path, width, height, shown) -> None:
    """Refused with the cap's message (not the decoder's truncation error): nothing was decoded.
    40000x40000 is past even PIL's own refusal; 10000x8001 is just over the kit's 80 megapixels."""
    assert width * height > MAX_INPUT_PIXELS == 80_000_000
    with pytest.raises(ChronoEditError) as refused:
        open_image(png_header(tmp_path / "big.png", width, height), "input image")
    assert str(refused.value) == (f"input image {tmp_path / 'big.png'}: the image is {shown}; an input image may "
                                  "have at most 80 megapixels (an edit is made at about 1 megapixel). Downscale it "
                                  "first.")
    small = png_header(tmp_path / "small.png", 10_000, 8_000)  # at the cap: decoded, and its cut-short data named
    with pytest.raises(ChronoEditError, match="unreadable or truncated"):
        open_image(small, "input image")
