"""Evaluation during training (``eval_every``): the cheap part of ``chronoedit-lora eval`` with the
live LoRA on a few held-out pairs (encoded once), on the main process as sampling is; and
``keep_best``: the best evaluated step's LoRA kept as ``lora-best.safetensors``.

The best is exact across ``--resume``: its metric, step and value are in the checkpoint's
``progress.json`` and a copy of its file is in the checkpoint folder (a copy, not a link: a file
copied over ``lora-best.safetensors`` in place must not change the checkpoint), put back in place
when a run resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator

from ...files import copy_file
from ..distributed import fsdp
from ..state import lora_export
from ..state.checkpoint import Progress
from .config import TrainConfig

if TYPE_CHECKING:
    from .samples import Preview

BEST_NAME = "lora-best.safetensors"
PREFIX = "eval/"  # of the evaluation's columns in logs/metrics.csv and its TensorBoard tags


class TrainingEvaluation:
    """Scores the DiT as it is now on the first ``eval_count`` rows of ``eval_dataset``, edited as
    ``preview`` says (steps, cfg, shift, adapters stacked beneath the trained one)."""

    def __init__(self, config: TrainConfig, held_out, preview: Preview):
        from ...eval.held_out import EditSettings

        self.config = config
        self.preview = preview
        self.items = [held_out[i] for i in range(min(config.eval_count, len(held_out)))]
        self.settings = (EditSettings(steps=preview.steps, cfg=preview.cfg, shift=preview.shift, seed=config.seed)
                         if preview.steps else None)
        self.pairs = None  # encoded at the first evaluation, reused by every later one

    def fields(self) -> list[str]:
        """The metrics.csv columns it fills."""
        from ...eval.metrics import LOSS, TRAINING_METRICS

        return [PREFIX + m for m in TRAINING_METRICS if self.settings or m.startswith(LOSS)]

    def due(self, step: int, last: bool) -> bool:
        return step % self.config.eval_every == 0 or last

    def __call__(self, pipe) -> dict[str, float]:
        from ...eval.held_out import encode_pairs
        from ...eval.metrics import QUANTILES
        from ...eval.runner import score_current, summarise

        if self.pairs is None:
            self.pairs = encode_pairs(pipe, self.items, len(QUANTILES), self.config.seed)
        was_training = pipe.dit.training
        pipe.dit.eval()
        try:
            with self.preview.stacked(pipe.dit):
                values, _ = score_current(pipe, self.pairs, self.settings, None)
        finally:
            pipe.dit.train(was_training)
        return summarise(values)


def improves(progress: Progress, metric: str, value: float, step: int) -> bool:
    """Record ``value`` of ``metric`` at ``step`` as the best if it beats the best so far (a best
    kept for another metric, after a resume with a changed keep_best, does not count)."""
    from ...eval.metrics import better

    best = progress.best
    if best is not None and best["metric"] == metric and not better(metric, value, best["value"]):
        return False
    progress.best = {"metric": metric, "step": step, "value": value}
    return True


def evaluate_step(accelerator: Accelerator, pipe, module, evaluation: TrainingEvaluation, progress: Progress,
                  config: TrainConfig, output: Path) -> dict[str, float] | None:
    """Main process: evaluate, keep the LoRA if it is the best so far; the others wait. Returns the
    metrics (None on the other processes)."""
    metrics = None
    if accelerator.is_main_process:
        metrics = evaluation(pipe)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "psnr", "ssim"))
        if config.keep_best and improves(progress, config.keep_best, metrics[config.keep_best], progress.step):
            lora_export.save(fsdp.full_lora(accelerator.unwrap_model(module), keep=True), output / BEST_NAME, config,
                             progress.step)
            shown += f"; best {config.keep_best} so far: {output / BEST_NAME}"
        accelerator.print(f"\nstep {progress.step}: held-out {shown}")
    accelerator.wait_for_everyone()
    return metrics


def snapshot_best(output: Path, staging: Path) -> None:
    """Put the current ``lora-best.safetensors`` (if any) into a checkpoint being written."""
    if (output / BEST_NAME).is_file():
        copy_file(output / BEST_NAME, staging / BEST_NAME)


def restore_best(output: Path, checkpoint: Path) -> None:
    """Make ``lora-best.safetensors`` the one the checkpoint saw (none if it had none)."""
    saved = checkpoint / BEST_NAME
    if saved.is_file():
        copy_file(saved, output / BEST_NAME)
    else:
        (output / BEST_NAME).unlink(missing_ok=True)
