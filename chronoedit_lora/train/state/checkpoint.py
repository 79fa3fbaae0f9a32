"""Crash-safe training checkpoints for exact ``--resume``.

A checkpoint is a folder ``checkpoints/step-000123/`` holding the LoRA (shareable safetensors; its
EMA in ``lora-ema.safetensors``), the optimizer and LR-scheduler state, the data position and every
rank's RNG states; a full fine-tune keeps its weights, AdamW moments and EMA sharded in ``state/``
instead (:mod:`.dcp`; ``optimizer.pt`` then holds the LR schedule only) and its settings in
``settings.json``. The data position is process-count independent (:class:`Progress`), so a
checkpoint continues on another number of processes with every pair still trained once per epoch.
It is written
under a temporary name, synced, then renamed (:mod:`chronoedit_lora.files`), so a crash or a full disk mid-save leaves the
previous checkpoint untouched. Everything is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ...errors import ChronoEditError
from ...files import atomic_write, replace_folder, write_text
from ...user_files import read_text

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"
# optimizer.pt's marker of today's LR-scheduler count: its position (``last_epoch``) is the number of
# the optimizer step about to train (the schedule is built at step 1, :mod:`..loop.optimizer`). The
# kit before lr_scheduler existed wrote no marker, and counted the steps done: one less.
SCHEDULER_COUNT = "scheduler_counts_next_step"


@dataclass
class Progress:
    """Where training is: optimizer steps done, the epoch, and how far into its batches.

    The ``processes`` ranks split the epoch's batches from ``epoch_start`` on (every ``processes``-th
    one each, see :meth:`.data.TrainingData.rank_batches`), and each has consumed ``batch_in_epoch``
    of its share: together the first :meth:`consumed` batches of the epoch.
    With ``keep_best``, ``best`` is the best evaluation so far: ``{"metric", "step", "value"}``.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_start: int = 0  # the epoch's batch where this split began (> 0 after resuming on another process count)
    processes: int = 1
    best: dict | None = None

    def consumed(self) -> int:
        """Batches of the current epoch trained so far, by all processes together."""
        return self.epoch_start + self.batch_in_epoch * self.processes

    def position(self) -> tuple[int, int, int]:
        """(epoch, epoch_start, batch_in_epoch): which batch each rank trains next."""
        return self.epoch, self.epoch_start, self.batch_in_epoch

    def next_epoch(self) -> None:
        self.epoch, self.epoch_start, self.batch_in_epoch = self.epoch + 1, 0, 0

    def continued_on(self, processes: int) -> Progress:
        """The same point of training, split across ``processes`` from the next untrained batch on."""
        if processes == self.processes:
            return self
        return Progress(self.step, self.epoch, 0, self.consumed(), processes, self.best)


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"{_PREFIX}{step:06d}"


def staging_dir(output: Path, step: int) -> Path:
    """Where a checkpoint is assembled before the atomic rename."""
    return output / CHECKPOINTS / f".{_PREFIX}{step:06d}.partial"


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoint folders in ``folder`` (``output/checkpoints``), oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(_PREFIX) and (p / "progress.json").is_file())


def latest_checkpoint(output: Path) -> Path | None:
    """Newest complete checkpoint folder under ``output`` (partial ones are ignored)."""
    done = complete_checkpoints(output / CHECKPOINTS)
    return done[-1] if done else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rank_state(staging: Path, rank: int) -> None:
    """Each rank saves its own RNG states into the staging folder."""
    staging.mkdir(parents=True, exist_ok=True)
    with atomic_write(staging / f"rng-rank{rank}.pt") as f:
        torch.save(rng_state(), f)


def finalize(staging: Path, final: Path, progress: Progress, optimizer_state: dict | None, scheduler_state: dict,
             keep: int) -> None:
    """Rank 0: write the shared state (``optimizer_state`` None: it is in ``state/``), rename the folder
    into place, prune old checkpoints."""
    with atomic_write(staging / "optimizer.pt") as f:
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, SCHEDULER_COUNT: True}, f)
    write_text(staging / "progress.json", json.dumps(asdict(progress)))
    replace_folder(staging, final)
    old = sorted(p for p in final.parent.iterdir() if p.name.startswith(_PREFIX))[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


def load_progress(folder: Path) -> Progress:
    """The checkpoint's position, checked: whole numbers >= 0 (else a damaged file: ValueError). One
    saved before the process count was recorded counts its processes from its RNG files."""
    values = json.loads(read_text(folder / "progress.json"))
    if isinstance(values, dict):
        values.setdefault("processes", max(len(list(folder.glob("rng-rank*.pt"))), 1))
    progress = Progress(**values)  # TypeError for another form
    counts = [value for name, value in asdict(progress).items() if name != "best"]
    best = progress.best
    if not all(type(value) is int and value >= 0 for value in counts) or progress.processes < 1 or not (
            best is None or (isinstance(best, dict) and set(best) == {"metric", "step", "value"}
                             and isinstance(best["metric"], str) and type(best["step"]) is int
                             and isinstance(best["value"], (int, float)))):
        raise ValueError(f"progress.json holds {values!r}, not whole numbers and a best evaluation")
    return progress


def load_optimizer_state(folder: Path) -> dict:
    return torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)


def scheduler_state(saved: dict) -> dict:
    """The LR-scheduler state in ``saved`` (optimizer.pt's contents) in today's count. An old kit's
    (no :data:`SCHEDULER_COUNT`) is moved one step on; its learning rate for the next step is
    already the one today's schedule gives there, so only the position changes."""
    state = dict(saved["scheduler"])
    if not saved.get(SCHEDULER_COUNT):
        state["last_epoch"] += 1
    return state


def load_rank_state(folder: Path, rank: int) -> None:
    path = folder / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise ChronoEditError(
            f"{folder} has no RNG state for rank {rank}; resume with the same number of processes "
            "it was saved with."
        )
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
