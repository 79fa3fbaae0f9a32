"""loss.png: the curves land where their values say, on a log scale."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from chronoedit_lora.train.state.loss_plot import COLOURS, MARGIN, SIZE, log_ticks, nice_ticks, plot_losses, running_mean


def _rows_of(image: np.ndarray, colour: tuple[int, int, int], column: int) -> np.ndarray:
    return np.nonzero((image[:, column] == colour).all(axis=1))[0]


def test_a_falling_loss_is_drawn_falling_with_log_spacing(tmp_path):
    steps = list(range(1, 101))
    losses = [10 * math.exp(-s / 25) for s in steps]  # 9.6 -> 0.18: nearly two decades
    path = plot_losses(steps, losses, {50: 1.0}, tmp_path / "loss.png")
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[:2] == (SIZE[1], SIZE[0])
    left, right = MARGIN[0] + 2, SIZE[0] - MARGIN[2] - 2
    mean = COLOURS["running mean"]
    start, end = _rows_of(image, mean, left), _rows_of(image, mean, right)
    assert len(start) and len(end) and start.mean() < end.mean()  # higher on screen at the start
    # on a log axis equal ratios are equal distances: the curve's drop is proportional to log(ratio)
    plot_height = SIZE[1] - MARGIN[1] - MARGIN[3]
    expected = math.log(losses[0] / losses[-1]) / math.log((max(losses) * 1.1) / (min(losses) / 1.1)) * plot_height
    assert abs((end.mean() - start.mean()) - expected) < 0.15 * expected
    assert (image == COLOURS["validation (fixed grid)"]).all(axis=2).sum() > 10  # the validation dot


def test_tick_and_mean_helpers():
    assert running_mean([4.0, 2.0, 0.0], 2) == [4.0, 3.0, 1.0]
    assert nice_ticks(1, 100) == [20, 40, 60, 80, 100]
    assert log_ticks(0.05, 30) == [0.1, 1, 10] and log_ticks(0.3, 4) == [0.5, 1, 2]
