"""Crash-safe training checkpoints for exact ``--resume``.

A checkpoint is a folder ``checkpoints/step-000123/`` holding the LoRA (shareable safetensors),
the optimizer and LR-scheduler state, the data position and every rank's RNG states. It is written
under a temporary name, fsynced, then renamed, so a crash or a full disk mid-save leaves the
previous checkpoint untouched. Everything is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ChronoEditError

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


@dataclass
class Progress:
    """Where training is: optimizer steps done, epoch, and batches of that epoch already consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"{_PREFIX}{step:06d}"


def staging_dir(output: Path, step: int) -> Path:
    """Where a checkpoint is assembled before the atomic rename."""
    return output / CHECKPOINTS / f".{_PREFIX}{step:06d}.partial"


def latest_checkpoint(output: Path) -> Path | None:
    """Newest complete checkpoint folder under ``output`` (partial ones are ignored)."""
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.name.startswith(_PREFIX) and (p / "progress.json").is_file())
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
    _atomic_torch_save(rng_state(), staging / f"rng-rank{rank}.pt")


def finalize(staging: Path, final: Path, progress: Progress, optimizer_state: dict, scheduler_state: dict, keep: int) -> None:
    """Rank 0: write the shared state, fsync, rename into place, prune old checkpoints."""
    _atomic_torch_save({"optimizer": optimizer_state, "scheduler": scheduler_state}, staging / "optimizer.pt")
    _atomic_write_text(staging / "progress.json", json.dumps(asdict(progress)))
    _fsync_dir(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)
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


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
