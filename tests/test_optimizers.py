"""Optimizers and LR schedules (chronoedit_lora/train/loop/optimizer.py): the LR of every step against
the schedule's formula written out, each optimizer's stop-and-resume against the uninterrupted run,
and the refusals."""

from __future__ import annotations

import csv
import importlib.util
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.train.loop.config import load_config
from chronoedit_lora.train.loop.optimizer import PACKAGES, POLYNOMIAL_END, make_optimizer, make_schedule
from chronoedit_lora.train.loop.trainer import train

from .test_train import make_subset, tiny_config

WARMUP, TOTAL = 3, 12
# Same ops in the same order in fp32 on CPU: equal up to float noise, relative to each tensor's size
# (Prodigy's LoRA is ~1e-5 after 6 steps, so the absolute RESUME_ATOL would say little)
RESUME_RTOL = 1e-5


def expected_factor(name: str, k: int, warmup: int, total: int, cycles: int = 1, power: float = 1.0,
                    lr: float = 1.0) -> float:
    """The LR factor of optimizer step k (1-based) of a ``total``-step run: a linear warm-up from
    1/warmup, then the decay, which ends at step total + 1."""
    if k < warmup:
        return k / warmup
    progress = (k - warmup) / (total + 1 - warmup)
    if name == "constant":
        return 1.0
    if name == "linear":
        return 1 - progress
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if name == "cosine_with_restarts":
        return 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    return ((lr - POLYNOMIAL_END) * (1 - progress) ** power + POLYNOMIAL_END) / lr  # polynomial


@pytest.mark.parametrize("name, extra", [("constant", {}), ("linear", {}), ("cosine", {}),
                                         ("cosine_with_restarts", {"lr_cycles": 3}),
                                         ("polynomial", {"lr_power": 2.0})])
@pytest.mark.parametrize("warmup", [0, WARMUP])
def test_each_step_trains_at_the_schedules_lr(name, extra, warmup):
    config = load_config(None, {"lr_scheduler": name, "warmup_steps": str(warmup), "learning_rate": "0.01",
                                **{k: str(v) for k, v in extra.items()}})
    optimizer = make_optimizer([torch.nn.Parameter(torch.ones(2))], config, fused=None)
    schedule = make_schedule(optimizer, config, TOTAL)
    used = []
    for _ in range(TOTAL):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    cycles, power = extra.get("lr_cycles", 1), extra.get("lr_power", 1.0)
    expected = [0.01 * expected_factor(name, k, warmup, TOTAL, cycles, power, 0.01) for k in range(1, TOTAL + 1)]
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert min(used) > 0  # no step is wasted at lr 0 (warm-up's first, a decay's last)
    if name != "constant":
        assert used[-1] < 0.25 * 0.01  # the decay has (nearly) run out at the last step


def test_the_default_warm_up_is_the_kits_min_1_s_plus_1_over_warmup():
    config = load_config(None, {"warmup_steps": "4", "learning_rate": "1"})
    optimizer = make_optimizer([torch.nn.Parameter(torch.ones(2))], config, fused=None)
    schedule = make_schedule(optimizer, config, 8)
    used = []
    for _ in range(8):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert used == [min(1.0, (s + 1) / 4) for s in range(8)]  # the schedule before lr_scheduler existed


OPTIMIZERS = ["prodigy", "adafactor",
              pytest.param("adamw8bit", marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                                                 reason="bitsandbytes (the adamw8bit extra) not installed"))]


def _state_difference(a: Path, b: Path) -> float:
    """The largest difference between two checkpoints' optimizer states (tensors and numbers), each
    relative to the largest magnitude of its entry."""
    sa, sb = (torch.load(p / "optimizer.pt", weights_only=True)["optimizer"] for p in (a, b))
    assert sa["state"].keys() == sb["state"].keys() and len(sa["param_groups"]) == len(sb["param_groups"])
    worst = 0.0
    for index in sa["state"]:
        ea, eb = _flat(sa["state"][index]), _flat(sb["state"][index])  # bitsandbytes nests its state in a dict
        assert ea.keys() == eb.keys()
        for key, value in ea.items():
            worst = max(worst, _relative(*(torch.as_tensor(v).double() for v in (value, eb[key]))))
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        for key, value in ga.items():
            if isinstance(value, float):
                worst = max(worst, _relative(torch.tensor(value), torch.tensor(gb[key])))
    return worst


