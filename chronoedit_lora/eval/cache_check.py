"""``calibrate-cache --check``: each step-cache setting's edits against the uncached ones (calls saved,
PSNR, SSIM, LPIPS with a local model), as a table and a plot drawn with the kit's PIL chart drawer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..files import save_image
from ..pipeline import ChronoEditPipeline
from ..step_cache import Calibration, StepCache, StepCacheSpec, predicted_plan
from ..train.state.loss_plot import Line, draw_chart
from .held_out import EditSettings, HeldOutPair, edit_pair, reasoning_steps
from .image_metrics import psnr, ssim

COLOURS = {"first-block": (31, 99, 180), "mag": (230, 120, 20), "tea": (40, 150, 60)}


@dataclass
class CheckRow:
    """One setting over every held-out pair: DiT calls computed and skipped (every branch), the calls
    the calibration predicts (mag, tea), and the mean scores against the uncached edits."""

    spec: StepCacheSpec
    computed: int
    skipped: int
    predicted: int | None
    psnr: float
    ssim: float
    lpips: float | None

    @property
    def saved(self) -> float:
        return self.skipped / (self.computed + self.skipped)


@torch.no_grad()
def check_settings(pipe: ChronoEditPipeline, pairs: list[HeldOutPair], settings: EditSettings,
                   negative: torch.Tensor | None, calibration: Calibration, uncached: list[Image.Image],
                   specs: list[StepCacheSpec], lpips: torch.nn.Module | None = None) -> list[CheckRow]:
    """Edit every pair with each spec and score it against its uncached edit."""
    branches = 2 if negative is not None and not settings.batched_guidance else 1
    rows = []
    for spec in specs:
        caches, scores = [], []
        for pair, reference in zip(pairs, uncached):
            cache = StepCache(pipe.dit, spec, settings.steps, reasoning_steps(pair, settings), calibration)
            image = edit_pair(pipe, pair, settings, negative, cache)
            caches.append(cache)
            scores.append((psnr(image, reference), ssim(image, reference),
                           lpips.distance(image, reference) if lpips is not None else None))
        predicted = None if spec.method == "first-block" else branches * sum(
            sum(predicted_plan(spec, calibration, reasoning_steps(pair, settings))) for pair in pairs)
        computed, skipped = (sum(c.calls()[i] for c in caches) for i in (0, 1))
        mean = [sum(s[i] for s in scores) / len(scores) if scores[0][i] is not None else None for i in range(3)]
        rows.append(CheckRow(spec, computed, skipped, predicted, *mean))
    return rows


def check_table(rows: list[CheckRow]) -> str:
    """The rows as a Markdown table."""
    lines = ["| setting | DiT calls | skipped | predicted calls | calls saved | PSNR (dB) | SSIM | LPIPS |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lpips = "-" if row.lpips is None else f"{row.lpips:.4f}"
        predicted = "-" if row.predicted is None else str(row.predicted)
        lines.append(f"| {row.spec} | {row.computed} | {row.skipped} | {predicted} | {row.saved:.0%} | "
                     f"{row.psnr:.2f} | {row.ssim:.4f} | {lpips} |")
    return "\n".join(lines)


def check_plot(rows: list[CheckRow], path: Path) -> Path:
    """PSNR against the uncached edit over the share of calls saved, one line per method."""
    image = Image.new("RGB", (720, 420), "white")
    lines = [Line(method, sorted((100 * r.saved, r.psnr) for r in rows if r.spec.method == method), colour, dots=True)
             for method, colour in COLOURS.items() if any(r.spec.method == method for r in rows)]
    draw_chart(image, (0, 0, 720, 420), lines, "step cache: PSNR against the uncached edit", "DiT calls saved (%)")
    save_image(image, path)
    return path
