"""Plugins that fail the way real ones do, for the fault tests (a captioner that raises or returns blank text)."""

from __future__ import annotations

from PIL import Image


def raising(before: Image.Image, after: Image.Image, hint: str | None) -> str:
    raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")


def blank(before: Image.Image, after: Image.Image, hint: str | None) -> str:
    return "  \n "


def blank_enhancer(image: Image.Image, instruction: str) -> str:
    return ""
