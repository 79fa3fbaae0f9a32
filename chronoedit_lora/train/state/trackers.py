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

import configparser
import importlib.util
import json
import netrc
import os
import threading
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from accelerate import Accelerator
from PIL import Image

from ...errors import ChronoEditError
from ...files import writing
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
    check_tracker_setup(names)


def check_tracker_setup(names: list[str]) -> None:
    """What would stop a tracker when it starts, checked before any model loads, without network: W&B
    needs a login unless offline or disabled; MLflow a tracking URI whose local store can be written."""
    if "wandb" in names:
        _check_wandb()
    if "mlflow" in names:
        _check_mlflow()


def _check_wandb() -> None:
    """W&B's mode (WANDB_MODE, or ``wandb offline``'s settings file) and its key (WANDB_API_KEY or
    ``wandb login``'s netrc entry for its host)."""
    settings = configparser.ConfigParser()
    settings.read(Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb")) / "settings")
    mode = os.environ.get("WANDB_MODE") or settings.get("default", "mode", fallback="online")
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL") or settings.get("default", "base_url", fallback="")
                    or "https://api.wandb.ai").hostname
    try:
        logged_in = netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    if not logged_in:
        raise ChronoEditError(f"log_with wandb: not logged in to {host}; run `wandb login` (or set WANDB_API_KEY), "
                              "or log offline with WANDB_MODE=offline (then `wandb sync` the run's logs/wandb).")


def mlflow_store() -> Path | None:
    """The local folder MLflow writes to (a file store, or an SQLite database's folder), from
    MLFLOW_TRACKING_URI; None for a server or when unset."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") and uri:
        return Path(url2pathname(parsed.path) if parsed.scheme else uri)
    if parsed.scheme == "sqlite" and parsed.path not in ("", "/", "/:memory:"):
        return Path(url2pathname(parsed.path[1:] if parsed.path.startswith("//") else parsed.path)).parent
    return None


def _check_mlflow() -> None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ChronoEditError("log_with mlflow: set MLFLOW_TRACKING_URI to your MLflow server (http://HOST:5000), a "
                              "database (sqlite:///PATH/mlflow.db) or a folder (file:///PATH/mlruns, with "
                              "MLFLOW_ALLOW_FILE_STORE=true); MLflow's default store does not work here.")
    if urlparse(uri).scheme == "sqlite" and importlib.util.find_spec("sqlalchemy") is None:
        raise ChronoEditError(f"log_with mlflow: MLFLOW_TRACKING_URI {uri} is a database, and this MLflow "
                              "(mlflow-skinny) has no database support: pip install mlflow, or use a folder or a server.")
    store = mlflow_store()
    if store is not None:
        existing = next(p for p in (store, *store.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ChronoEditError(f"log_with mlflow: the MLflow store {store} (MLFLOW_TRACKING_URI) cannot be written "
                                  f"({existing} is {'not a folder' if not existing.is_dir() else 'read-only'}); "
                                  "point MLFLOW_TRACKING_URI at a folder you can write.")


def tracker_folder(name: str, output: Path) -> Path:
    """Where a tracker writes, for the message if a write fails."""
    if name == "tensorboard":
        return output / "logs" / "tensorboard"
    return (mlflow_store() if name == "mlflow" else None) or output / "logs"


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


def log_scalars(accelerator: Accelerator, output: Path, scalars: dict[str, float], step: int) -> None:
    """``scalars`` at ``step`` in every tracker (accelerate's ``log``, each write naming the tracker's folder)."""
    for tracker in accelerator.trackers:
        with writing(tracker_folder(tracker.name, output)):
            tracker.log(scalars, step=step)


def quiet_writer_threads() -> None:
    """Leave a failed write on TensorBoard's writer thread to the main thread: the thread re-raises it,
    which Python prints as a traceback, and TensorBoard raises it again at the next write or flush,
    where :func:`log_scalars` and :func:`end_trackers` name the folder in one line."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "quiet_writer_threads", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and issubclass(args.exc_type, OSError)):
            previous(args)
    hook.quiet_writer_threads = True
    threading.excepthook = hook


def end_trackers(accelerator: Accelerator, output: Path) -> None:
    """Flush and close every tracker (a TensorBoard write that failed on its writer thread is raised
    by the flush, here, naming its folder), then end the run (accelerate's ``end_training``)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            with writing(tracker_folder(tracker.name, output)):
                tracker.writer.flush()
    with writing(output / "logs"):
        accelerator.end_training()


def log_image(accelerator: Accelerator, output: Path, name: str, image: Image.Image, step: int) -> None:
    """``image`` under ``name`` at ``step`` in every tracker that takes images."""
    pixels = np.asarray(image.convert("RGB"))[None]  # one image, NHWC
    for tracker in accelerator.trackers:
        with writing(tracker_folder(tracker.name, output)):
            if tracker.name == "mlflow":
                import mlflow

                mlflow.log_image(pixels[0], key=name, step=step)
            elif tracker.name == "tensorboard":
                tracker.log_images({name: pixels}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({name: pixels}, step=step)


def log_table(accelerator: Accelerator, output: Path, name: str, columns: list[str], rows: list[list], step: int) -> None:
    """A table under ``name`` at ``step`` in every tracker that takes tables."""
    for tracker in accelerator.trackers:
        with writing(tracker_folder(tracker.name, output)):
            if tracker.name == "mlflow":
                import mlflow

                mlflow.log_table({c: [row[i] for row in rows] for i, c in enumerate(columns)},
                                 artifact_file=f"tables/{name}-step{step:06d}.json")
            elif hasattr(tracker, "log_table"):
                tracker.log_table(name, columns=columns, data=rows, step=step)
