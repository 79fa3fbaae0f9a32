"""`dataset prepare --degrade`: pairs from finished images, each generator's effect measured on its output."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from chronoedit_lora.cli import main
from chronoedit_lora.data.degrade import BUILTINS, MASK_GRAY, image_seed, mask_box, parse_generator

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "example_dataset" / "after"
GENERATORS = ["downscale:4", "jpeg:15", "blur:2", "noise:20", "grayscale", "mask:0.2"]


def invert(image: Image.Image, seed: int) -> Image.Image:
    """A --degrade plugin for the tests."""
    return Image.fromarray(255 - np.asarray(image))


def not_an_image(image: Image.Image, seed: int) -> str:
    return "oops"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    for path in sorted(EXAMPLE.glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    return folder


def _prepare(source: Path, output: Path, *extra: str, seed: int = 0) -> list[dict[str, str]]:
    args = ["dataset", "prepare", str(source), "--output", str(output / "metadata.csv"), "--seed", str(seed)]
    assert main(args + [a for spec in GENERATORS for a in ("--degrade", spec)] + list(extra)) == 0
    return list(csv.DictReader((output / "metadata.csv").open()))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def test_same_seed_same_bytes(finished, tmp_path):
    _prepare(finished, tmp_path / "a", seed=5)
    _prepare(finished, tmp_path / "b", seed=5)
    _prepare(finished, tmp_path / "c", seed=6)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 1 + 3 * len(GENERATORS) and a == b
    # another seed moves the noise and the mask, and nothing else
    changed = sorted(name for name in a if a[name] != c[name])
    assert changed == [f"degraded/{g}/{p.stem}.png" for g in ("mask-0.2", "noise-20") for p in sorted(finished.iterdir())]


def test_each_generator_does_what_it_says(finished, tmp_path):
    rows = _prepare(finished, tmp_path, seed=1)
    assert len(rows) == 3 * len(GENERATORS)
    for row in rows:
        degraded, original = tmp_path / row["input_image"], tmp_path / row["edited_image"]
        assert original.resolve().parent == finished.resolve()
        generator = row["input_image"].split("/")[1]
        assert row["prompt"] == BUILTINS[generator.split("-")[0]].instruction
        source, out = _pixels(original), _pixels(degraded)
        height, width = source.shape[:2]
        if generator == "downscale-4":
            assert out.shape[:2] == (round(height / 4), round(width / 4))
        elif generator == "jpeg-15":
            with Image.open(degraded) as image:
                assert image.format == "JPEG" and image.quantization == _quantization(15)
                assert image.quantization != _quantization(20)
        elif generator == "blur-2":
            expected = Image.open(original).convert("RGB").filter(ImageFilter.GaussianBlur(2))
            assert np.array_equal(out, np.asarray(expected, dtype=np.float64))
            assert _sharpness(out) < _sharpness(source) / 2
        elif generator == "noise-20":
            # where clipping at 0 or 255 cannot trim it (3 sigma inside), the residual is the noise drawn
            mid = (source >= 60) & (source <= 195)
            residual = (out - source)[mid]
            print("noise std", residual.std(), "mean", residual.mean(), "pixels", mid.sum())
            assert mid.sum() > 1000 and 19.0 <= residual.std() <= 21.0 and abs(residual.mean()) < 1.0
        elif generator == "grayscale":
            assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
            assert np.array_equal(out[..., 0], np.asarray(Image.open(original).convert("L"), dtype=np.float64))
        else:
            left, top, right, bottom = mask_box((width, height), 0.2,
                                                image_seed(1, parse_generator("mask:0.2"), original.name))
            assert abs((right - left) * (bottom - top) / (width * height) - 0.2) < 0.02
            inside = np.zeros((height, width), bool)
            inside[top:bottom, left:right] = True
            assert (out[inside] == MASK_GRAY).all() and np.array_equal(out[~inside], source[~inside])


def _quantization(quality: int) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer).quantization


def _sharpness(pixels: np.ndarray) -> float:
    """Mean absolute difference between horizontal neighbours: high-frequency content."""
    return float(np.abs(np.diff(pixels, axis=1)).mean())


def test_plugin_and_prompt_options(finished, tmp_path, capsys):
    args = ["dataset", "prepare", str(finished), "--output", str(tmp_path / "p" / "metadata.csv"),
            "--degrade", "tests.test_degrade:invert", "--prompt", "Invert the colors back."]
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "p" / "metadata.csv").open()))
    assert {row["prompt"] for row in rows} == {"Invert the colors back."}
    for row in rows:
        out, source = _pixels(tmp_path / "p" / row["input_image"]), _pixels(tmp_path / "p" / row["edited_image"])
        assert np.array_equal(out, 255 - source)
    assert main(args[:-2] + ["--overwrite"]) == 2  # a plugin has no instruction of its own
    assert "give --prompt or --prompt-template" in capsys.readouterr().err
    bad = ["dataset", "prepare", str(finished), "--output", str(tmp_path / "q" / "metadata.csv"),
           "--degrade", "tests.test_degrade:not_an_image", "--prompt", "x"]
    assert main(bad) == 2 and "returned a str on" in capsys.readouterr().err
    assert not (tmp_path / "q" / "metadata.csv").exists()


@pytest.mark.parametrize("spec, message", [
    ("blurr", "unknown generator 'blurr' (did you mean 'blur'?)"),
    ("jpeg:nan", "must be a finite number"),
    ("downscale:-2", "must be > 1 and <= 64, got -2.0"),
    ("jpeg:99", "must be > 0 and <= 95"),
    ("jpeg:20.5", "JPEG quality is a whole number"),
    ("grayscale:2", "grayscale takes no strength"),
    ("mask:1", "must be > 0 and <= 0.9"),
    ("missing_module_xyz.sub:f", "cannot import missing_module_xyz.sub"),
])
def test_bad_generators_are_refused_before_anything_is_written(finished, tmp_path, capsys, spec, message):
    assert main(["dataset", "prepare", str(finished), "--output", str(tmp_path / "m.csv"), "--degrade", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
