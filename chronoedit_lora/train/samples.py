"""Sample edits during training: held-out pairs edited with the current LoRA, saved as a PNG grid
(input | edit with the LoRA | the pair's edited image), plus the fixed-grid validation loss."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..files import save_image
from ..video import tensor_to_pil
from ..pipeline import ChronoEditPipeline
from .objective import validation_loss


@torch.no_grad()
def sample_grid(pipe: ChronoEditPipeline, items: list[dict], path: Path, steps: int, seed: int = 0) -> float:
    """Edit each item's input, write the grid to ``path``; returns the validation loss on the items."""
    was_training = pipe.dit.training
    pipe.dit.eval()
    try:
        rows = []
        for item in items:
            source, target = tensor_to_pil(item["video"][:, 0]), tensor_to_pil(item["video"][:, -1])
            edit = pipe(source, item["prompt"], steps=steps, cfg=1.0, seed=seed, height=source.height,
                        width=source.width, progress=False).image
            rows.append((source, edit, target))
        loss = validation_loss(pipe, items)
    finally:
        pipe.dit.train(was_training)
    width = sum(image.width for image in rows[0])
    grid = Image.new("RGB", (width, sum(row[0].height for row in rows)), "white")
    y = 0
    for row in rows:
        x = 0
        for image in row:
            grid.paste(image, (x, y))
            x += image.width
        y += row[0].height
    save_image(grid, path)
    return loss
