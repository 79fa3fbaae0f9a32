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

    def __init__(self, output: Path, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.output = output
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
        writer = csv.DictWriter(buffer, METRICS_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.csv_path, buffer.getvalue())

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None, seconds: float, samples: list[int],
             val_loss: float | None = None) -> None:
        """One optimizer step: the mean loss over its accumulation window, the gradients' norm before
        clipping (None under DeepSpeed), the time the window took, the wall-clock time it was logged
        (Unix seconds: differences give the whole loop's time per step), every pair it saw (all
        ranks), and the validation loss if one was measured at this step."""
        if not self.enabled:
            return
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, METRICS_FIELDS).writerow(
                {"step": step, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}",
                 "grad_norm": "" if grad_norm is None else f"{grad_norm:.6g}",
                 "seconds": f"{seconds:.4f}", "time": f"{time.time():.4f}",
                 "samples": " ".join(map(str, samples)), "val_loss": "" if val_loss is None else f"{val_loss:.6g}"})
        if val_loss is not None:
            self.tensorboard.add_scalar("validation/loss", val_loss, step)
        self.tensorboard.add_scalar("train/loss", loss, step)
        self.tensorboard.add_scalar("train/lr", lr, step)
        if grad_norm is not None:
            self.tensorboard.add_scalar("train/grad_norm", grad_norm, step)
        self.tensorboard.add_scalar("train/seconds_per_step", seconds, step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_per_step=f"{seconds:.2f}")
        self.bar.update(1)

    def finish(self, lora_path: Path, full: bool = False) -> None:
        """Close the logs and say where the result is (``full``: a full fine-tune's last checkpoint)."""
        if not self.enabled:
            return
        self.bar.close()
        self.tensorboard.close()
        plot = plot_loss(self.csv_path, self.output / "loss.png")
        use = (["chronoedit-lora", "export", str(self.output), "--to", "diffusers", "OUT_MODEL"] if full else
               ["chronoedit-lora", "edit", "--model", "MODEL", "--lora", str(lora_path), "--image", "IN.png", "--prompt",
                "...", "--output", "OUT.png"])
        print(
            f"\n{'trained weights (sharded)' if full else 'LoRA'}: {lora_path}\n"
            f"logs: {self.csv_path} (TensorBoard: {shlex.join(['tensorboard', '--logdir', str(self.output / 'logs' / 'tensorboard')])})\n"
            + (f"loss curve: {plot}\n" if plot else "")
            + "use it: " + shlex.join(use)
        )


def read_losses(csv_path: Path) -> tuple[list[int], list[float], dict[int, float]]:
    """Steps, training losses, and the validation losses by step."""
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    validation = {int(r["step"]): float(r["val_loss"]) for r in rows if r.get("val_loss")}
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], validation


def plot_loss(csv_path: Path, png_path: Path) -> Path | None:
    """Loss per step, its running mean and the validation loss, as a PNG (None if nothing was logged)."""
    steps, losses, validation = read_losses(csv_path)
    return plot_losses(steps, losses, validation, png_path) if steps else None
