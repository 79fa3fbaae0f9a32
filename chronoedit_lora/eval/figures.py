"""``metrics.png`` (one panel per metric over the checkpoints, the best one ringed) and ``grid.png``
(held-out inputs x checkpoints, labelled, with the target and the base), drawn with PIL through
the training charts' :func:`~chronoedit_lora.train.state.loss_plot.draw_chart` and sample grids'
:func:`~chronoedit_lora.train.loop.samples.grid_image`."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..files import save_image
from ..train.state.loss_plot import Line, draw_chart
from ..train.loop.samples import grid_image
from .checkpoints import BASE, Checkpoint
from .held_out import HeldOutPair
from .metrics import COUNTED, LOSS, METRICS, NEUTRAL
from .report import QUANTILE_COLUMNS, Table, best_per_metric, measured

PANEL = (520, 300)
COLUMNS = 2
LINE, QUANTILE_LINE = (31, 99, 180), (170, 200, 230)
GRID_CELL = 192


def positions(checkpoints: list[Checkpoint]) -> tuple[dict[str, float], dict[float, str] | None, str]:
    """x of each checkpoint: its step (the base at 0) when every LoRA has one, else its place in the
    list with the labels as tick names; and the axis label."""
    if all(c.step is not None for c in checkpoints if c.label != BASE):
        return {c.label: float(c.step or 0) for c in checkpoints}, None, "training step (base at 0)"
    xs = {c.label: float(i) for i, c in enumerate(checkpoints)}
    return xs, {x: label for label, x in xs.items()}, "checkpoint"


def metrics_figure(checkpoints: list[Checkpoint], table: Table) -> Image.Image:
    """One panel per measured metric (the quantile losses drawn faintly in the loss panel)."""
    xs, names, x_label = positions(checkpoints)
    best = best_per_metric(checkpoints, table)
    panels = [m for m in measured(table) if m not in QUANTILE_COLUMNS and m not in COUNTED]
    rows = (len(panels) + COLUMNS - 1) // COLUMNS
    image = Image.new("RGB", (PANEL[0] * COLUMNS, PANEL[1] * rows), "white")
    for index, metric in enumerate(panels):
        def points(column: str) -> list[tuple[float, float]]:
            return [(xs[c.label], table[c.label][column]) for c in checkpoints if table[c.label].get(column) is not None]

        lines = [Line(column, points(column), QUANTILE_LINE, width=1) for column in sorted(QUANTILE_COLUMNS & set(measured(table)))
                 ] if metric == LOSS else []
        lines.append(Line(metric, points(metric), LINE, dots=True))
        direction = METRICS[metric][0]
        title = f"{metric} ({direction} is better)" if direction != NEUTRAL else metric
        if metric in best:
            title += f"; best: {best[metric]}"
        left, top = (index % COLUMNS) * PANEL[0], (index // COLUMNS) * PANEL[1]
        mark = (xs[best[metric]], table[best[metric]][metric]) if metric in best else None
        draw_chart(image, (left, top, left + PANEL[0], top + PANEL[1]), lines, title, x_label, x_names=names, mark=mark,
                   legend_width=0)
    return image


def grid_figure(checkpoints: list[Checkpoint], pairs: list[HeldOutPair], edits: dict[str, list[Image.Image]]) -> Image.Image:
    """Rows: held-out pairs; columns: input, target, then each checkpoint's edit (the base first)."""
    rows = [(pair.source, pair.target, *(edits[c.label][i] for c in checkpoints)) for i, pair in enumerate(pairs)]
    return grid_image(rows, ("input", "target", *(c.label for c in checkpoints)), cell=GRID_CELL)


def write_figures(folder: Path, checkpoints: list[Checkpoint], table: Table, pairs: list[HeldOutPair],
                  edits: dict[str, list[Image.Image]]) -> list[Path]:
    """``metrics.png``, and ``grid.png`` if there are edits, into ``folder``; returns what was written."""
    written = [folder / "metrics.png"]
    save_image(metrics_figure(checkpoints, table), written[0])
    if all(edits.get(c.label) for c in checkpoints):
        written.append(folder / "grid.png")
        save_image(grid_figure(checkpoints, pairs, edits), written[1])
    return written
