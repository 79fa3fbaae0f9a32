"""``loss.png``: the training loss per step, its running mean, the validation loss and the held-out
loss, on a log scale, drawn with PIL (already loaded for the data), so that a run does not pay
matplotlib's import (about half a second) and memory to write one chart. :func:`draw_chart` draws
one such chart into any box of an image (the evaluation's metric panels use it too)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ...files import save_image

SIZE = (720, 420)
MARGIN = (78, 24, 24, 56)  # left, top, right, bottom
VALIDATION, HELD_OUT = "validation (fixed grid)", "held-out loss (quantiles)"
COLOURS = {"loss": (158, 196, 232), "running mean": (31, 99, 180), VALIDATION: (230, 120, 20), HELD_OUT: (40, 150, 60)}
GRID, AXIS, TEXT = (228, 228, 228), (90, 90, 90), (30, 30, 30)
MARK = (200, 30, 30)  # the ring around a chart's marked point


@dataclass
class Line:
    """One series of a chart: its legend label, its points (x, y), colour and width; ``dots``: each point as a dot."""

    label: str
    points: list[tuple[float, float]]
    colour: tuple[int, int, int]
    width: int = 2
    dots: bool = False


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


def draw_chart(image: Image.Image, box: tuple[int, int, int, int], lines: list[Line], title: str, x_label: str,
               log_y: bool = False, x_names: dict[float, str] | None = None, mark: tuple[float, float] | None = None,
               legend_width: int = 198) -> None:
    """Draw ``lines`` into ``box`` (left, top, right, bottom) of ``image``: grid, ticks (``x_names``
    replaces the x ticks by named positions), title, legend, and a ring around ``mark``."""
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    values = [y for line in lines for _, y in line.points]
    xs = [x for line in lines for x, _ in line.points] or [0.0]
    if log_y:
        positive = [v for v in values if v > 0] or [1.0]
        y_low, y_high = min(positive) / 1.1, max(positive) * 1.1
    else:
        pad = max((max(values) - min(values)) * 0.08, abs(max(values)) * 0.01, 1e-6) if values else 1.0
        y_low, y_high = (min(values) - pad, max(values) + pad) if values else (0.0, 1.0)
    x_low, x_high = min(xs), max(max(xs), min(xs) + 1)
    left, top, right, bottom = box[0] + MARGIN[0], box[1] + MARGIN[1], box[2] - MARGIN[2], box[3] - MARGIN[3]

    def y_fraction(value: float) -> float:
        if log_y:
            return (math.log(max(value, y_low)) - math.log(y_low)) / (math.log(y_high) - math.log(y_low))
        return (value - y_low) / (y_high - y_low)

    def xy(x: float, value: float) -> tuple[float, float]:
        return left + (x - x_low) / (x_high - x_low) * (right - left), bottom - y_fraction(value) * (bottom - top)

    for value in (log_ticks(y_low, y_high) if log_y else nice_ticks(y_low, y_high, 5)):
        y = xy(x_low, value)[1]
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((left - 6, y), f"{value:g}", fill=TEXT, font=font, anchor="rm")
    x_ticks = x_names or {x: f"{x:g}" for x in nice_ticks(x_low, x_high)}
    for x, name in x_ticks.items():
        px = xy(x, y_low)[0]
        draw.line([(px, top), (px, bottom)], fill=GRID)
        draw.text((px, bottom + 6), name, fill=TEXT, font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=AXIS)
    draw.text(((left + right) / 2, box[3] - 8), x_label, fill=TEXT, font=font, anchor="mb")
    draw.text((box[0] + 8, box[1] + MARGIN[1] - 16 if not log_y else top), title, fill=TEXT, font=font, anchor="lt")
    for line in lines:
        pixels = [xy(x, y) for x, y in line.points]
        if len(pixels) > 1:
            draw.line(pixels, fill=line.colour, width=line.width)
        if line.dots or len(pixels) == 1:
            for x, y in pixels:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=line.colour)
    if mark is not None:
        x, y = xy(*mark)
        draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=MARK, width=2)
    shown = [line for line in lines if line.points]
    if legend_width and shown:
        draw.rectangle([right - legend_width, top + 3, right - 4, top + 5 + 16 * len(shown)], fill="white", outline=GRID)
        for row, line in enumerate(shown):
            y = top + 12 + row * 16
            draw.line([(right - legend_width + 8, y), (right - legend_width + 32, y)], fill=line.colour, width=2)
            draw.text((right - legend_width + 38, y), line.label, fill=TEXT, font=font, anchor="lm")


def plot_losses(steps: list[int], losses: list[float], validation: dict[int, float], png_path: Path,
                held_out: dict[int, float] | None = None) -> Path:
    """Draw the chart (``held_out``: the evaluation's loss by step, if any) and write it atomically to ``png_path``."""
    window = max(1, len(losses) // 20)
    lines = [Line("loss", list(zip(steps, losses)), COLOURS["loss"], width=1),
             Line(f"running mean ({window})", list(zip(steps, running_mean(losses, window))), COLOURS["running mean"]),
             Line(VALIDATION, sorted(validation.items()), COLOURS[VALIDATION], dots=True),
             Line(HELD_OUT, sorted((held_out or {}).items()), COLOURS[HELD_OUT], dots=True)]
    image = Image.new("RGB", SIZE, "white")
    draw_chart(image, (0, 0, *SIZE), lines, "flow-matching loss (log scale)", "optimizer step", log_y=True)
    save_image(image, png_path)
    return png_path
