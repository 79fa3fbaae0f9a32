"""Plugins that fail the way real ones do, for the fault tests (a captioner that raises, exits, or returns text
a CSV cannot hold)."""

from __future__ import annotations

import sys
import time

from PIL import Image


def raising(before: Image.Image, after: Image.Image, hint: str | None) -> str:
    raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")


def blank(before: Image.Image, after: Image.Image, hint: str | None) -> str:
    return "  \n "


def blank_enhancer(image: Image.Image, instruction: str) -> str:
    return ""


def exiting(before: Image.Image, after: Image.Image, hint: str | None) -> str:
    sys.exit(0)


def interrupted(before: Image.Image, after: Image.Image, hint: str | None) -> str:
    raise KeyboardInterrupt


def slow(before: Image.Image, after: Image.Image, hint: str | None) -> str:
    print("slow captioner: started", file=sys.stderr, flush=True)
    time.sleep(300)
    return "make it red"


def huge(before: Image.Image, after: Image.Image, hint: str | None) -> str:
    return "make it red " * 300_000  # 3.6 MB


def nul(before: Image.Image, after: Image.Image, hint: str | None) -> str:
    return "make it\0 red"


def escape(before: Image.Image, after: Image.Image, hint: str | None) -> str:
    return "make it \x1b[31mred"
