"""What the user sees while training: a progress bar, metrics CSV, TensorBoard, a loss plot, a summary."""

from __future__ import annotations

import csv
import io
import shlex
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..files import write_text
from .loss_plot import plot_losses

METRICS_FIELDS = ["step", "loss", "lr", "grad_norm", "seconds", "time", "samples", "val_loss"]


class TrainingLog:
    """Logs one row per optimizer step (main process only; a no-op elsewhere)."""

    def __init__(self, output: Path, total_steps: int, start_step: int, enabled: bool = True,
                 extra_fields: list[str] = ()):
        """``extra_fields``: columns after :data:`METRICS_FIELDS` (the evaluation's ``eval/<metric>``)."""
        self.enabled = enabled
        self.output = output
        self.fields = METRICS_FIELDS + list(extra_fields)
        if not enabled:
            return
        self.csv_path = output / "logs" / "metrics.csv"
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        self._keep_rows_up_to(start_step)  # a resumed run redoes the steps after its checkpoint
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(output / "logs" / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)

    def _keep_rows_up_to(self, step: int) -> None:
        rows = []
        if self.csv_path.is_file():
            with self.csv_path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.fields, extrasaction="ignore")  # drops columns no longer logged
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.csv_path, buffer.getvalue())

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None, seconds: float, samples: list[int],
             val_loss: float | None = None, evaluation: dict[str, float] | None = None) -> None:
        """One optimizer step: the mean loss over its accumulation window, the gradients' norm before
        clipping (None under DeepSpeed), the time the window took, the wall-clock time it was logged
        (Unix seconds: differences give the whole loop's time per step), every pair it saw (all
        ranks), and the validation loss and the evaluation's metrics if they were measured at this step."""
        if not self.enabled:
            return
        evaluated = {f"eval/{k}": v for k, v in (evaluation or {}).items() if f"eval/{k}" in self.fields and v is not None}
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(
                {"step": step, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}",
                 "grad_norm": "" if grad_norm is None else f"{grad_norm:.6g}",
                 "seconds": f"{seconds:.4f}", "time": f"{time.time():.4f}",
                 "samples": " ".join(map(str, samples)), "val_loss": "" if val_loss is None else f"{val_loss:.6g}",
                 **{k: f"{v:.6g}" for k, v in evaluated.items()}})
        if val_loss is not None:
            self.tensorboard.add_scalar("validation/loss", val_loss, step)
        for tag, value in evaluated.items():
            self.tensorboard.add_scalar(tag, value, step)
        self.tensorboard.add_scalar("train/loss", loss, step)
        self.tensorboard.add_scalar("train/lr", lr, step)
        if grad_norm is not None:
            self.tensorboard.add_scalar("train/grad_norm", grad_norm, step)
        self.tensorboard.add_scalar("train/seconds_per_step", seconds, step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_per_step=f"{seconds:.2f}")
        self.bar.update(1)

    def finish(self, lora_path: Path) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.tensorboard.close()
        plot = plot_loss(self.csv_path, self.output / "loss.png")
        print(
            f"\nLoRA: {lora_path}\n"
            f"logs: {self.csv_path} (TensorBoard: {shlex.join(['tensorboard', '--logdir', str(self.output / 'logs' / 'tensorboard')])})\n"
            + (f"loss curve: {plot}\n" if plot else "")
            + "use it: " + shlex.join(["chronoedit-lora", "edit", "--model", "MODEL", "--lora", str(lora_path), "--image",
                                        "IN.png", "--prompt", "...", "--output", "OUT.png"])
        )


def read_losses(csv_path: Path) -> tuple[list[int], list[float], dict[int, float], dict[int, float]]:
    """Steps, training losses, and the validation and held-out (evaluation) losses by step."""
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))

    def by_step(column: str) -> dict[int, float]:
        return {int(r["step"]): float(r[column]) for r in rows if r.get(column)}

    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], by_step("val_loss"), by_step("eval/loss")


def plot_loss(csv_path: Path, png_path: Path) -> Path | None:
    """Loss per step, its running mean, the validation and held-out losses, as a PNG (None if nothing was logged)."""
    steps, losses, validation, held_out = read_losses(csv_path)
    return plot_losses(steps, losses, validation, png_path, held_out) if steps else None