def _flat(entry: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in entry.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(a.abs().max().item(), b.abs().max().item())
    return (a - b).abs().max().item() / scale if scale else 0.0


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_resumes_exactly(tiny_diffusers, tmp_path, optimizer):
    """Stop after step 3 of 6 and resume: the optimizer state, the LoRA and the logged LRs equal the
    uninterrupted run's (cosine schedule with warm-up, so the schedule's position is resumed too)."""
    from chronoedit_lora.lora import load_lora

    dataset = make_subset(tmp_path / "data", 4)
    lr = 0.5 if optimizer == "prodigy" else 5e-3
    common = dict(optimizer=optimizer, learning_rate=lr, lr_scheduler="cosine", warmup_steps=2, save_every=3, seed=3)
    straight = train(tiny_config(tiny_diffusers, dataset, tmp_path / "straight", max_steps=6, **common))
    # the same run stopped after step 3: its folder as it was then (the step-3 checkpoint the newest)
    shutil.copytree(tmp_path / "straight", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-000006")
    resumed = train(tiny_config(tiny_diffusers, dataset, tmp_path / "split", max_steps=6, resume=True, **common))
    assert straight.steps == resumed.steps == 6
    checkpoint = Path("checkpoints") / "step-000006"
    state_difference = _state_difference(tmp_path / "straight" / checkpoint, tmp_path / "split" / checkpoint)
    a, b = load_lora(straight.lora)[0], load_lora(resumed.lora)[0]
    size = max(a[k].up.abs().max().item() for k in a)
    lora_difference = max((a[k].up - b[k].up).abs().max().item() for k in a) / size
    print(f"{optimizer}: LoRA B up to {size:.3g}; resumed vs straight: LoRA {lora_difference:.3g}, state "
          f"{state_difference:.3g} (relative)")
    assert size > 1e-6  # it trained (Prodigy's first steps are tiny: its step size starts at d0 = 1e-6)
    assert state_difference <= RESUME_RTOL and lora_difference <= RESUME_RTOL
    logged = [[float(r["lr"]) for r in csv.DictReader((tmp_path / run / "logs" / "metrics.csv").open())]
              for run in ("straight", "split")]
    assert logged[0] == logged[1] == pytest.approx([lr * expected_factor("cosine", k + 1, 2, 6) for k in range(1, 7)],
                                                   rel=1e-5)  # logged to 6 digits; the lr after a step is the next step's


@pytest.mark.parametrize("key, value, says", [
    ("optimizer", "adam8bit", "did you mean 'adamw8bit'"),
    ("optimizer", "lion", "is not one of 'adamw', 'adamw8bit', 'prodigy', 'adafactor'"),
    ("lr_scheduler", "cosine_restarts", "did you mean 'cosine_with_restarts'"),
    ("lr_cycles", "0", "lr_cycles must be >= 1"),
    ("lr_power", "nan", "lr_power must be a finite number"),
    ("lr_power", "-1", "lr_power must be > 0"),
])
def test_bad_optimization_settings_are_refused_in_one_line(tmp_path, key, value, says):
    with pytest.raises(ChronoEditError) as error:
        load_config(None, {"model": str(tmp_path / "no-model"), key: value})
    assert says in str(error.value) and "\n" not in str(error.value)


def test_a_polynomial_decay_needs_a_learning_rate_above_its_end():
    with pytest.raises(ChronoEditError, match=r"learning_rate \(with lr_scheduler = \"polynomial\", which decays to "
                                              r"1e-7\) must be > 1e-07"):
        load_config(None, {"lr_scheduler": "polynomial", "learning_rate": "1e-8"})


def test_a_full_fine_tune_refuses_8bit_adamw():
    with pytest.raises(ChronoEditError) as error:
        load_config(None, {"finetune": "full", "optimizer": "adamw8bit"})
    assert str(error.value) == ("optimizer = 'adamw8bit' with finetune = \"full\": bitsandbytes' 8-bit state is not "
                                "tested in a full fine-tune's sharded checkpoints; use adamw, prodigy or adafactor.")


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy", "adafactor"])
def test_a_full_fine_tune_resumes_each_optimizer_exactly(tiny_diffusers, tmp_path, optimizer):
    """A full fine-tune's DCP checkpoint holds the optimizer's own state (AdamW's moments, Prodigy's
    flattened s and p0, Adafactor's factored rows and columns) and optimizer.pt its per-group numbers
    (Prodigy's d): stopped after step 2 of 4 and resumed, the weights and all of that equal the
    uninterrupted run's."""
    from chronoedit_lora.train.state import dcp

    dataset = make_subset(tmp_path / "data", 4)
    common = dict(finetune="full", trainable="blocks.*.self_attn.*", optimizer=optimizer, save_every=2, seed=3,
                  learning_rate=0.5 if optimizer == "prodigy" else 1e-3, lr_scheduler="cosine", warmup_steps=1)
    train(tiny_config(tiny_diffusers, dataset, tmp_path / "straight", max_steps=4, **common))
    shutil.copytree(tmp_path / "straight", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-000004")
    train(tiny_config(tiny_diffusers, dataset, tmp_path / "split", max_steps=4, resume=True, **common))
    step4, step2 = (Path("checkpoints") / f"step-00000{n}" for n in (4, 2))
    keys = dcp.saved_tensors(tmp_path / "straight" / step4)
    assert keys == dcp.saved_tensors(tmp_path / "split" / step4)
    kinds = {key.partition(".")[0] for key in keys}
    assert kinds == {"adamw": {"model", "optimizer", "exp_avg", "exp_avg_sq"},
                     "prodigy": {"model", "optimizer", "exp_avg", "exp_avg_sq", "s", "p0"},
                     "adafactor": {"model", "optimizer", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "RMS"},
                     }[optimizer]  # Adafactor's exp_avg_sq: the 1-D parameters' (unfactored)
    saved = {run: _dcp_tensors(tmp_path / run / step4, keys) for run in ("straight", "split")}
    state = max(_relative(saved["straight"][k], saved["split"][k]) for k in keys)
    groups = [(torch.load(tmp_path / run / step4 / "optimizer.pt", weights_only=True)["optimizer"] or
               {"param_groups": []})["param_groups"] for run in ("straight", "split")]  # AdamW's: settings only
    numbers = max([0.0] + [_relative(torch.tensor(float(a[k])), torch.tensor(float(b[k]))) for a, b in zip(*groups)
                           for k, v in a.items() if isinstance(v, (int, float)) and not isinstance(v, bool)])
    moved = max(_relative(saved["straight"][k], _dcp_tensors(tmp_path / "straight" / step2, [k])[k])
                for k in keys if k.startswith("model."))
    print(f"full fine-tune, {optimizer}: resumed vs straight, relative: state and weights {state:.3g}, "
          f"group numbers {numbers:.3g}; weights moved {moved:.3g} over steps 3-4")
    assert moved > 1e-6  # it trained after the resume point
    assert state <= RESUME_RTOL and numbers <= RESUME_RTOL
    if optimizer == "prodigy":
        assert groups[0][0]["d_numerator"] != 0  # the running sum d comes from: restarting it at 0 would show


def _dcp_tensors(checkpoint: Path, keys) -> dict[str, torch.Tensor]:
    """Tensors of a full fine-tune's checkpoint by their DCP key, read whole in this process."""
    import torch.distributed.checkpoint as dcp_io
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from chronoedit_lora.train.state import dcp

    shapes = dcp.saved_tensors(checkpoint)
    state = {key: torch.empty(shapes[key][0], dtype=shapes[key][1]) for key in keys}
    dcp_io.load(state, storage_reader=HuggingFaceStorageReader(str(checkpoint / dcp.STATE)), no_dist=True)
    return {key: value.double() for key, value in state.items()}


def test_a_missing_optimizer_package_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(PACKAGES, "adamw8bit", ("no_such_module_for_this_test", "bitsandbytes==0.50.2"))
    with pytest.raises(ChronoEditError) as error:
        load_config(None, {"optimizer": "adamw8bit"})
    assert str(error.value) == ("optimizer = 'adamw8bit' needs the no_such_module_for_this_test package, which is not "
                                "installed: pip install bitsandbytes==0.50.2 (or choose another optimizer).")


def test_8bit_adamw_is_refused_under_an_fsdp_launch_and_the_others_pass(monkeypatch):
    from chronoedit_lora.train.distributed.launch import check_launch

    config = load_config(None, {"optimizer": "adafactor"})
    config.optimizer = "adamw8bit"  # the package check is the config's; this is the launch's
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ChronoEditError) as error:
        check_launch(config)
    assert str(error.value) == ("optimizer = 'adamw8bit' cannot be used with an FSDP launch: bitsandbytes' 8-bit step "
                                "is not tested on FSDP2's sharded parameters. Use adamw, prodigy, adafactor, or "
                                "configs/accelerate/multi_gpu_ddp.yaml.")
    for optimizer in ("adamw", "prodigy", "adafactor"):  # AdamW on the shards, the others on whole copies
        config.optimizer = optimizer
        check_launch(config)


@pytest.mark.parametrize("optimizer", ["prodigy", "adafactor"])
def test_a_full_fine_tune_under_fsdp_refuses_the_whole_copy_optimizers(monkeypatch, optimizer):
    from chronoedit_lora.train.distributed.launch import check_launch

    config = load_config(None, {"finetune": "full", "optimizer": optimizer})
    check_launch(config)  # one process or DDP: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ChronoEditError) as error:
        check_launch(config)
    assert str(error.value) == (
        f"optimizer = '{optimizer}' with finetune = \"full\" cannot be used with an FSDP launch: under FSDP it steps "
        "on whole copies of the trained tensors, so every rank would hold all the trained weights and their optimizer "
        "state. Use adamw, or configs/accelerate/multi_gpu_ddp.yaml.")


def test_fp16_with_a_whole_copy_optimizer_is_refused_under_fsdp(monkeypatch):
    from chronoedit_lora.train.distributed.launch import check_launch

    config = load_config(None, {"optimizer": "prodigy", "mixed_precision": "fp16"})
    check_launch(config)  # one process or DDP: the scaler unscales the parameters' own gradients
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ChronoEditError, match=r"^optimizer = 'prodigy' with mixed_precision = \"fp16\" cannot be used "
                                              r"with an FSDP launch: .* Use mixed_precision = \"bf16\""):
        check_launch(config)
    config.mixed_precision = "bf16"
    check_launch(config)


# Prodigy and Adafactor under FSDP (fsdp.step_on_whole_tensors): rank 3, so each LoRA A matrix (3 rows)
# is split unevenly over the 2 processes (where Prodigy's own step on the shards is refused).
# One process accumulating two batches sums their gradients where 2 FSDP processes reduce-scatter them:
# another float32 order. Measured after 4 steps, relative: Prodigy's LoRA 6.8e-5, its state (d included)
# 4.6e-6; a step on the shards instead differed by about 8% (d about half).
ACCUMULATION_RTOL = 5e-4
FSDP_FLAGS = ["--save_every", "2", "--seed", "3", "--rank", "3", "--alpha", "3", "--lr_scheduler", "cosine",
              "--warmup_steps", "1"]


@pytest.fixture(scope="module", params=["prodigy", "adafactor"])
def fsdp_runs(request, tiny_diffusers, tmp_path_factory):
    """4 steps of a 2-process FSDP run, saved every 2 steps, with each optimizer."""
    from .test_fsdp import _launch

    optimizer = request.param
    folder = tmp_path_factory.mktemp(f"fsdp-{optimizer}")
    dataset = make_subset(folder / "data", 8)
    flags = [*FSDP_FLAGS, "--optimizer", optimizer, "--learning_rate", "0.5" if optimizer == "prodigy" else "5e-3"]
    _launch("cpu_2proc_fsdp.yaml", tiny_diffusers, dataset, folder / "fsdp", *flags, "--max_steps", "4")
    return optimizer, dataset, folder, flags


def _compare(folder: Path, a: str, b: str) -> tuple[float, float]:
    """(the LoRA's, the optimizer state's) largest difference between runs a and b after step 4,
    each relative to the largest magnitude of its tensor (RESUME_RTOL's yardstick)."""
    from chronoedit_lora.lora import load_lora

    wa, wb = load_lora(folder / a / "lora.safetensors")[0], load_lora(folder / b / "lora.safetensors")[0]
    lora = max(_relative(wa[k].up, wb[k].up) for k in wa)
    step = Path("checkpoints") / "step-000004"
    return lora, _state_difference(folder / a / step, folder / b / step)


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_process_accumulating_their_two_batches(tiny_diffusers, fsdp_runs):
    """The optimizer's step and state (Prodigy's step size d included) are the single-process ones."""
    from .test_train_processes import _train_cmd

    optimizer, dataset, folder, flags = fsdp_runs
    one = subprocess.run(_train_cmd(tiny_diffusers, dataset, folder / "one", *flags, "--max_steps", "4",
                                    "--gradient_accumulation", "2"), capture_output=True, text=True, timeout=480)
    assert one.returncode == 0, one.stderr[-3000:]
    lora, state = _compare(folder, "fsdp", "one")
    print(f"{optimizer}: 2-process FSDP vs 1 process, relative difference: LoRA {lora:.3g}, state {state:.3g}")
    assert lora <= ACCUMULATION_RTOL and state <= ACCUMULATION_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 1])
