"""A run is never lost or replaced by accident, and bad settings stop before any model loads."""

from __future__ import annotations

import csv
import shutil
import signal

import pytest
import torch

from chronoedit_lora.cli import main
from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.lora import load_lora
from chronoedit_lora.train.loop.config import load_config
from chronoedit_lora.train.state.run_folder import RunLock
from chronoedit_lora.train.loop.trainer import NonFiniteError, train

from .test_train import make_subset, tiny_config


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("pairs"), 4)


def metrics(output) -> list[dict]:
    return list(csv.DictReader((output / "logs" / "metrics.csv").open()))


def test_a_second_run_into_the_same_folder_is_refused_and_overwrite_starts_over(tiny_diffusers, pairs, tmp_path):
    output = tmp_path / "run"
    train(tiny_config(tiny_diffusers, pairs, output, max_steps=4, save_every=2))
    before = (output / "lora.safetensors").read_bytes()
    with pytest.raises(ChronoEditError, match=r"holds another training run \(newest checkpoint: step-000004\)"
                                              r".*--resume.*--overwrite"):
        train(tiny_config(tiny_diffusers, pairs, output, max_steps=2, learning_rate=1e-3))
    assert (output / "lora.safetensors").read_bytes() == before  # untouched
    (output / "cache").mkdir()  # conditioning cache: shared and keyed, so kept
    train(tiny_config(tiny_diffusers, pairs, output, max_steps=2, save_every=1, overwrite=True))
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert sorted(p.name for p in output.glob("lora-step*")) == ["lora-step000001.safetensors", "lora-step000002.safetensors"]
    assert [r["step"] for r in metrics(output)] == ["1", "2"] and (output / "cache").is_dir()
    assert load_lora(output / "lora.safetensors")[1]["step"] == "2"


def test_printed_commands_are_shell_quoted(tiny_diffusers, pairs, tmp_path, capsys):
    import shlex

    output = tmp_path / "my run's folder"
    train(tiny_config(tiny_diffusers, pairs, output, max_steps=1))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("use it: "))
    assert shlex.split(line[len("use it: "):])[5] == str(output / "lora.safetensors")


