"""``loss.png``: the training loss per step, its running mean and the validation loss, on a log
scale, drawn with PIL (already loaded for the data), so that a run does not pay matplotlib's
import (about half a second) and memory to write one chart."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..files import save_image

SIZE = (720, 420)
MARGIN = (78, 24, 24, 56)  # left, top, right, bottom
COLOURS = {"loss": (158, 196, 232), "running mean": (31, 99, 180), "validation (fixed grid)": (230, 120, 20)}
GRID, AXIS, TEXT = (228, 228, 228), (90, 90, 90), (30, 30, 30)


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    span = max(high - low, 1e-12)
    raw = span / count
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """1, 2 and 5 times the powers of ten within [low, high] (only the powers if that is plenty)."""
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1) for m in (1, 2, 5)]
    inside = [t for t in ticks if low <= t <= high]
    powers = [t for t in inside if math.isclose(math.log10(t), round(math.log10(t)))]
    return powers if len(powers) >= 3 else inside


def plot_losses(steps: list[int], losses: list[float], validation: dict[int, float], png_path: Path) -> Path:
    """Draw the chart and write it atomically to ``png_path``."""
    window = max(1, len(losses) // 20)
    series = {"loss": list(zip(steps, losses)), "running mean": list(zip(steps, running_mean(losses, window))),
              "validation (fixed grid)": sorted(validation.items())}
    positive = [v for points in series.values() for _, v in points if v > 0] or [1.0]
    y_low, y_high = min(positive) / 1.1, max(positive) * 1.1
    x_low, x_high = min(steps), max(max(steps), min(steps) + 1)
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]

    def xy(step: float, value: float) -> tuple[float, float]:
        fraction = (math.log(max(value, y_low)) - math.log(y_low)) / (math.log(y_high) - math.log(y_low))
        return left + (step - x_low) / (x_high - x_low) * (right - left), bottom - fraction * (bottom - top)

    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    for value in log_ticks(y_low, y_high):
        y = xy(x_low, value)[1]
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((left - 6, y), f"{value:g}", fill=TEXT, font=font, anchor="rm")
    for step in nice_ticks(x_low, x_high):
        x = xy(step, y_low)[0]
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.text((x, bottom + 6), f"{step:g}", fill=TEXT, font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=AXIS)
    draw.text(((left + right) / 2, SIZE[1] - 8), "optimizer step", fill=TEXT, font=font, anchor="mb")
    draw.text((8, top), "flow-matching loss (log scale)", fill=TEXT, font=font, anchor="lt")
    for name, points in series.items():
        colour = COLOURS[name]
        pixels = [xy(step, value) for step, value in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=1 if name == "loss" else 2)
        if name.startswith("validation"):
            for x, y in pixels:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    legend = [(name, f"{name} ({window})" if name == "running mean" else name) for name, points in series.items() if points]
    draw.rectangle([right - 198, top + 3, right - 4, top + 5 + 16 * len(legend)], fill="white", outline=GRID)
    for row, (name, label) in enumerate(legend):
        y = top + 12 + row * 16
        draw.line([(right - 190, y), (right - 166, y)], fill=COLOURS[name], width=2)
        draw.text((right - 160, y), label, fill=TEXT, font=font, anchor="lm")
    save_image(image, png_path)
    return png_path
