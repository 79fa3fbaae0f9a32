"""The committed example dataset is exactly what its script makes, and really is a pencil-sketch edit."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "data" / "example_dataset"


def _generator():
    spec = importlib.util.spec_from_file_location("make_example_dataset", ROOT / "scripts" / "make_example_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_gives_the_committed_bytes(tmp_path):
    _generator().make_dataset(tmp_path / "ds")
    made = {p.relative_to(tmp_path / "ds"): p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    committed = {p.relative_to(EXAMPLE): p.read_bytes() for p in EXAMPLE.rglob("*") if p.is_file() and p.name != "README.md"}
    assert made.keys() == committed.keys() and all(made[k] == committed[k] for k in made)
    assert sum(len(b) for b in (*committed.values(), (EXAMPLE / "README.md").read_bytes())) < 1024 * 1024


def _smooth(image: Image.Image) -> np.ndarray:
    return np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float64).ravel()


def test_pairs_are_a_pencil_sketch_of_their_scene():
    rows = list(csv.DictReader((EXAMPLE / "metadata.csv").open()))
    assert len(rows) == 12 and list(rows[0]) == ["input_image", "edited_image", "prompt"]
    for row in rows:
        before = Image.open(EXAMPLE / row["input_image"]).convert("RGB")
        after = Image.open(EXAMPLE / row["edited_image"]).convert("RGB")
        assert before.size == after.size and max(before.size) <= 256
        saturation = lambda im: np.asarray(im.convert("HSV"))[..., 1].mean()  # noqa: E731
        assert saturation(before) > 40 and saturation(after) < 1  # colour removed
        # same drawing: the sketch's pencil strokes (dark, after blurring away the paper grain) lie
        # on the scene's outlines. Measured 0.85-0.90 for every pair.
        edges = _smooth(before.convert("L").filter(ImageFilter.FIND_EDGES))
        strokes = _smooth(ImageOps.invert(after.convert("L")))
        assert np.corrcoef(edges, strokes)[0, 1] > 0.7
        assert row["prompt"].startswith("The user wants to transform the image into a pencil sketch")


def test_trajectories_draw_the_sketch_over_their_scene():
    """Each trajectory starts at a colourful scene, ends at its pencil sketch, and in between the
    colour drains frame by frame as the sketch is drawn over it."""
    rows = list(csv.DictReader((EXAMPLE / "with_trajectories.csv").open()))
    pairs, trajectories = [r for r in rows if not r["trajectory"]], [r for r in rows if r["trajectory"]]
    assert len(pairs) == 12 and len(trajectories) == 3
    assert pairs == [dict(r, trajectory="") for r in csv.DictReader((EXAMPLE / "metadata.csv").open())]
    for row in trajectories:
        frames = [Image.open(p).convert("RGB") for p in sorted((EXAMPLE / row["trajectory"]).glob("*.png"))]
        assert len(frames) == 9 and len({f.size for f in frames}) == 1
        saturation = [float(np.asarray(f.convert("HSV"))[..., 1].mean()) for f in frames]
        assert saturation[0] > 40 and saturation[-1] < 1, saturation
        assert all(later < earlier for earlier, later in zip(saturation, saturation[1:])), saturation
        edges = _smooth(frames[0].convert("L").filter(ImageFilter.FIND_EDGES))
        assert np.corrcoef(edges, _smooth(ImageOps.invert(frames[-1].convert("L"))))[0, 1] > 0.7
        assert row["prompt"].startswith("The user wants to transform the image into a pencil sketch")