def test_a_locked_folder_is_refused_naming_the_holder(tiny_diffusers, pairs, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    lock = RunLock(output)
    lock.acquire()  # another run holds the folder (flock: a second open file conflicts even in-process)
    try:
        with pytest.raises(ChronoEditError, match=r"in use by another training run \(host .*, pid \d+, started "):
            train(tiny_config(tiny_diffusers, pairs, output, max_steps=1))
    finally:
        lock.release()
    assert train(tiny_config(tiny_diffusers, pairs, output, max_steps=1)).steps == 1  # free again


def test_resume_refuses_changed_settings_unless_allowed_and_lists_future_ones(tiny_diffusers, pairs, tmp_path, capsys):
    output = tmp_path / "run"
    train(tiny_config(tiny_diffusers, pairs, output, max_steps=2, save_every=2))
    with pytest.raises(ChronoEditError, match=r"learning_rate: 0.005 -> 0.001(.|\n)*--allow_changes"):
        train(tiny_config(tiny_diffusers, pairs, output, max_steps=4, learning_rate=1e-3, resume=True))
    capsys.readouterr()
    result = train(tiny_config(tiny_diffusers, pairs, output, max_steps=3, save_every=3, resume=True))
    assert result.steps == 3 and "max_steps: 2 -> 3" in capsys.readouterr().out
    result = train(tiny_config(tiny_diffusers, pairs, output, max_steps=4, save_every=3, learning_rate=1e-3,
                               resume=True, allow_changes=True))
    assert result.steps == 4


def test_resume_from_a_chosen_checkpoint_and_a_damaged_one_is_named(tiny_diffusers, pairs, tmp_path, capsys):
    output = tmp_path / "run"
    train(tiny_config(tiny_diffusers, pairs, output, max_steps=4, save_every=2))
    checkpoints = output / "checkpoints"
    (checkpoints / "step-000004" / "optimizer.pt").write_bytes(b"\x80garbage")
    with pytest.raises(ChronoEditError, match=r"step-000004/optimizer.pt is damaged.*--resume .*step-000002"):
        train(tiny_config(tiny_diffusers, pairs, output, max_steps=4, resume=True))
    capsys.readouterr()
    result = train(tiny_config(tiny_diffusers, pairs, output, max_steps=4, resume_from=checkpoints / "step-000002"))
    assert result.steps == 4 and "step-000002 at step 2" in capsys.readouterr().out
    assert main(["train", "--model", str(tiny_diffusers), "--dataset", str(pairs), "--output", str(output),
                 "--resume", str(tmp_path), "--height", "32", "--width", "32"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", "-1e-4", "learning_rate must be > 0"),
    ("rank", "0", "rank must be >= 1"),
    ("alpha", "-3", "alpha must be > 0"),
    ("batch_size", "0", "batch_size must be >= 1"),
    ("gradient_accumulation", "0", "gradient_accumulation must be >= 1"),
    ("save_every", "0", "save_every must be >= 1"),
    ("max_steps", "-5", "max_steps must be >= 0"),
    ("dtype", "bfloat61", "dtype 'bfloat61' is not one of .* \\(did you mean 'bfloat16'\\?\\)"),
    ("rope", "skpi", "rope 'skpi' is not one of 'skip', 'legacy' \\(did you mean 'skip'\\?\\)"),
    ("mixed_precision", "bf61", "mixed_precision 'bf61' .*did you mean 'bf16'"),
    ("sample_steps", "100000000", "sample_steps must be >= 1 and <= 1000"),
    ("height", "96", "give both height and width"),
    ("width", "100", "width 100 must be a positive multiple of 16 \\(e.g. 96 or 112\\)"),
])
def test_bad_settings_name_the_key_and_the_range(key, value, message):
    values = {key: value, "height": "64"} if key == "width" else {key: value}
    with pytest.raises(ChronoEditError, match=message):
        load_config(None, values)


def test_targets_are_checked_against_the_dit_before_any_model_loads(tiny_diffusers, pairs, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers, model)
    for file in (model / "vae").glob("*.safetensors"):
        file.write_bytes(b"broken")  # loading the VAE would fail: the target check must come first
    output = tmp_path / "run"
    with pytest.raises(ChronoEditError, match=r"'to_q' \(that is a diffusers name; the kit uses Wan names: "
                                              r"'cross_attn.q', 'self_attn.q'\)"):
        train(tiny_config(model, pairs, output, targets="to_q,k"))
    with pytest.raises(ChronoEditError, match=r"'ffn.1' .*did you mean"):
        train(tiny_config(model, pairs, output, targets="q,ffn.1"))
    assert not output.exists()  # a failed start leaves no empty run folder behind


def test_a_non_finite_loss_stops_before_the_step_and_saves_nothing_from_it(tiny_diffusers, pairs, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step \d+: the training (loss|gradient) is not finite \((norm )?(nan|inf)\).*"
                                             r"last good checkpoint with --resume .*step-000001"):
        train(tiny_config(tiny_diffusers, pairs, output, max_steps=8, save_every=1, learning_rate=1e30,
                          max_grad_norm=0))
    saved = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert saved and not (output / "lora.safetensors").exists()
    for checkpoint in saved:  # every checkpoint written holds finite weights
        weights, _ = load_lora(output / "checkpoints" / checkpoint / "lora.safetensors")
        assert all(w.down.isfinite().all() and w.up.isfinite().all() for w in weights.values())


class _NanGradient(torch.autograd.Function):
    """The identity forward, NaN gradients backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_step(tiny_diffusers, pairs, tmp_path, monkeypatch):
    from chronoedit_lora.train.objective.lora_module import LoraTrainingModule

    forward = LoraTrainingModule.forward
    monkeypatch.setattr(LoraTrainingModule, "forward", lambda self, inputs, **kw: _NanGradient.apply(forward(self, inputs, **kw)))
    with pytest.raises(NonFiniteError, match=r"step 1: the training gradient is not finite \(norm nan\).*no checkpoint"):
        train(tiny_config(tiny_diffusers, pairs, tmp_path / "run", max_steps=2, save_every=1))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_the_logged_gradient_norm_is_measured_once_and_clipped_to(tiny_diffusers, pairs, tmp_path, monkeypatch):
    """The norm in metrics.csv is the gradients' norm before clipping, and clipping scales them to max_grad_norm."""
    from chronoedit_lora.train.distributed import fsdp

    seen = []
    clip = fsdp.clip_gradients

    def recording_clip(params, grad_norm, max_norm):
        before = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
        clip(params, grad_norm, max_norm)
        seen.append((grad_norm, before, torch.nn.utils.get_total_norm([p.grad for p in params]).item()))

    monkeypatch.setattr(fsdp, "clip_gradients", recording_clip)
    output = tmp_path / "run"
    train(tiny_config(tiny_diffusers, pairs, output, max_steps=3, max_grad_norm=1e-3))
    assert len(seen) == 3
    for row, (grad_norm, before, after) in zip(metrics(output), seen):
        assert grad_norm == pytest.approx(before, rel=1e-6) and grad_norm > 1e-3
        assert float(row["grad_norm"]) == pytest.approx(grad_norm, rel=1e-5)
        assert after == pytest.approx(before * 1e-3 / (before + 1e-6), rel=1e-5)  # torch's clip_grad_norm_ rule


def test_signal_handlers_are_restored_and_accumulation_logs_whole_windows(tiny_diffusers, pairs, tmp_path, monkeypatch):
    from chronoedit_lora.train.objective.lora_module import LoraTrainingModule

    micro_losses = []
    forward = LoraTrainingModule.forward
    monkeypatch.setattr(LoraTrainingModule, "forward",
                        lambda self, inputs, **kw: micro_losses.append(loss := forward(self, inputs, **kw)) or loss)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    output = tmp_path / "run"
    train(tiny_config(tiny_diffusers, pairs, output, max_steps=2, gradient_accumulation=2))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    rows = metrics(output)
    assert len(rows) == 2 and len(micro_losses) == 4
    for row, window in zip(rows, (micro_losses[:2], micro_losses[2:])):
        assert len(row["samples"].split()) == 2  # both pairs of the window
        mean = sum(loss.item() for loss in window) / 2
        assert float(row["loss"]) == pytest.approx(mean, rel=1e-5)


def test_ctrl_c_outside_training_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import chronoedit_lora.commands.dataset as dataset_command

    (tmp_path / "metadata.csv").write_text("input_image,edited_image,prompt\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset_command, "check_dataset", interrupted)
    assert main(["dataset", "check", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "chronoedit-lora dataset: interrupted." and "Traceback" not in err


def test_dataset_check_and_cache_refuse_bad_sizes(tmp_path, capsys):
    (tmp_path / "metadata.csv").write_text("input_image,edited_image,prompt\n")
    assert main(["dataset", "check", str(tmp_path), "--height", "100", "--width", "64"]) == 2
    assert "100 must be a positive multiple of 16" in capsys.readouterr().err
    assert main(["cache", "--dataset", str(tmp_path / "metadata.csv"), "--height", "100", "--width", "64"]) == 2
    assert "height 100 must be a positive multiple of 16" in capsys.readouterr().err
