"""FSDP on CPU, two processes over gloo (configs/accelerate/cpu_2proc_fsdp.yaml): each rank holds half
of the frozen DiT, the LoRA (and a LoKr) equals the DDP run's, --resume continues exactly, and
base_loras train on the base they name."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .test_base_loras import BASE_ATOL
from .test_train import RESUME_ATOL, make_subset
from .test_train_processes import ROOT, _max_diff, _train_cmd

pytestmark = pytest.mark.slow

SAME_AS_DDP_ATOL = 1e-5
# One process sums two half-weighted batch gradients where DDP all-reduces and averages two: another
# float32 order, which Adam's first steps (second moments near 0) magnify. Measured 1.1e-5 on LoRA
# weights up to 0.03 and 2.0e-5 on a full fine-tune; 0.054 (LoRA) when each process drew its noise
# from its own random state.
ACCUMULATION_ATOL = 5e-5
HALF_RTOL = 0.02  # the root's small parameters are split unevenly (FSDP2 pads dim 0 to a multiple of 2)
STEPS = ["--max_steps", "6", "--save_every", "3", "--seed", "3"]
# the kit's gradient checkpointing with activation offload, so both are exercised under FSDP
CHECKPOINTING = ["--gradient_checkpointing", "true", "--activation_offload", "true"]


def _launch(config: str, model: Path, dataset: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate" / config),
           str(ROOT / "scripts/train.py"), *_train_cmd(model, dataset, output, *extra)[4:]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tiny_diffusers, tmp_path_factory):
    """The same 6 steps under FSDP and under DDP (2 processes each)."""
    folder = tmp_path_factory.mktemp("fsdp")
    dataset = make_subset(folder / "data", 8)
    fsdp = _launch("cpu_2proc_fsdp.yaml", tiny_diffusers, dataset, folder / "fsdp", *STEPS, *CHECKPOINTING)
    _launch("cpu_2proc.yaml", tiny_diffusers, dataset, folder / "ddp", *STEPS, *CHECKPOINTING)
    return dataset, folder, fsdp.stdout


def test_each_rank_holds_half_of_the_base(runs):
    _, _, stdout = runs
    held = {int(rank): (int(mine), int(whole)) for rank, mine, whole in
            re.findall(r"FSDP rank (\d): holds (\d+) of the base's (\d+) parameter bytes", stdout)}
    assert sorted(held) == [0, 1]
    whole = held[0][1]
    assert held[1][1] == whole and held[0][0] + held[1][0] >= whole  # together all of it (plus padding)
    for rank, (mine, _) in held.items():
        print(f"rank {rank}: {mine} of {whole} base bytes ({mine / whole:.4f})")
        assert abs(mine / whole - 0.5) < HALF_RTOL


def test_fsdp_lora_equals_ddp_lora(runs):
    _, folder, _ = runs
    diff = _max_diff(folder / "fsdp" / "lora.safetensors", folder / "ddp" / "lora.safetensors")
    print(f"FSDP vs DDP max |diff| after 6 steps: {diff:.3g}")
    assert diff <= SAME_AS_DDP_ATOL
    moved = _max_diff(folder / "fsdp" / "lora.safetensors", folder / "fsdp" / "lora-step000003.safetensors")
    assert moved > 1e-4  # the LoRA did train in between
    # the checkpoint holds the full LoRA and a gathered optimizer state: the same files as under DDP
    names = {p.name for p in (folder / "fsdp" / "checkpoints" / "step-000006").iterdir()}
    assert names == {p.name for p in (folder / "ddp" / "checkpoints" / "step-000006").iterdir()}


def test_one_process_accumulating_two_batches_equals_two_processes(tiny_diffusers, runs):
    """Each batch's noise comes from its pairs, not its process: one process stepping on the same two
    batches per step (gradient accumulation 2) trains the LoRA the two processes did."""
    dataset, folder, _ = runs
    one = subprocess.run(_train_cmd(tiny_diffusers, dataset, folder / "one", *STEPS, *CHECKPOINTING,
                                    "--gradient_accumulation", "2"), capture_output=True, text=True, timeout=480)
    assert one.returncode == 0, one.stderr[-3000:]
    diff = _max_diff(folder / "one" / "lora.safetensors", folder / "ddp" / "lora.safetensors")
    print(f"1 process x accumulation 2 vs 2 DDP processes, max |diff| after 6 steps: {diff:.3g}")
    assert diff <= ACCUMULATION_ATOL


def test_stop_then_resume_under_fsdp_matches_uninterrupted(tiny_diffusers, runs):
    dataset, folder, _ = runs
    split = folder / "split"
    first = _launch("cpu_2proc_fsdp.yaml", tiny_diffusers, dataset, split, "--max_steps", "3", "--save_every", "3",
                    "--seed", "3", *CHECKPOINTING)
    assert "FSDP rank 0" in first.stdout
    resumed = _launch("cpu_2proc_fsdp.yaml", tiny_diffusers, dataset, split, *STEPS, *CHECKPOINTING, "--resume")
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    diff = _max_diff(folder / "fsdp" / "lora.safetensors", split / "lora.safetensors")
    print(f"FSDP resumed vs uninterrupted max |diff|: {diff:.3g}")
    assert diff <= RESUME_ATOL


def test_fsdp_with_accumulation_and_clipping_equals_ddp(tiny_diffusers, runs):
    """Gradients accumulated over 2 micro-batches and clipped by a norm computed from the shards."""
    dataset, folder, _ = runs
    flags = ["--max_steps", "3", "--save_every", "3", "--gradient_accumulation", "2", "--max_grad_norm", "0.01"]
    for config, name in (("cpu_2proc_fsdp.yaml", "fsdp-acc"), ("cpu_2proc.yaml", "ddp-acc")):
        _launch(config, tiny_diffusers, dataset, folder / name, *flags)
    diff = _max_diff(folder / "fsdp-acc" / "lora.safetensors", folder / "ddp-acc" / "lora.safetensors")
    print(f"FSDP vs DDP with accumulation 2 and clipping, max |diff|: {diff:.3g}")
    assert diff <= SAME_AS_DDP_ATOL


def test_lokr_under_fsdp_equals_ddp(tiny_diffusers, tmp_path):
    """A LoKr's parameters are not named ``lora_``: FSDP still trains, gathers, clips and saves them as DDP does."""
    from chronoedit_lora.lora import load_lora

    dataset = make_subset(tmp_path / "data", 4)
    flags = ["--max_steps", "3", "--save_every", "3", "--adapter", "lokr", "--rank", "2", "--lokr_decompose_both", "true",
             "--max_grad_norm", "0.01"]
    for config, name in (("cpu_2proc_fsdp.yaml", "fsdp-lokr"), ("cpu_2proc.yaml", "ddp-lokr")):
        _launch(config, tiny_diffusers, dataset, tmp_path / name, *flags)
    weights, metadata = load_lora(tmp_path / "fsdp-lokr" / "lora.safetensors")
    assert {w.kind for w in weights.values()} == {"lokr"} and metadata["adapter"] == "lokr"
    assert max(w.delta().abs().max().item() for w in weights.values()) > 1e-4  # it trained
    diff = _max_diff(tmp_path / "fsdp-lokr" / "lora.safetensors", tmp_path / "ddp-lokr" / "lora.safetensors")
    print(f"LoKr FSDP vs DDP max |diff| after 3 steps: {diff:.3g}")
    assert diff <= SAME_AS_DDP_ATOL


