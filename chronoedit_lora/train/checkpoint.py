"""Crash-safe training checkpoints for exact ``--resume``.

A checkpoint is a folder ``checkpoints/step-000123/`` holding the LoRA (shareable safetensors),
the optimizer and LR-scheduler state, the data position and every rank's RNG states. It is written
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

from ..errors import ChronoEditError
from ..files import atomic_write, replace_folder, write_text

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


@dataclass
class Progress:
    """Where training is: optimizer steps done, epoch, batches of that epoch already consumed, and
    (with keep_best) the best evaluation so far: ``{"metric", "step", "value"}``."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: dict | None = None


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


def finalize(staging: Path, final: Path, progress: Progress, optimizer_state: dict, scheduler_state: dict, keep: int) -> None:
    """Rank 0: write the shared state, rename the folder into place, prune old checkpoints."""
    with atomic_write(staging / "optimizer.pt") as f:
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state}, f)
    write_text(staging / "progress.json", json.dumps(asdict(progress)))
    replace_folder(staging, final)
    old = sorted(p for p in final.parent.iterdir() if p.name.startswith(_PREFIX))[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


def load_progress(folder: Path) -> Progress:
    return Progress(**json.loads((folder / "progress.json").read_text()))


def load_optimizer_state(folder: Path) -> dict:
    return torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)


def load_rank_state(folder: Path, rank: int) -> None:
    path = folder / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise ChronoEditError(
            f"{folder} has no RNG state for rank {rank}; resume with the same number of processes "
            "it was saved with."
        )
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
