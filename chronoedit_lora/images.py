"""Open a user's input image for editing, with the dataset loader's checks and conversions."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .data.images import read_image
from .errors import ChronoEditError


def open_image(path: str | Path, option: str = "--image") -> Image.Image:
    """Fully decode ``path`` as an upright RGB image, or raise a :class:`ChronoEditError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ChronoEditError(f"{option} {path}: image not found.")
    image, problems = read_image(path, None, option)
    if image is None:  # the dataset loader's reason, without its CSV-specific fix
        raise ChronoEditError(f"{option} {path}: {problems[0].reason} Give a readable PNG or JPEG.")
    return image


def tensor_to_pil(frame: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image (rounded to the nearest level)."""
    array = ((frame.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
