"""Sample edits during training: held-out rows edited with the current LoRA, saved as a PNG grid
(input | edit with the LoRA | the row's edited image; for a trajectory row, edited in the
temporal-reasoning mode throughout, then a strip of the reasoning frames), plus the fixed-grid
validation loss. :class:`Preview` is how samples and ``eval_every`` edit: the sampler settings
(``sample_preset``) and the adapters stacked under the trained one (``sample_loras``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ...data.metadata import TRAJECTORY
from ...files import save_image
from ...lora import LoraWeights, UnfusedLora, beneath_peft
from ...sampling import PRESETS
from ...video import REASONING_LATENTS, tensor_to_pil
from ...pipeline import ChronoEditPipeline
from ..objective.loss import validation_loss

COLUMNS = ("input", "edit (this LoRA)", "target")
# Reasoning frames shown for a trajectory row: the last frame of each in-between latent (1..6).
STRIP_FRAMES = tuple(range(4, 4 * (REASONING_LATENTS - 1), 4))
CELL = 256  # pixels per image in the grid
LABEL_HEIGHT = 28


@dataclass(frozen=True)
class Preview:
    """How previews edit: ``steps`` at ``cfg`` and ``shift`` (None: the model folder's), with
    ``loras`` (weights, scale) stacked as hooks beneath the adapter being trained."""

    steps: int
    cfg: float = 1.0
    shift: float | None = None
    loras: tuple[tuple[LoraWeights, float], ...] = ()

    @classmethod
    def of(cls, steps: int, preset: str, loras: list[tuple[LoraWeights, float]]) -> Preview:
        """``steps`` and no preset; or the preset's steps, cfg and shift (``steps`` 0 stays 0: no edits)."""
        settings = PRESETS[preset] if preset else {"steps": steps}
        return cls(**{**settings, "steps": settings["steps"] if steps else 0}, loras=tuple(loras))

    @contextlib.contextmanager
    def stacked(self, dit: torch.nn.Module) -> Iterator[None]:
        """The DiT with :attr:`loras` applied for the duration (removed again on exit)."""
        with contextlib.ExitStack() as stack:
            for weights, scale in self.loras:
                stack.enter_context(UnfusedLora(dit, beneath_peft(weights, dit), scale))
            yield


@torch.no_grad()
def sample_grid(pipe: ChronoEditPipeline, items: list[dict], path: Path, preview: Preview, seed: int = 0) -> float:
    """Edit each item's input, write the grid to ``path``; returns the validation loss on the items
    (with the preview's stacked adapters, as the edits)."""
    was_training = pipe.dit.training
    pipe.dit.eval()
    try:
        with preview.stacked(pipe.dit):
            rows, loss = _edit_rows(pipe, items, preview, seed), validation_loss(pipe, items)
    finally:
        pipe.dit.train(was_training)
    strip_labels = tuple(f"reasoning frame {i}" for i in STRIP_FRAMES)
    labels = COLUMNS + (strip_labels if any(item["kind"] == TRAJECTORY for item in items) else ())
    save_image(grid_image(rows, labels), path)
    return loss


def _edit_rows(pipe: ChronoEditPipeline, items: list[dict], preview: Preview, seed: int) -> list[tuple[Image.Image, ...]]:
    """One grid row per item: input, edit, target (and a trajectory's reasoning frames)."""
    rows = []
    for item in items:
        source, target = tensor_to_pil(item["video"][:, 0]), tensor_to_pil(item["video"][:, -1])
        trajectory = item["kind"] == TRAJECTORY
        result = pipe(source, item["prompt"], steps=preview.steps, cfg=preview.cfg, shift=preview.shift, seed=seed,
                      height=source.height, width=source.width,
                      temporal_reasoning_steps=preview.steps if trajectory else 0, progress=False)
        strip = [result.frames[i] for i in STRIP_FRAMES] if trajectory else []
        rows.append((source, result.image, target, *strip))
    return rows


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
