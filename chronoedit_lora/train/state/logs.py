"""What the user sees while training: a progress bar, metrics CSV, the experiment trackers
(TensorBoard by default, see :mod:`.trackers`), a loss plot, a summary."""

from __future__ import annotations

import csv
import io
import shlex
import time
from pathlib import Path

from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from ...files import write_text, writing
from .loss_plot import plot_losses
from .trackers import hyperparameters, log_image, log_scalars, log_table, quiet_writer_threads, tracker_kwargs

METRICS_FIELDS = ["step", "loss", "lr", "grad_norm", "seconds", "time", "samples", "val_loss"]
PRESERVATION = "preservation"  # the column of the preservation term (a run with preservation_dataset)


class TrainingLog:
    """Logs one row per optimizer step (main process only; a no-op elsewhere).

    The trackers are the ``accelerator``'s (``Accelerator(log_with=..., project_config=...)``), started
    here under ``project`` with the run's settings as hyperparameters.
    """

    def __init__(self, accelerator: Accelerator, output: Path, total_steps: int, start_step: int, project: str,
                 config_json: str, extra_fields: list[str] = ()):
        """``extra_fields``: columns after :data:`METRICS_FIELDS` (the evaluation's ``eval/<metric>``)."""
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.output = output
        self.fields = METRICS_FIELDS + list(extra_fields)
        if not self.enabled:
            return
        self.csv_path = output / "logs" / "metrics.csv"
        self._keep_rows_up_to(start_step)  # a resumed run redoes the steps after its checkpoint
        with writing(output / "logs"):  # the trackers write their first files now (TensorBoard: more on a thread)
            accelerator.init_trackers(project, config=hyperparameters(config_json),
                                      init_kwargs=tracker_kwargs(output, start_step))
        if any(tracker.name == "tensorboard" for tracker in accelerator.trackers):
            quiet_writer_threads()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)

    def _keep_rows_up_to(self, step: int) -> None:
        rows = [r for r in read_rows(self.csv_path) if int(r["step"]) <= step] if self.csv_path.is_file() else []
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.fields, extrasaction="ignore")  # drops columns no longer logged
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.csv_path, buffer.getvalue())

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None, seconds: float, samples: list[int],
             val_loss: float | None = None, evaluation: dict[str, float] | None = None,
             preservation: float | None = None) -> None:
        """One optimizer step: the mean loss over its accumulation window, the gradients' norm before
        clipping (None under DeepSpeed), the time the window took, the wall-clock time it was logged
        (Unix seconds: differences give the whole loop's time per step), every pair it saw (all
        ranks), the validation loss and the evaluation's metrics if they were measured at this step,
        and the preservation term (its ``preservation`` column, with a preservation dataset)."""
        if not self.enabled:
            return
        evaluated = {f"eval/{k}": v for k, v in (evaluation or {}).items() if f"eval/{k}" in self.fields and v is not None}
        if preservation is not None:
            evaluated[PRESERVATION] = preservation
        with writing(self.csv_path), self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(
                {"step": step, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}",
                 "grad_norm": "" if grad_norm is None else f"{grad_norm:.6g}",
                 "seconds": f"{seconds:.4f}", "time": f"{time.time():.4f}",
                 "samples": " ".join(map(str, samples)), "val_loss": "" if val_loss is None else f"{val_loss:.6g}",
                 **{k: f"{v:.6g}" for k, v in evaluated.items()}})
        scalars = {"train/loss": loss, "train/lr": lr, "train/seconds_per_step": seconds,
                   **{k if k.startswith("eval/") else f"train/{k}": v for k, v in evaluated.items()}}
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        if val_loss is not None:
            scalars["validation/loss"] = val_loss
        log_scalars(self.accelerator, self.output, scalars, step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_per_step=f"{seconds:.2f}")
        self.bar.update(1)

    def samples(self, grid: Path, items: list[dict], step: int) -> None:
        """A sample grid (as an image) and its rows (as a table) in the trackers that take them."""
        if not self.enabled:
            return
        with Image.open(grid) as image:
            log_image(self.accelerator, self.output, "sample_grid", image, step)
        log_table(self.accelerator, self.output, "sample_rows", ["row", "kind", "prompt"],
                  [[i, item["kind"], item["prompt"]] for i, item in enumerate(items)], step)

    def finish(self, lora_path: Path, adapter: str, full: bool = False) -> None:
        """Say where the result is (``full``: a full fine-tune's last checkpoint; the trainer's
        ``accelerator.end_training()`` closes the trackers)."""
        if not self.enabled:
            return
        self.bar.close()
        plot = plot_loss(self.csv_path, self.output / "loss.png")
        tensorboard = self.output / "logs" / "tensorboard"
        use = (["chronoedit-lora", "export", str(self.output), "--to", "diffusers", "OUT_MODEL"] if full else
               ["chronoedit-lora", "edit", "--model", "MODEL", "--lora", str(lora_path), "--image", "IN.png", "--prompt",
                "...", "--output", "OUT.png"])
        print(
            f"\n{'trained weights (sharded)' if full else adapter}: {lora_path}\n"
            f"logs: {self.csv_path}"
            + (f" (TensorBoard: {shlex.join(['tensorboard', '--logdir', str(tensorboard)])})" if tensorboard.is_dir() else "")
            + "\n"
            + (f"loss curve: {plot}\n" if plot else "")
            + "use it: " + shlex.join(use)
        )


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of a metrics CSV that were written whole: a row cut short by a full disk or a
    killed process (its step or loss unreadable) is left out, not trusted."""
    def whole(row: dict) -> bool:
        try:
            int(row["step"]), float(row["loss"])
        except (KeyError, TypeError, ValueError):
            return False
        return None not in row and None not in row.values()  # not cut short, no stray fields

    with csv_path.open(newline="", errors="replace") as f:
        return [row for row in csv.DictReader(f) if whole(row)]


def read_losses(csv_path: Path) -> tuple[list[int], list[float], dict[int, float], dict[int, float]]:
    """Steps, training losses, and the validation and held-out (evaluation) losses by step."""
    rows = read_rows(csv_path)

    def by_step(column: str) -> dict[int, float]:
        return {int(r["step"]): float(r[column]) for r in rows if r.get(column)}

    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], by_step("val_loss"), by_step("eval/loss")


def plot_loss(csv_path: Path, png_path: Path) -> Path | None:
    """Loss per step, its running mean, the validation and held-out losses, as a PNG (None if nothing was logged)."""
    steps, losses, validation, held_out = read_losses(csv_path)
    return plot_losses(steps, losses, validation, png_path, held_out) if steps else None
