"""Pairs from finished images: each image's degraded copy is the input, the image itself the target
(restoration LoRAs: upscaling, JPEG clean-up, deblurring, denoising, colorizing, inpainting).

A generator is ``NAME[:STRENGTH]`` (``downscale:4``, ``jpeg:20``, ``blur:3``, ``noise:25``,
``grayscale``, ``mask:0.25``) or a plugin ``MODULE:CALLABLE`` called as ``f(image, seed) -> image``.
Every random choice comes from a seed derived from the run's seed, the generator and the image's
name, so the same seed writes the same bytes whatever the order or the other images.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..errors import ChronoEditError
from ..files import atomic_write, save_image
from ..settings import check_range, did_you_mean
from .images import IMAGE_SUFFIXES

DEGRADED_FOLDER = "degraded"  # beside the CSV: degraded/<generator>/<image name>
MASK_GRAY = (128, 128, 128)  # what a masked-out region is filled with


@dataclass(frozen=True)
class Builtin:
    default: float | None  # the strength when none is given (None: the generator takes none)
    low: float  # the strength must be above this ...
    high: float  # ... and at most this
    meaning: str  # what the strength is, for errors and --help
    instruction: str  # the row's prompt


BUILTINS = {
    "downscale": Builtin(4.0, 1.0, 64.0, "the factor each side is divided by",
                         "The user wants to upscale the low-resolution image, restoring sharp, fine detail at a higher "
                         "resolution while keeping the content exactly the same."),
    "jpeg": Builtin(20.0, 0.0, 95.0, "the JPEG quality, 1 to 95",
                    "The user wants to remove the JPEG compression artifacts (blocking, ringing and color banding), "
                    "keeping the content exactly the same."),
    "blur": Builtin(3.0, 0.0, 100.0, "the Gaussian blur radius in pixels",
                    "The user wants to sharpen the blurry image, restoring crisp edges and fine detail while keeping "
                    "the content the same."),
    "noise": Builtin(25.0, 0.0, 255.0, "the noise's standard deviation, in 0-255 pixel values",
                     "The user wants to remove the noise from the image, keeping its details and content the same."),
    "grayscale": Builtin(None, 0.0, 0.0, "",
                         "The user wants to colorize the black-and-white image with natural, realistic colors, keeping "
                         "the content the same."),
    "mask": Builtin(0.25, 0.0, 0.9, "the masked-out rectangle's share of the image area",
                    "The user wants to fill in the missing gray rectangle of the image so that it blends seamlessly "
                    "with its surroundings, keeping the rest of the image the same."),
}


@dataclass(frozen=True)
class Generator:
    """One way of degrading an image, with the folder its outputs go to and the prompt of its rows."""

    label: str  # folder name under degraded/
    degrade: Callable[[Image.Image, int, str], Image.Image]  # (image, seed, its name for errors) -> degraded image
    instruction: str | None  # None: a plugin, whose rows take --prompt / --prompt-template
    jpeg_quality: int | None = None  # saved as JPEG with this quality (else PNG)

    @property
    def suffix(self) -> str:
        return ".jpg" if self.jpeg_quality else ".png"


def parse_generator(spec: str) -> Generator:
    """``NAME[:STRENGTH]`` or ``MODULE:CALLABLE`` -> a :class:`Generator`, checked (nothing runs yet)."""
    name, _, value = spec.partition(":")
    if name not in BUILTINS:
        if "." in name or (value and not _is_number(value)):
            return _plugin(spec)
        raise ChronoEditError(f"--degrade {spec!r}: unknown generator {name!r}{did_you_mean(name, BUILTINS)}; use one "
                              f"of {', '.join(BUILTINS)} (NAME[:STRENGTH]) or a plugin MODULE:CALLABLE.")
    builtin = BUILTINS[name]
    if builtin.default is None:
        if value:
            raise ChronoEditError(f"--degrade {spec!r}: {name} takes no strength; write --degrade {name}.")
        return Generator(name, lambda image, seed, about: _grayscale(image), builtin.instruction)
    strength = float(value) if value else builtin.default
    if value and not _is_number(value):
        raise ChronoEditError(f"--degrade {spec!r}: the strength {value!r} is not a number ({builtin.meaning}).")
    check_range(f"--degrade {name} strength ({builtin.meaning})", strength, builtin.low, builtin.high,
                low_inclusive=False)
    label = f"{name}-{strength:g}"
    if name == "jpeg":
        if strength != int(strength):
            raise ChronoEditError(f"--degrade {spec!r}: the JPEG quality is a whole number from 1 to 95.")
        return Generator(label, lambda image, seed, about: image, builtin.instruction, int(strength))
    degrade = {"downscale": _downscale, "blur": _blur, "noise": _noise, "mask": _mask}[name]
    return Generator(label, lambda image, seed, about: degrade(image, strength, seed), builtin.instruction)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _plugin(spec: str) -> Generator:
    from ..plugins import load_callable

    plugin = load_callable(spec, "--degrade")
    return Generator(f"plugin-{spec.rpartition(':')[2]}",
                     lambda image, seed, about: plugin.image(image, seed, about=about), None)


def _downscale(image: Image.Image, factor: float, seed: int) -> Image.Image:  # noqa: ARG001 - no randomness
    size = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _blur(image: Image.Image, radius: float, seed: int) -> Image.Image:  # noqa: ARG001 - no randomness
    return image.filter(ImageFilter.GaussianBlur(radius))


def _noise(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    noisy = pixels + np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def _grayscale(image: Image.Image) -> Image.Image:
    return image.convert("L").convert("RGB")


def mask_box(size: tuple[int, int], share: float, seed: int) -> tuple[int, int, int, int]:
    """The masked-out rectangle (left, top, right, bottom): ``share`` of the area, the image's aspect,
    placed by ``seed``."""
    width, height = size
    box_width, box_height = max(1, round(width * math.sqrt(share))), max(1, round(height * math.sqrt(share)))
    rng = np.random.default_rng(seed)
    left, top = int(rng.integers(0, width - box_width + 1)), int(rng.integers(0, height - box_height + 1))
    return left, top, left + box_width, top + box_height


def _mask(image: Image.Image, share: float, seed: int) -> Image.Image:
    masked = image.copy()
    masked.paste(MASK_GRAY, mask_box(image.size, share, seed))
    return masked


def image_seed(seed: int, generator: Generator, name: str) -> int:
    """The seed of one image's degradation: a function of the run's seed, the generator and the name only."""
    digest = hashlib.sha256(f"{seed}:{generator.label}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def finished_images(source: Path) -> list[Path]:
    """The images directly in ``source`` (sorted); refused if there are none."""
    images = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ChronoEditError(f"{source}: no images to degrade (expected {', '.join(sorted(IMAGE_SUFFIXES))} files "
                              "directly in the folder).")
    return images


def write_degraded(image_path: Path, generator: Generator, seed: int, folder: Path) -> Path:
    """Degrade one finished image into ``folder/<generator>/<name><suffix>``; returns the file written."""
    from .images import open_image

    image = open_image(image_path, "--degrade")
    degraded = generator.degrade(image, image_seed(seed, generator, image_path.name), str(image_path))
    path = folder / generator.label / f"{image_path.stem}{generator.suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if generator.jpeg_quality:
        with atomic_write(path) as f:
            degraded.save(f, format="JPEG", quality=generator.jpeg_quality)
    else:
        save_image(degraded.convert("RGB"), path)
    return path
