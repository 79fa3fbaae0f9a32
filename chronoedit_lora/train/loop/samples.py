"""Sample edits during training: held-out rows edited with the current LoRA, saved as a PNG grid
(input | edit with the LoRA | the row's edited image; for a trajectory row, edited in the
temporal-reasoning mode throughout, then a strip of the reasoning frames), plus the fixed-grid
validation loss."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ...data.metadata import TRAJECTORY
from ...files import save_image
from ...video import REASONING_LATENTS, tensor_to_pil
from ...pipeline import ChronoEditPipeline
from ..objective.loss import validation_loss

COLUMNS = ("input", "edit (this LoRA)", "target")
# Reasoning frames shown for a trajectory row: the last frame of each in-between latent (1..6).
STRIP_FRAMES = tuple(range(4, 4 * (REASONING_LATENTS - 1), 4))
CELL = 256  # pixels per image in the grid
LABEL_HEIGHT = 28


@torch.no_grad()
def sample_grid(pipe: ChronoEditPipeline, items: list[dict], path: Path, steps: int, seed: int = 0) -> float:
    """Edit each item's input, write the grid to ``path``; returns the validation loss on the items."""
    was_training = pipe.dit.training
    pipe.dit.eval()
    try:
        rows = []
        for item in items:
            source, target = tensor_to_pil(item["video"][:, 0]), tensor_to_pil(item["video"][:, -1])
            trajectory = item["kind"] == TRAJECTORY
            result = pipe(source, item["prompt"], steps=steps, cfg=1.0, seed=seed, height=source.height,
                          width=source.width, temporal_reasoning_steps=steps if trajectory else 0, progress=False)
            strip = [result.frames[i] for i in STRIP_FRAMES] if trajectory else []
            rows.append((source, result.image, target, *strip))
        loss = validation_loss(pipe, items)
    finally:
        pipe.dit.train(was_training)
    strip_labels = tuple(f"reasoning frame {i}" for i in STRIP_FRAMES)
    labels = COLUMNS + (strip_labels if any(item["kind"] == TRAJECTORY for item in items) else ())
    save_image(grid_image(rows, labels), path)
    return loss


def grid_image(rows: list[tuple[Image.Image, ...]], labels: tuple[str, ...], cell: int = CELL) -> Image.Image:
    """Images in ``cell`` x ``cell`` boxes (scaled to fit; small ones enlarged without blurring),
    one row per item, under a band of column labels."""
    grid = Image.new("RGB", (cell * len(labels), LABEL_HEIGHT + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(labels):
        draw.text((column * cell + cell // 2, LABEL_HEIGHT // 2), label, fill="black", anchor="mm",
                  font=ImageFont.load_default(size=LABEL_HEIGHT * 2 // 3))
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            scale = cell / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            fitted = image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
            grid.paste(fitted, (column * cell + (cell - size[0]) // 2, LABEL_HEIGHT + row * cell + (cell - size[1]) // 2))
    return grid
