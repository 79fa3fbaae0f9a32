"""Experiment trackers through accelerate's tracker API (TensorBoard, Weights & Biases, MLflow, Aim, …).

The names are accelerate's (``log_with``); each tracker's package is imported by accelerate only
when asked for. Scalars go through ``accelerator.log``; images and tables go to the trackers that
take them: TensorBoard, W&B, Aim and ClearML through their ``log_images``, W&B and ClearML through
``log_table``, MLflow as run artifacts (``mlflow.log_image`` with a step, ``mlflow.log_table``).
Where files land: TensorBoard under ``<output>/logs/tensorboard/<project>``, W&B's local files
under ``<output>/logs/wandb`` (``WANDB_MODE=offline`` keeps them there), MLflow wherever
``MLFLOW_TRACKING_URI`` points.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from PIL import Image

from ...errors import ChronoEditError
from ...settings import did_you_mean

# pip name of each tracker's package, where it differs from accelerate's tracker name
_PACKAGES = {"comet_ml": "comet-ml"}


def tracker_names() -> list[str]:
    """Every tracker name accelerate knows (built in or registered)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def check_trackers(names: list[str]) -> None:
    """An unknown tracker, or one whose package is not installed, is a one-line error (before any
    model loads; accelerate itself would skip a missing one silently)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = tracker_names()
    for name in names:
        if name not in known:
            raise ChronoEditError(f"log_with: unknown tracker {name!r}{did_you_mean(name, known)}; "
                                  f"accelerate knows {', '.join(known)}.")
        # accelerate's own trackers need their package; a registered one brings its own
        if name in LoggerType.list() and name not in {str(t) for t in get_available_trackers()}:
            raise ChronoEditError(f"log_with: the {name} tracker needs its package: pip install "
                                  f"{_PACKAGES.get(name, name)} (or leave {name} out of log_with).")


def tracker_kwargs(output: Path, start_step: int) -> dict[str, dict]:
    """Per-tracker ``init_kwargs``: the run named after its folder; a resumed run's TensorBoard
    events after its checkpoint are dropped, as metrics.csv's rows are."""
    return {"tensorboard": {"purge_step": start_step + 1},
            "wandb": {"name": output.name, "dir": str(output / "logs")},
            "mlflow": {"run_name": output.name}}


def hyperparameters(config_json: str) -> dict[str, str | int | float | bool]:
    """The training settings as flat scalars (lists joined, None as ""), which every tracker stores."""
    flat = {}
    for key, value in json.loads(config_json).items():
        flat[key] = ",".join(map(str, value)) if isinstance(value, list) else "" if value is None else value
    return flat


def log_image(accelerator: Accelerator, name: str, image: Image.Image, step: int) -> None:
    """``image`` under ``name`` at ``step`` in every tracker that takes images."""
    pixels = np.asarray(image.convert("RGB"))[None]  # one image, NHWC
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            import mlflow

            mlflow.log_image(pixels[0], key=name, step=step)
        elif tracker.name == "tensorboard":
            tracker.log_images({name: pixels}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: pixels}, step=step)


def log_table(accelerator: Accelerator, name: str, columns: list[str], rows: list[list], step: int) -> None:
    """A table under ``name`` at ``step`` in every tracker that takes tables."""
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            import mlflow

            mlflow.log_table({c: [row[i] for row in rows] for i, c in enumerate(columns)},
                             artifact_file=f"tables/{name}-step{step:06d}.json")
        elif hasattr(tracker, "log_table"):
            tracker.log_table(name, columns=columns, data=rows, step=step)
