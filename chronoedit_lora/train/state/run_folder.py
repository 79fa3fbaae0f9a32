"""The run folder (``--output``): one run at a time, never replaced by accident, resumed only as it was.

* A lock (``flock`` on ``output/.lock``, released by the OS when the process dies) is held by the
  main process for the whole run; a second ``train`` into the same folder refuses at once, naming
  the holder (host, pid, start time).
* A folder that holds another run (checkpoints, LoRAs, logs) is refused unless ``resume`` continues
  it or ``overwrite`` removes its files first (the conditioning cache is kept: it is keyed by its
  inputs, so it stays valid).
* ``resume`` compares the checkpoint's saved settings with the new ones: settings that only affect
  the future may change (they are listed); any other change is refused unless ``allow_changes``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import CheckpointError, ChronoEditError
from ...models.loading import read_header
from . import checkpoint as ckpt
from ..loop.config import TrainConfig, changed_settings
from .model_card import CARD_MARK, CARD_NAME

LOCK_NAME = ".lock"
# What a run writes, relative to its folder (the cache is not the run's: it is shared and keyed).
RUN_FILES = ("checkpoints", "logs", "samples", "eval", "lora.safetensors", "lora-ema.safetensors",
             "lora-best.safetensors", "loss.png")
RUN_GLOBS = ("lora-step*.safetensors",)


class RunLock:
    """An exclusive, non-blocking lock on a run folder, holding who took it."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise ChronoEditError(f"{self.path.parent} is in use by another training run ({holder}); wait for it to "
                                  "finish, or choose another --output.") from None
        file.seek(0)
        file.truncate()
        file.write(f"host {socket.gethostname()}, pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


def previous_run_files(folder: Path) -> list[Path]:
    """The files of an earlier run in ``folder``."""
    found = [folder / name for name in RUN_FILES if (folder / name).exists()]
    found += [p for pattern in RUN_GLOBS for p in sorted(folder.glob(pattern))]
    card = folder / CARD_NAME
    if card.is_file():
        with card.open(errors="replace") as f:
            if CARD_MARK in f.read(4096):  # the mark is in its YAML header
                found.append(card)
    return found


def remove_run(files: list[Path]) -> None:
    for path in files:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def remove_debris(folder: Path) -> None:
    """What a killed run leaves: half-written checkpoint folders and temporary files of atomic writes."""
    for partial in (folder / ckpt.CHECKPOINTS).glob(".*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    for tmp in folder.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


SETTINGS = "settings.json"  # a full fine-tune's settings (a LoRA run's are in its LoRA's header)
EMA_NAME = "lora-ema.safetensors"  # a LoRA run's EMA in its checkpoints


def saved_settings(checkpoint: Path) -> dict:
    """The settings a checkpoint was trained with (from ``settings.json`` or its LoRA's header)."""
    if (checkpoint / SETTINGS).is_file():
        return json.loads((checkpoint / SETTINGS).read_text())
    _, metadata = read_header(checkpoint / "lora.safetensors")
    try:
        return json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{checkpoint / 'lora.safetensors'}: no training settings in its header; "
                              "it was not written by this kit's trainer.") from None


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from, and its optimizer state (read once, when it was checked)."""

    folder: Path
    optimizer_state: dict


def check_checkpoint(folder: Path) -> dict:
    """Read everything ``--resume`` and ``export`` will need, so a damaged file is named before any
    model loads (a full fine-tune's shards: complete, and written by the processes progress.json
    records); returns the optimizer and LR-scheduler state (``optimizer`` None for a full fine-tune, whose
    moments are sharded in ``state/``)."""
    state = {}
    full = (folder / SETTINGS).is_file()
    try:
        ranks = ckpt.load_progress(folder).processes if (folder / "progress.json").is_file() else 0
    except Exception as exc:  # noqa: BLE001 - damaged JSON or fields
        raise CheckpointError(f"{folder / 'progress.json'} is damaged ({type(exc).__name__}).") from None
    names = ["progress.json", "optimizer.pt", SETTINGS if full else "lora.safetensors"]
    names += [name for name in (EMA_NAME,) if not full and (folder / name).exists()]
    for name in names + [f"rng-rank{r}.pt" for r in range(ranks)]:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing.")
        try:
            if name.endswith(".safetensors"):
                read_header(path)
            elif name == SETTINGS:
                json.loads(path.read_text())
            elif name == "optimizer.pt":
                state = ckpt.load_optimizer_state(folder)
            elif name != "progress.json":
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged pickle or JSON raises many types
            raise CheckpointError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).") from None
    if full:
        from .dcp import check_state

        check_state(folder, ranks)
    return state


def choose_checkpoint(config: TrainConfig, output: Path, report: bool = True) -> ResumePoint | None:
    """The checkpoint to resume from (None: a fresh run), checked, with its settings compared."""
    if not (config.resume or config.resume_from):
        return None
    if config.resume_from:
        chosen = Path(config.resume_from)
        if not (chosen / "progress.json").is_file():
            raise ChronoEditError(f"--resume {chosen}: not a checkpoint folder (no progress.json); "
                                  f"checkpoints are under {output / ckpt.CHECKPOINTS}.")
    else:
        chosen = ckpt.latest_checkpoint(output)
        if chosen is None:
            raise ChronoEditError(f"--resume: no checkpoint under {output / ckpt.CHECKPOINTS}.")
    try:
        optimizer_state = check_checkpoint(chosen)
    except CheckpointError as exc:
        earlier = [c for c in ckpt.complete_checkpoints(chosen.parent) if c.name < chosen.name]
        hint = (f" Resume from the previous one with --resume {earlier[-1]}." if earlier
                else " There is no earlier checkpoint; start over with --overwrite.")
        raise ChronoEditError(f"cannot resume from {chosen}: {exc}{hint}") from None
    saved = saved_settings(chosen)
    if saved.get("finetune", "lora") != config.finetune:
        raise ChronoEditError(f"--resume: {chosen} is a finetune = {saved.get('finetune', 'lora')!r} run; this one is "
                              f"{config.finetune!r}. Resume it with its own mode, or start over with --overwrite.")
    if saved.get("base_loras", []) != config.base_loras:
        raise ChronoEditError(f"--resume: {chosen} was trained on the base with base_loras = {saved.get('base_loras', [])!r}; "
                              f"this run has {config.base_loras!r}. The trained weights only fit the base they were "
                              "trained on (even with --allow_changes): resume with the same base_loras, or start "
                              "over with --overwrite.")
    allowed, refused = changed_settings(saved, config)
    if refused and not config.allow_changes:
        raise ChronoEditError(f"--resume: these settings differ from the run being resumed ({chosen}):\n  "
                              + "\n  ".join(refused) + "\nResume with the saved settings, or pass --allow_changes true "
                              "to continue with the new ones anyway.")
    if report and (allowed or refused):
        print("resuming with changed settings:\n  " + "\n  ".join(allowed + refused))
    return ResumePoint(chosen, optimizer_state)


class RunFolder:
    """Claims ``output`` for one run on the main process, and lets it go."""

    def __init__(self, output: Path):
        self.output = output
        self.lock = RunLock(output)
        self.created = not output.exists()  # before the preflight makes it
        self.owns_run_files = False  # True once the folder holds no other run's files (a fresh start)

    def claim(self, config: TrainConfig) -> None:
        """Lock the folder and refuse (or clear, with ``overwrite``) another run's files."""
        self.output.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        remove_debris(self.output)
        resuming = config.resume or config.resume_from
        previous = previous_run_files(self.output)
        if previous and not resuming:
            if not config.overwrite:
                step = ckpt.latest_checkpoint(self.output)
                where = f" (newest checkpoint: {step.name})" if step else ""
                raise ChronoEditError(
                    f"{self.output} holds another training run{where}. Pass --resume to continue it, --overwrite "
                    "to start over (its checkpoints, LoRAs, logs and samples are removed), or choose another --output.")
            remove_run(previous)
            print(f"--overwrite: removed the previous run's files from {self.output}")
        self.owns_run_files = not resuming

    def release(self, failed: bool) -> None:
        """Unlock. After a failure that left no checkpoint, nothing of the run can be resumed: its
        files are removed (the folder too, if this run created it), so the same command can simply
        be run again."""
        self.lock.release()
        if not failed:
            return
        if self.owns_run_files and not ckpt.latest_checkpoint(self.output):
            remove_run(previous_run_files(self.output))
        if self.created and self.output.is_dir():
            leftovers = [p for p in self.output.iterdir() if p.name != LOCK_NAME]
            if not leftovers:
                shutil.rmtree(self.output, ignore_errors=True)
