"""What is evaluated: the base model (no LoRA), then a run folder's step LoRAs and final LoRA, or
a list of LoRA files, each with a label and its training step (if known)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ChronoEditError
from ..models.loading import read_header
from ..train.state.checkpoint import CHECKPOINTS
from ..train.state.lora_export import FINAL_NAME
from ..train.state.run_folder import SETTINGS

BASE = "base"
FINAL = "final"
STEP_FILE = re.compile(r"^lora-step(\d+)\.safetensors$")


def step_label(step: int) -> str:
    """A step LoRA's label in ``eval/metrics.csv`` (``step-000010``)."""
    return f"step-{step:06d}"


@dataclass(frozen=True)
class Checkpoint:
    """A label (``base``, ``step-000010``, ``final`` or a file's stem), the LoRA file (None for the
    base) and the training step it was saved at (None for the base and files without one)."""

    label: str
    path: Path | None
    step: int | None


def _saved_step(path: Path) -> int | None:
    """The ``step`` the kit's trainer wrote into the file's header, if any."""
    try:
        _, metadata = read_header(path)
    except Exception as exc:  # noqa: BLE001 - a damaged header raises many types
        raise ChronoEditError(f"LoRA {path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]}).") from None
    step = metadata.get("step", "")
    return int(step) if step.isdigit() else None


def run_checkpoints(run: Path) -> list[Checkpoint]:
    """A run folder's ``lora-stepNNNNNN.safetensors`` by step, then ``lora.safetensors`` as ``final``
    (a step file saved at the final LoRA's step holds the same weights and is left out)."""
    if not run.is_dir():
        raise ChronoEditError(f"--run {run}: not a folder.")
    steps = sorted((int(m.group(1)), p) for p in run.iterdir() if (m := STEP_FILE.match(p.name)))
    final = run / FINAL_NAME
    final_step = _saved_step(final) if final.is_file() else None
    found = [Checkpoint(step_label(step), path, step) for step, path in steps if step != final_step]
    if final.is_file():
        found.append(Checkpoint(FINAL, final, final_step))
    if not found and any((run / CHECKPOINTS).glob(f"*/{SETTINGS}")):
        raise ChronoEditError(
            f"--run {run} is a full fine-tune: eval compares LoRAs on one base. Turn a checkpoint into one, then "
            f"evaluate it: chronoedit-lora lora extract RUN.safetensors --base MODEL --tuned {run} --rank 64, then "
            "chronoedit-lora eval --model MODEL --lora RUN.safetensors (--tuned takes a checkpoint folder too).")
    if not found:
        raise ChronoEditError(f"--run {run}: no lora-stepNNNNNN.safetensors or {FINAL_NAME} in it; "
                              "is it a training run's --output folder?")
    return found


def training_csv(checkpoints: list[Checkpoint]) -> Path | None:
    """The dataset CSV a run's LoRAs were trained on (from the newest one's header), if it says."""
    newest = next((c.path for c in reversed(checkpoints) if c.path is not None), None)
    if newest is None:
        return None
    try:
        dataset = json.loads(read_header(newest)[1].get("config", "{}")).get("dataset")
    except (json.JSONDecodeError, AttributeError):
        return None
    return Path(dataset) if isinstance(dataset, str) and dataset else None


def file_checkpoints(files: list[str]) -> list[Checkpoint]:
    """LoRA files labelled by their stem, in the order given; the step from the header, else from a
    ``lora-stepNNNNNN`` name."""
    found, labels = [], {BASE: "the base model"}
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise ChronoEditError(f"--lora {path}: file not found.")
        if path.stem in labels:
            raise ChronoEditError(f"--lora {path}: its label {path.stem!r} is also {labels[path.stem]}; "
                                  "rename one of the files.")
        labels[path.stem] = str(path)
        step = _saved_step(path)
        if step is None and (match := STEP_FILE.match(path.name)):
            step = int(match.group(1))
        found.append(Checkpoint(path.stem, path, step))
    return found


def find_checkpoints(run: Path | None, files: list[str]) -> list[Checkpoint]:
    """The base, then the run's LoRAs or the files (one of the two must be given)."""
    if (run is None) == (not files):
        raise ChronoEditError("give a run folder (--run) or LoRA files (--lora FILE, repeatable), not both.")
    return [Checkpoint(BASE, None, None)] + (run_checkpoints(run) if run is not None else file_checkpoints(files))
