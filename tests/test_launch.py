"""Launches: two nodes over loopback, the DeepSpeed preset's fields, and what a launch refuses
before the Accelerator starts (DeepSpeed without its package or CUDA, fp8 or sampling under FSDP)."""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.train.loop.config import TrainConfig
from chronoedit_lora.train.distributed.launch import check_launch

from .test_train import make_subset
from .test_train_processes import ROOT, _train_cmd

TWO_NODES_TIMEOUT = 420  # seconds for both nodes together; then both process groups are killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_over_loopback_train_in_sync_and_rank0_writes_one_lora(tiny_diffusers, tmp_path):
    dataset = make_subset(tmp_path / "data", 4)
    output = tmp_path / "run"
    port = str(_free_port())
    args = _train_cmd(tiny_diffusers, dataset, output, "--max_steps", "4", "--save_every", "2",
                      "--check_sync_every", "1")[4:]
    nodes = []
    try:
        for machine_rank in (0, 1):  # one process per "node"; DDP over gloo
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--num_machines", "2", "--num_processes", "2",
                 "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                 str(ROOT / "scripts/train.py"), *args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
        deadline = time.monotonic() + TWO_NODES_TIMEOUT
        outputs = [node.communicate(timeout=max(deadline - time.monotonic(), 1)) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "2 process(es)" in outputs[0][0]
    assert "LoRA:" in outputs[0][0] and "LoRA:" not in outputs[1][0]  # only rank 0 reports (and writes) it
    assert sorted(p.name for p in output.glob("*.safetensors")) == [
        "lora-step000002.safetensors", "lora-step000004.safetensors", "lora.safetensors"]
    rows = list(csv.DictReader((output / "logs" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # written once, by rank 0
    assert all(len(r["samples"].split()) == 2 for r in rows)  # one pair per node per step
    # --check_sync_every 1 compared the LoRA across the two nodes after every step (a mismatch fails the run)


def test_deepspeed_preset_has_the_fields_accelerate_needs():
    preset = yaml.safe_load((ROOT / "configs/accelerate/deepspeed_zero2_offload.yaml").read_text())
    assert {"compute_environment", "distributed_type", "deepspeed_config", "num_processes", "num_machines",
            "mixed_precision"} <= preset.keys()
    assert preset["distributed_type"] == "DEEPSPEED" and preset["compute_environment"] == "LOCAL_MACHINE"
    ds = preset["deepspeed_config"]
    assert ds["zero_stage"] == 2
    assert ds["offload_optimizer_device"] == "cpu" and ds["offload_param_device"] == "none"
    assert ds["zero3_init_flag"] is False and ds["gradient_accumulation_steps"] >= 1
    assert preset["mixed_precision"] in ("no", "bf16", "fp16")


@pytest.mark.parametrize("preset", ["fsdp.yaml", "fsdp_multi_node.yaml", "cpu_2proc_fsdp.yaml"])
def test_fsdp_presets_shard_per_dit_block_with_fsdp2(preset):
    config = yaml.safe_load((ROOT / "configs/accelerate" / preset).read_text())
    assert config["distributed_type"] == "FSDP"
    fsdp = config["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "DiTBlock"
    assert fsdp["fsdp_activation_checkpointing"] is False  # the kit's gradient_checkpointing does it
    from diffsynth.models.wan_video_dit import DiTBlock  # the class really has that name

    assert DiTBlock.__name__ == "DiTBlock"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None and torch.cuda.is_available(),
                    reason="this machine can run DeepSpeed")
def test_deepspeed_launch_without_deepspeed_or_cuda_fails_at_once(tiny_diffusers, tmp_path):
    """What accelerate launch sets for a DeepSpeed config, on this machine: one clear line, no model loaded."""
    dataset = make_subset(tmp_path / "data", 2)
    env = dict(os.environ, ACCELERATE_USE_DEEPSPEED="true")
    start = time.monotonic()
    result = subprocess.run(_train_cmd(tiny_diffusers, dataset, tmp_path / "run", "--max_steps", "1"),
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "asks for DeepSpeed" in result.stderr and "cpu_2proc.yaml" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before the output folder or any model
    print(f"refused in {time.monotonic() - start:.1f} s")


def test_check_launch_refuses_what_cannot_work(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ChronoEditError, match="CUDA GPUs"):
        check_launch(TrainConfig())
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ChronoEditError, match="fsdp_version: 2"):
        check_launch(TrainConfig())  # accelerate's default FSDP version is 1
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ChronoEditError, match="fp8_base = true cannot be combined with an FSDP launch"):
        check_launch(TrainConfig(fp8_base=True))
    with pytest.raises(ChronoEditError, match="sample_every = 5 cannot be used with an FSDP launch"):
        check_launch(TrainConfig(sample_every=5))
    with pytest.raises(ChronoEditError, match="eval_every = 5 cannot be used with an FSDP launch.*chronoedit-lora eval"):
        check_launch(TrainConfig(eval_every=5))
    with pytest.raises(ChronoEditError, match="compile = true is not supported with an FSDP launch"):
        check_launch(TrainConfig(compile=True))
    check_launch(TrainConfig())  # plain FSDP is fine
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_launch(TrainConfig(fp8_base=True, sample_every=5, compile=True))  # and so is all of it under DDP
