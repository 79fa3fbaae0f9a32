"""Captioner plugins for the tests: describe the pair from pixel statistics (no model needed)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from chronoedit_lora.captioners import Caption


def caption(before: Image.Image, after: Image.Image, hint: str | None) -> str:
    saturation = lambda im: float(np.asarray(im.convert("HSV"))[..., 1].mean())  # noqa: E731
    change = "removes the colour" if saturation(after) < saturation(before) / 2 else "keeps the colour"
    return f"The user wants an edit that {change} of this {before.width}x{before.height} image."


def labels(before: Image.Image, after: Image.Image, hint: str | None) -> Caption:
    """Both prompts of the original release's labelling: "no change" for identical images."""
    if np.array_equal(np.asarray(before), np.asarray(after)):
        return Caption("no change")
    return Caption("Remove the colour.", f"The user wants to remove the colour of this {before.width}x{before.height} image.")


def enhance(image: Image.Image, instruction: str) -> str:
    """A prompt enhancer for the tests: the instruction in ChronoEdit's detailed form."""
    return f"The user wants to {instruction.rstrip('.').lower()} in this {image.width}x{image.height} image."