def test_a_two_process_lora_checkpoint_continues_on_one_training_every_pair_once(tiny_diffusers, runs):
    """A LoRA run's checkpoint (whole LoRA, gathered optimizer state) on another process count: the
    rest of the epoch is split anew, so its pairs are trained once (steps 1-3 on 2 processes, 4-5 on 1)."""
    dataset, folder, _ = runs
    one = folder / "two-then-one"
    result = subprocess.run(_train_cmd(tiny_diffusers, dataset, one, *STEPS, *CHECKPOINTING, "--max_steps", "5",
                                       "--resume", str(folder / "fsdp" / "checkpoints" / "step-000003")),
                            capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing a 2-process run on 1" in result.stdout
    rows = {int(r["step"]): r["samples"].split() for run in (folder / "fsdp", one)
            for r in csv.DictReader((run / "logs" / "metrics.csv").open()) if int(r["step"]) <= 5}
    assert [len(rows[s]) for s in range(1, 6)] == [2, 2, 2, 1, 1]
    assert sorted(int(i) for s in range(1, 6) for i in rows[s]) == list(range(8))
    assert _max_diff(one / "lora.safetensors", folder / "fsdp" / "lora-step000003.safetensors") > 1e-4


def test_base_loras_under_fsdp_equal_the_merged_base_and_resume(float32_model, distill_like, tmp_path):
    """base_loras are fused into the base before FSDP shards it: training on base + LoRA under FSDP
    equals FSDP training on the merged base, and a stop after step 2 resumed under FSDP (same
    base_loras) ends where the uninterrupted run did."""
    from chronoedit_lora.lora.merge import merge_model

    dataset = make_subset(tmp_path / "data", 4)
    merged, _ = merge_model(float32_model, None, [(distill_like, 0.7)], tmp_path / "merged")
    flags = ["--max_steps", "4", "--save_every", "2", "--keep_checkpoints", "2", "--seed", "3"]
    base = ["--base_loras", f"{distill_like}:0.7"]
    stacked = tmp_path / "stacked"
    _launch("cpu_2proc_fsdp.yaml", float32_model, dataset, stacked, *flags, *base)
    _launch("cpu_2proc_fsdp.yaml", merged.parent, dataset, tmp_path / "plain", *flags)
    diff = _max_diff(stacked / "lora.safetensors", tmp_path / "plain" / "lora.safetensors")
    moved = _max_diff(stacked / "lora.safetensors", stacked / "lora-step000002.safetensors")
    print(f"FSDP on base + LoRA vs on the merged base, max |diff| after 4 steps: {diff:.3g} (steps 3-4 moved it {moved:.3g})")
    assert diff <= BASE_ATOL and moved > 1e-4
    # the same run stopped after step 2: its folder as it was then (the step-2 checkpoint the newest)
    shutil.copytree(stacked, tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-000004")
    resumed = _launch("cpu_2proc_fsdp.yaml", float32_model, dataset, tmp_path / "split", *flags, *base, "--resume")
    assert "at step 2" in resumed.stdout and "FSDP rank 1" in resumed.stdout
    diff = _max_diff(stacked / "lora.safetensors", tmp_path / "split" / "lora.safetensors")
    print(f"FSDP with base_loras resumed vs uninterrupted max |diff|: {diff:.3g}")
    assert diff <= RESUME_ATOL
