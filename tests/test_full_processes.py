"""Full fine-tuning as separate processes (tiny model, gloo): two FSDP processes equal one process
accumulating the same two batches per step, --resume is exact (2 FSDP processes; 1 process after a SIGKILL), and a checkpoint continues on
another process count (2 -> 1 and 1 -> 2) with every pair trained once per epoch (read from
metrics.csv)."""

from __future__ import annotations

import csv
import signal
import subprocess
from pathlib import Path

import pytest

from chronoedit_lora.train.state import dcp
from chronoedit_lora.train.state.checkpoint import checkpoint_dir

from .test_fsdp import ACCUMULATION_ATOL, _launch
from .test_train import RESUME_ATOL, make_subset
from .test_train_processes import _train_cmd, _wait_for

pytestmark = pytest.mark.slow

PAIRS = 8  # 4 optimizer steps per epoch on 2 processes, 8 on 1
FULL = ["--finetune", "full", "--trainable", "blocks.*", "--learning_rate", "1e-3", "--ema_decay", "0.9", "--seed", "3",
        "--save_every", "2"]


def _run(model: Path, dataset: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_train_cmd(model, dataset, output, *FULL, *extra), capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _trained(run: Path, step: int, ema: bool = False) -> dict:
    folder = checkpoint_dir(run, step)
    return dcp.read_weights(folder, dcp.trained_names(folder), ema)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _pairs_by_step(*runs: Path) -> dict[int, list[int]]:
    """Each logged step's pairs, from the runs' metrics.csv (a later run's rows win)."""
    rows = {}
    for run in runs:
        rows.update({int(r["step"]): sorted(map(int, r["samples"].split())) for r in csv.DictReader((run / "logs" / "metrics.csv").open())})
    return rows


@pytest.fixture(scope="module")
def runs(tiny_diffusers, tmp_path_factory):
    """Four steps (one epoch): on two FSDP processes, and on one process accumulating two batches per
    step (the same pairs in each step; each batch's noise is drawn from its pairs, not its process)."""
    folder = tmp_path_factory.mktemp("full-processes")
    dataset = make_subset(folder / "data", PAIRS)
    _launch("cpu_2proc_fsdp.yaml", tiny_diffusers, dataset, folder / "fsdp", *FULL, "--max_steps", "4")
    _run(tiny_diffusers, dataset, folder / "one", "--max_steps", "4", "--gradient_accumulation", "2")
    return dataset, folder


def test_two_fsdp_processes_equal_one_process(runs):
    _, folder = runs
    state = checkpoint_dir(folder / "fsdp", 4) / dcp.STATE
    assert len(list(state.glob("shard-*.safetensors"))) == 2  # each rank wrote its own shards
    for ema in (False, True):
        diff = _max_diff(_trained(folder / "fsdp", 4, ema), _trained(folder / "one", 4, ema))
        print(f"full fine-tune, 2 FSDP processes vs 1 process ({'EMA' if ema else 'weights'}) max |diff|: {diff:.3g}")
        assert diff <= ACCUMULATION_ATOL
    assert _max_diff(_trained(folder / "fsdp", 4), _trained(folder / "fsdp", 2)) > 1e-4  # they trained in between
    epoch = _pairs_by_step(folder / "fsdp")
    assert sorted(i for pairs in epoch.values() for i in pairs) == list(range(PAIRS))


def test_fsdp_resume_on_two_processes_is_exact(tiny_diffusers, runs):
    dataset, folder = runs
    resumed = folder / "fsdp-resumed"
    _launch("cpu_2proc_fsdp.yaml", tiny_diffusers, dataset, resumed, *FULL, "--resume",
            str(checkpoint_dir(folder / "fsdp", 2)), "--max_steps", "4")
    for ema in (False, True):
        assert _max_diff(_trained(folder / "fsdp", 4, ema), _trained(resumed, 4, ema)) <= RESUME_ATOL


def test_a_two_process_checkpoint_continues_on_one_training_every_pair_once(tiny_diffusers, runs):
    dataset, folder = runs
    one = folder / "two-then-one"
    result = _run(tiny_diffusers, dataset, one, "--resume", str(checkpoint_dir(folder / "fsdp", 2)), "--max_steps", "6")
    assert "continuing a 2-process run on 1" in result.stdout
    steps = _pairs_by_step(folder / "fsdp", one)
    assert [len(steps[s]) for s in range(1, 7)] == [2, 2, 1, 1, 1, 1]
    assert sorted(i for s in range(1, 7) for i in steps[s]) == list(range(PAIRS))  # the epoch: each pair once


def test_sigkill_then_resume_is_exact_and_the_checkpoint_continues_on_two(tiny_diffusers, runs):
    dataset, folder = runs
    steps = ["--max_steps", "4"]
    straight = folder / "straight"
    _run(tiny_diffusers, dataset, straight, *steps)
    killed = folder / "killed"
    process = subprocess.Popen(_train_cmd(tiny_diffusers, dataset, killed, *FULL, *steps), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    _wait_for(checkpoint_dir(killed, 2) / "progress.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not checkpoint_dir(killed, 4).exists()  # it died before the end
    two = folder / "one-then-two"  # the 1-process checkpoint, continued on 2 (before the resume prunes it)
    _launch("cpu_2proc_fsdp.yaml", tiny_diffusers, dataset, two, *FULL, "--resume", str(checkpoint_dir(killed, 2)),
            "--max_steps", "5")
    resumed = _run(tiny_diffusers, dataset, killed, *steps, "--resume")
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    for ema in (False, True):
        assert _max_diff(_trained(straight, 4, ema), _trained(killed, 4, ema)) <= RESUME_ATOL

    pairs = _pairs_by_step(killed, two)
    assert [len(pairs[s]) for s in range(1, 6)] == [1, 1, 2, 2, 2]
    assert sorted(i for s in range(1, 6) for i in pairs[s]) == list(range(PAIRS))
    assert _max_diff(_trained(two, 5), _trained(killed, 2)) > 1e-4  # the two processes trained on from it