def test_a_stopped_fsdp_run_resumes_exactly_on_two_or_one_process(tiny_diffusers, fsdp_runs, processes):
    """Resumed from the step-2 checkpoint under FSDP (2 processes) or on 1 process accumulating the
    same two batches per step: the LoRA and optimizer state after step 4 are the uninterrupted run's."""
    from .test_fsdp import _launch
    from .test_train_processes import _train_cmd

    optimizer, dataset, folder, flags = fsdp_runs
    split = folder / f"split-{processes}"
    shutil.copytree(folder / "fsdp", split)
    shutil.rmtree(split / "checkpoints" / "step-000004")
    resume = [*flags, "--max_steps", "4", "--resume"]
    if processes == 2:
        result = _launch("cpu_2proc_fsdp.yaml", tiny_diffusers, dataset, split, *resume)
    else:  # the same batches per step on one process: a change of settings the run must be told to accept
        result = subprocess.run(_train_cmd(tiny_diffusers, dataset, split, *resume, "--gradient_accumulation", "2",
                                           "--allow_changes", "true"), capture_output=True, text=True, timeout=480)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 2" in result.stdout
    lora, state = _compare(folder, "fsdp", split.name)
    print(f"{optimizer}: resumed on {processes} process(es) vs uninterrupted 2-process FSDP, relative difference: "
          f"LoRA {lora:.3g}, state {state:.3g}")
    # on 2 processes the same ops in the same order; on 1, accumulation's float order (ACCUMULATION_RTOL)
    assert max(lora, state) <= (RESUME_RTOL if processes == 2 else ACCUMULATION_RTOL)


