"""Experiment trackers through accelerate: one tiny run logs to TensorBoard, Weights & Biases (offline)
and MLflow (a local file store) at once, and each gives back the losses metrics.csv holds, the
sample grid as an image and its rows as a table where it takes them."""

from __future__ import annotations

import csv
import json
import re
import struct
from pathlib import Path

import pytest

from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.train.loop.config import load_config
from chronoedit_lora.train.loop.trainer import train

from .test_train import make_subset, tiny_config

LOSS_RTOL = 1e-5  # metrics.csv keeps 6 significant digits; the trackers keep float32/float64


@pytest.fixture(scope="module")
def run(tiny_diffusers, tmp_path_factory):
    """2 steps, a sample grid at step 2, logged to all three trackers."""
    folder = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("MLFLOW_TRACKING_URI", (folder / "mlruns").as_uri())
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database unless told
        train(tiny_config(tiny_diffusers, make_subset(folder / "data", 2), folder / "run", max_steps=2,
                          sample_every=2, sample_steps=1, sample_count=1, log_with="tensorboard,wandb,mlflow",
                          tracker_project="trackers-test"))
    rows = list(csv.DictReader((folder / "run" / "logs" / "metrics.csv").open()))
    losses = {int(r["step"]): float(r["loss"]) for r in rows}
    assert sorted(losses) == [1, 2] and rows[1]["val_loss"]
    return folder, losses, float(rows[1]["val_loss"])


def test_tensorboard_holds_the_scalars_and_the_grid(run):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    folder, losses, val_loss = run
    events = EventAccumulator(str(folder / "run" / "logs" / "tensorboard" / "trackers-test"),
                              size_guidance={SCALARS: 0, IMAGES: 0}).Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx(losses, rel=LOSS_RTOL)
    assert [e.value for e in events.Scalars("validation/loss")] == pytest.approx([val_loss], rel=LOSS_RTOL)
    assert {"train/lr", "train/grad_norm", "train/seconds_per_step"} <= set(events.Tags()["scalars"])
    grid = events.Images("sample_grid")
    assert [e.step for e in grid] == [2] and grid[0].width > grid[0].height > 0  # one row: input | edit | target


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (LevelDB log format: 32 KiB blocks of
    checksum, length, type-tagged chunks after a 7-byte ``:W&B`` header); wandb 0.31 has no reader."""
    from wandb.proto import wandb_internal_pb2

    data, block, position = path.read_bytes(), 32768, 7
    assert data.startswith(b":W&B")
    records, chunk = [], b""
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer or padding
            position += left
            continue
        chunk += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_wandb_offline_run_holds_the_scalars_grid_and_table(run):
    folder, losses, val_loss = run
    (offline,) = (folder / "run" / "logs" / "wandb").glob("offline-run-*")
    records = wandb_records(next(offline.glob("run-*.wandb")))
    history = []  # one dict per step; nested values (an image, a table) as dicts
    for record in (r for r in records if r.WhichOneof("record_type") == "history"):
        step: dict = {}
        for item in record.history.item:
            *outer, last = list(item.nested_key) or [item.key]
            nested = step
            for key in outer:
                nested = nested.setdefault(key, {})
            nested[last] = json.loads(item.value_json)
        history.append(step)
    assert [h["_step"] for h in history] == [1, 2]
    assert [h["train/loss"] for h in history] == pytest.approx([losses[1], losses[2]], rel=LOSS_RTOL)
    assert history[1]["validation/loss"] == pytest.approx(val_loss, rel=LOSS_RTOL)
    grid, rows = history[1]["sample_grid"], history[1]["sample_rows"]
    assert grid["_type"] == "images/separated" and grid["count"] == 1
    assert all((offline / "files" / name).is_file() for name in grid["filenames"])
    table = json.loads((offline / "files" / rows["path"]).read_text())
    assert table["columns"] == ["row", "kind", "prompt"] and len(table["data"]) == 1
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert config["adapter"] == "lora" and config["targets"] == "q,k,v,o,ffn.0,ffn.2"


def test_mlflow_file_store_holds_the_scalars_grid_and_table(run):
    from mlflow.tracking import MlflowClient

    folder, losses, val_loss = run
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient((folder / "mlruns").as_uri())
        experiment = client.get_experiment_by_name("trackers-test")
        (logged_run,) = client.search_runs([experiment.experiment_id])
        history = {m.step: m.value for m in client.get_metric_history(logged_run.info.run_id, "train/loss")}
        validation = [m.value for m in client.get_metric_history(logged_run.info.run_id, "validation/loss")]
        tables = [a.path for a in client.list_artifacts(logged_run.info.run_id, "tables")]
        images = [a.path for a in client.list_artifacts(logged_run.info.run_id, "images")]
    assert history == pytest.approx(losses, rel=LOSS_RTOL) and validation == pytest.approx([val_loss], rel=LOSS_RTOL)
    assert logged_run.data.params["adapter"] == "lora" and logged_run.info.run_name == "run"
    assert tables == ["tables/sample_rows-step000002.json"]
    assert any(path.startswith("images/sample_grid") for path in images)


@pytest.mark.parametrize("trackers, message", [
    ("tensorbord", "unknown tracker 'tensorbord' (did you mean 'tensorboard'?)"),
    ("comet_ml", "the comet_ml tracker needs its package: pip install comet-ml"),
])
def test_unknown_or_missing_tracker_is_one_line_before_any_model_loads(tmp_path, trackers, message):
    from accelerate.utils import is_comet_ml_available

    if trackers == "comet_ml" and is_comet_ml_available():
        pytest.skip("comet_ml is installed here")
    with pytest.raises(ChronoEditError, match=re.escape(message)):
        load_config(None, {"model": str(tmp_path / "no-model"), "dataset": "x.csv", "log_with": trackers})
