"""Generate data/example_dataset: procedurally drawn scenes and their pencil-sketch renderings.

A real, deterministic style edit for the README demo and the tests: each "before" image is a small
colourful scene (sky, sun, hills, houses, trees); its "after" image is a graphite sketch of it
(colour-dodge of the grayscale image with its blurred negative, darkened edges, paper grain).
Trajectories: for a few more scenes, a folder of frames in which the sketch is drawn over the
scene from left to right (frame 0 the scene, the last frame the finished sketch), listed with the
pairs in with_trajectories.csv.
Run: python scripts/make_example_dataset.py --output data/example_dataset
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

SIZES = [(192, 192), (192, 192), (256, 160), (160, 256)]  # includes non-square pairs for buckets
TRAJECTORY_SIZES = [(128, 128), (160, 96), (128, 128)]
TRAJECTORY_FRAMES = 9
REVEAL_BAND = 24  # pixels over which the sketch fades in at the pencil's edge
PALETTE = {"red": (200, 60, 50), "blue": (60, 90, 200), "yellow": (230, 190, 60), "green": (70, 150, 80),
           "orange": (230, 130, 50), "purple": (130, 80, 170)}


def draw_scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """A landscape with a few objects; returns the image and a description of what it holds."""
    w, h = size
    image = Image.new("RGB", size, (135, 190, 235))
    draw = ImageDraw.Draw(image)
    horizon = int(h * rng.uniform(0.55, 0.7))
    draw.rectangle([0, horizon, w, h], fill=(110, 170, 90))
    for _ in range(2):  # hills
        cx, r = int(rng.uniform(0, w)), int(rng.uniform(w * 0.2, w * 0.4))
        draw.ellipse([cx - r, horizon - r // 2, cx + r, horizon + r // 2], fill=(90, 150, 80))
    sun_x, sun_r = int(rng.uniform(w * 0.1, w * 0.9)), int(rng.uniform(10, 18))
    draw.ellipse([sun_x - sun_r, 12, sun_x + sun_r, 12 + 2 * sun_r], fill=(250, 215, 80))
    things = ["a yellow sun", "green hills"]
    for _ in range(int(rng.integers(1, 3))):  # houses
        colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
        x, s = int(rng.uniform(0, w - 50)), int(rng.uniform(28, 44))
        draw.rectangle([x, horizon - s, x + s, horizon + 4], fill=PALETTE[colour], outline=(40, 40, 40))
        draw.polygon([(x - 4, horizon - s), (x + s // 2, horizon - s - s // 2), (x + s + 4, horizon - s)], fill=(120, 50, 40))
        draw.rectangle([x + s // 3, horizon - s // 2, x + 2 * s // 3, horizon + 4], fill=(70, 45, 30))
        things.append(f"a {colour} house with a brown roof")
    for _ in range(int(rng.integers(1, 4))):  # trees
        x = int(rng.uniform(10, w - 10))
        draw.rectangle([x - 3, horizon - 10, x + 3, horizon + 12], fill=(100, 70, 40))
        draw.ellipse([x - 14, horizon - 36, x + 14, horizon - 6], fill=(40, 120, 60))
    things.append("round green trees")
    return image, things


def pencil_sketch(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Graphite rendering: colour dodge of gray with its blurred negative, edge darkening, paper grain."""
    gray = np.asarray(ImageOps.grayscale(image), dtype=np.float64)
    blurred = np.asarray(ImageOps.invert(ImageOps.grayscale(image)).filter(ImageFilter.GaussianBlur(4)), dtype=np.float64)
    dodge = np.clip(gray * 255.0 / np.maximum(255.0 - blurred, 1.0), 0, 255)
    edges = np.asarray(ImageOps.grayscale(image).filter(ImageFilter.FIND_EDGES), dtype=np.float64)
    grain = np.round(rng.normal(0, 1.2, gray.shape)) * 3  # few distinct levels: compresses well
    sketch = np.clip(dodge - 0.8 * edges + grain, 0, 255)
    return Image.fromarray(sketch.astype(np.uint8)).convert("RGB")


def drawing_frames(scene: Image.Image, sketch: Image.Image, count: int) -> list[Image.Image]:
    """The sketch drawn over the scene from left to right in ``count`` frames (first = scene, last = sketch)."""
    x = np.arange(scene.width, dtype=np.float64)[None, :, None]
    photo, drawn = np.asarray(scene, dtype=np.float64), np.asarray(sketch, dtype=np.float64)
    frames = []
    for k in range(count):
        front = k / (count - 1) * (scene.width + REVEAL_BAND)
        mix = np.clip((front - x) / REVEAL_BAND, 0, 1)
        frames.append(Image.fromarray(np.rint(photo + mix * (drawn - photo)).astype(np.uint8)))
    return frames


def prompt_for(things: list[str], index: int) -> str:
    """A detailed instruction in ChronoEdit's style, written from what the generator drew."""
    scene = ", ".join(things[:-1]) + f" and {things[-1]}"
    variants = [
        "Every object keeps its exact position and proportions; only the rendering changes.",
        "The composition, the horizon line and the placement of each object stay exactly the same.",
        "Nothing is added or removed, and the layout of the scene is preserved.",
    ]
    return (f"The user wants to transform the image into a pencil sketch. The scene shows {scene} under a light "
            f"blue sky. Redraw it as a graphite drawing on white paper: remove all colour, outline the shapes "
            f"with dark pencil lines, shade the darker areas with soft gray strokes and keep a subtle paper "
            f"grain. {variants[index % len(variants)]}")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def make_dataset(output: Path, seed: int = 0, count: int = 12) -> Path:
    """Write ``count`` pairs and metadata.csv, then the trajectories and with_trajectories.csv, to
    ``output``; returns the path of metadata.csv."""
    rng = np.random.default_rng(seed)
    (output / "before").mkdir(parents=True, exist_ok=True)
    (output / "after").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        scene, things = draw_scene(rng, SIZES[i % len(SIZES)])
        name = f"{i:03d}.png"
        (output / "before" / name).write_bytes(_png_bytes(scene))
        (output / "after" / name).write_bytes(_png_bytes(pencil_sketch(scene, rng)))
        rows.append({"input_image": f"before/{name}", "edited_image": f"after/{name}", "prompt": prompt_for(things, i)})
    csv_path = output / "metadata.csv"
    _write_csv(csv_path, rows, ["input_image", "edited_image", "prompt"])
    trajectories = []
    for i, size in enumerate(TRAJECTORY_SIZES):
        scene, things = draw_scene(rng, size)
        folder = output / "trajectories" / f"{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, frame in enumerate(drawing_frames(scene, pencil_sketch(scene, rng), TRAJECTORY_FRAMES)):
            (folder / f"{k:02d}.png").write_bytes(_png_bytes(frame))
        trajectories.append({"trajectory": f"trajectories/{i:03d}", "prompt": prompt_for(things, i)})
    _write_csv(output / "with_trajectories.csv", rows + trajectories,
               ["input_image", "edited_image", "trajectory", "prompt"])
    return csv_path


def _write_csv(path: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="data/example_dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=12)
    args = parser.parse_args()
    print(make_dataset(Path(args.output), args.seed, args.count))


if __name__ == "__main__":
    main()