def _old_kit_scheduler_state(lr: float, warmup: int, steps: int) -> dict:
    """The LR scheduler's state as the kit wrote it before lr_scheduler existed (its code, verbatim):
    torch's LambdaLR built at last_epoch -1, stepped once per optimizer step, ``steps`` steps in."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return scheduler.state_dict()


def test_a_checkpoint_from_before_lr_scheduler_resumes_at_the_uninterrupted_runs_lr(tiny_diffusers, tmp_path):
    """A checkpoint written mid-warm-up by the kit before lr_scheduler existed (its scheduler counted
    steps from 0, today's from 1, and it carries no schedule marker) resumes with every step's LR and
    the LoRA equal to the uninterrupted run's."""
    from chronoedit_lora.lora import load_lora
    from chronoedit_lora.train.state import checkpoint as ckpt

    dataset = make_subset(tmp_path / "data", 4)
    common = dict(learning_rate=5e-3, warmup_steps=5, save_every=2, keep_checkpoints=3, seed=3)
    straight = train(tiny_config(tiny_diffusers, dataset, tmp_path / "straight", max_steps=6, **common))
    shutil.copytree(tmp_path / "straight", tmp_path / "old")
    for step in (4, 6):
        shutil.rmtree(tmp_path / "old" / "checkpoints" / f"step-00000{step}")
    saved = tmp_path / "old" / "checkpoints" / "step-000002" / "optimizer.pt"
    state = torch.load(saved, weights_only=True)
    old = {"optimizer": state["optimizer"], "scheduler": _old_kit_scheduler_state(5e-3, 5, 2)}
    assert set(state) - set(old) == {ckpt.SCHEDULER_COUNT}  # the one key an old kit did not write
    assert old["scheduler"]["last_epoch"] == state["scheduler"]["last_epoch"] - 1  # what the key tells apart
    torch.save(old, saved)
    resumed = train(tiny_config(tiny_diffusers, dataset, tmp_path / "old", max_steps=6, resume=True, **common))
    assert straight.steps == resumed.steps == 6
    logged = [[float(r["lr"]) for r in csv.DictReader((tmp_path / run / "logs" / "metrics.csv").open())]
              for run in ("straight", "old")]
    # logged after each step: the next step's lr, so steps 2 .. 7 of the warm-up 1/5, 2/5, ..., 5/5, 5/5
    assert logged[0] == logged[1] == pytest.approx([5e-3 * min(1.0, (k + 1) / 5) for k in range(1, 7)], rel=1e-5)
    a, b = load_lora(straight.lora)[0], load_lora(resumed.lora)[0]
    size = max(a[k].up.abs().max().item() for k in a)
    assert max((a[k].up - b[k].up).abs().max().item() for k in a) <= RESUME_RTOL * size
