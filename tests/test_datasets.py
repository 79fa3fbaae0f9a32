"""[[datasets]]: several CSVs in one run, each dataset's share of an epoch by weight (or repeat), and
prompt dropout by seed."""

from __future__ import annotations

import collections
import csv
import json
from pathlib import Path

import pytest

from chronoedit_lora.cli import main
from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.train.loop.config import load_config
from chronoedit_lora.train.loop.data import TrainingData
from chronoedit_lora.train.loop.trainer import train

from .test_train import make_subset


@pytest.fixture(scope="module")
def csvs(tmp_path_factory) -> tuple[Path, Path]:
    """Four pairs and three other pairs of the example dataset."""
    root = tmp_path_factory.mktemp("mix")
    return make_subset(root / "a", 4), make_subset(root / "b", 3, start=4)


def _config(tmp_path: Path, tables: list[dict], model: Path | None = None, **settings):
    """A training config from TOML: the [[datasets]] tables and top-level settings."""
    lines = [f"{k} = {_toml(v)}" for k, v in {"output": str(tmp_path / "run"), "height": 32, "width": 32,
                                                     **settings}.items()]
    if model is not None:
        lines += [f'model = "{model}"', 'dtype = "float32"', "rank = 8", "alpha = 8", "learning_rate = 5e-3",
                  "gradient_checkpointing = false"]
    for table in tables:
        lines += ["[[datasets]]"] + [f"{k} = {_toml(v)}" for k, v in table.items()]
    path = tmp_path / "train.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path, {})


def _toml(value) -> str:
    return "nan" if value != value else json.dumps(value)  # TOML spells NaN nan


def _epoch_items(data: TrainingData) -> list[str]:
    return [data.dataset.label(i) for batch in data.epoch_batches(0) for i in batch]


# 4 and 3 rows: the shortest epoch holding every row with these shares (0.3 of 14 is 4.2: not exact)
@pytest.mark.parametrize("weights, counts, exact", [((1, 3), (4, 12), True), ((2, 1), (6, 3), True),
                                                    ((0.3, 0.7), (4, 10), False)])
def test_each_dataset_gets_its_weights_share_of_the_epoch(csvs, tmp_path, weights, counts, exact):
    a, b = csvs
    data = TrainingData(_config(tmp_path, [{"csv": str(a), "weight": weights[0]}, {"csv": str(b), "weight": weights[1]}]))
    items = _epoch_items(data)
    per_dataset = collections.Counter(label.split(":")[0] for label in items)
    assert (per_dataset["1"], per_dataset["2"]) == counts
    share = per_dataset["1"] / len(items)
    assert share == weights[0] / sum(weights) if exact else abs(share - weights[0] / sum(weights)) < 1 / len(items)
    # every row of both datasets is in the epoch, each as often as the others of its dataset (+-1)
    for dataset, rows in (("1", 4), ("2", 3)):
        seen = collections.Counter(label for label in items if label.startswith(dataset + ":"))
        assert set(seen) == {f"{dataset}:{r}" for r in range(rows)} and max(seen.values()) - min(seen.values()) <= 1


def test_repeats_and_the_plain_dataset(csvs, tmp_path):
    a, b = csvs
    data = TrainingData(_config(tmp_path, [{"csv": str(a)}, {"csv": str(b), "repeat": 3}]))
    per_dataset = collections.Counter(label.split(":")[0] for label in _epoch_items(data))
    assert (per_dataset["1"], per_dataset["2"]) == (4, 9)
    plain = TrainingData(load_config(None, {"dataset": str(a), "output": str(tmp_path / "p"), "repeat": "2"}))
    assert len(plain.epoch_batches(0)) == 8 and type(plain.dataset).__name__ == "EditPairDataset"


def test_prompt_dropout_drops_the_stated_fraction_by_seed(csvs, tmp_path):
    a, b = csvs
    tables = [{"csv": str(a), "repeat": 5, "prompt_dropout": 0.25}, {"csv": str(b), "repeat": 4}]
    data = TrainingData(_config(tmp_path, tables, seed=1))
    dropped = [i for i in range(len(data.dataset)) if data.dataset[i]["prompt"] == ""]
    assert len(dropped) == 5  # a quarter of dataset 1's 20 items; none of dataset 2's 12
    assert all(data.dataset.label(i).startswith("1:") and data.dataset.label(i).endswith("-") for i in dropped)
    assert all(data.dataset.pair(i).prompt == "" for i in dropped)  # so the cache keeps their empty prompt apart
    again = TrainingData(_config(tmp_path, tables, seed=1))
    assert [i for i in range(len(again.dataset)) if again.dataset.pair(i).prompt == ""] == dropped
    other = TrainingData(_config(tmp_path, tables, seed=2))
    assert [i for i in range(len(other.dataset)) if other.dataset.pair(i).prompt == ""] != dropped


@pytest.mark.parametrize("table, message", [
    ({"weight": -1.0}, "weight must be > 0, got -1.0"),
    ({"weight": float("nan")}, "weight must be a finite number"),
    ({"weigth": 1.0}, "unknown key 'weigth' \\(did you mean 'weight'\\?\\)"),
    ({"csv": "missing.csv"}, "csv missing.csv not found"),
    ({"weight": 1.0, "repeat": 2}, "weight and repeat both set"),
    ({"prompt_dropout": 1.0}, "prompt_dropout = 1 drops every instruction"),
    ({"prompt_dropout": -0.1}, "prompt_dropout must be >= 0"),
    ({"repeat": 0}, "repeat must be >= 1"),
    ({"height": 30, "width": 32}, "height 30 must be a positive multiple of 16"),
])
def test_bad_tables_are_refused_before_loading(csvs, tmp_path, table, message):
    a, b = csvs
    with pytest.raises(ChronoEditError, match=message):
        _config(tmp_path, [{"csv": str(a), **table}, {"csv": str(b)}] if "weight" not in table or "repeat" in table
                else [{"csv": str(a), **table}, {"csv": str(b), "weight": 1.0}])


def test_mixed_weights_and_both_kinds_of_dataset_are_refused(csvs, tmp_path):
    a, b = csvs
    with pytest.raises(ChronoEditError, match="some tables have a weight and some not"):
        _config(tmp_path, [{"csv": str(a), "weight": 1.0}, {"csv": str(b)}])
    with pytest.raises(ChronoEditError, match="both `dataset` and \\[\\[datasets\\]\\] are set"):
        _config(tmp_path, [{"csv": str(a)}], dataset=str(b))


def test_training_on_two_datasets_logs_each_item_and_checks_each(tiny_diffusers, csvs, tmp_path, capsys):
    a, b = csvs
    config = _config(tmp_path, [{"csv": str(a), "weight": 1.0}, {"csv": str(b), "weight": 1.0, "prompt_dropout": 0.5,
                                                                   "height": 48, "width": 48}],
                     model=tiny_diffusers, max_steps=4, save_every=100, cache=True)
    result = train(config)
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "metrics.csv").open()))
    trained = [label for row in rows for label in row["samples"].split()]
    # D:ITEM, "-" where the prompt was dropped (dataset 2 only)
    assert len(trained) == 4 and all(label.split(":")[0] in ("1", "2") for label in trained)
    assert all(label.startswith("2:") for label in trained if label.endswith("-"))
    assert result.steps == 4
    card = (tmp_path / "run" / "README.md").read_text()
    assert "7 before/after pairs from metadata\\.csv, metadata\\.csv" in card  # rows, each once
    assert main(["dataset", "check", str(tmp_path / "train.toml")]) == 0
    out = capsys.readouterr().out
    assert f"{a}:" in out and f"{b}:" in out


def test_the_cache_counts_each_distinct_item_once(tiny_diffusers, csvs, tmp_path, capsys):
    """4 rows repeated 3 times and 3 rows: 7 entries to encode, then 7 to reuse (not 15 items)."""
    a, b = csvs
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
        train(_config(tmp_path / run, [{"csv": str(a), "repeat": 3}, {"csv": str(b)}], model=tiny_diffusers,
                      max_steps=1, save_every=100, cache=True, cache_dir=str(tmp_path / "cache")))
    out = capsys.readouterr().out
    assert out.count(": 7 new, 0 reused") == 1 and out.count(": 0 new, 7 reused") == 1, out


@pytest.mark.slow
def test_a_resume_on_another_process_count_trains_each_item_as_planned(tiny_diffusers, csvs, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    a, b = csvs
    tables = [{"csv": str(a), "weight": 1.0, "prompt_dropout": 0.25}, {"csv": str(b), "weight": 1.0}]
    config = _config(tmp_path, tables, model=tiny_diffusers, save_every=2, check_sync_every=1)
    planned = sorted(_epoch_items(TrainingData(config)))  # 8 items: 4 of each dataset, 2 prompts of dataset 1 dropped
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(root / "configs/accelerate/cpu_2proc.yaml"), str(root / "scripts/train.py")]
    first = subprocess.run(launch + ["--config", str(tmp_path / "train.toml"), "--max_steps", "2"],
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([sys.executable, "-m", "chronoedit_lora.cli", "train", "--config", str(tmp_path / "train.toml"),
                             "--resume"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing a 2-process run on 1" in second.stdout
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "metrics.csv").open()))
    assert [len(row["samples"].split()) for row in rows] == [2, 2, 1, 1, 1, 1]
    assert sorted(label for row in rows for label in row["samples"].split()) == planned
    assert sum(label.endswith("-") for label in planned) == 1  # round(0.25 * 4)
