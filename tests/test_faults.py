"""Faults real runs meet, one class at a time: full disks (real tmpfs mounts), damaged or foreign derived
state, numbers that would produce garbage, hostile names and files, failing plugins, file modes.

Each test asserts what the user sees (one line naming the file, a non-zero exit, no traceback) and
what is left on disk (nothing half-written, the previous state intact, a rerun that works)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from chronoedit_lora.cli import main
from chronoedit_lora.data import check_dataset
from chronoedit_lora.data.checked_files import CheckedFiles
from chronoedit_lora.data.metadata import read_metadata
from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.lora import save_lora
from chronoedit_lora.train.loop.cache import CACHE_VERSION, CacheEntryError
from chronoedit_lora.train.loop.trainer import train
from chronoedit_lora.train.state.checkpoint import checkpoint_dir

from .test_batch_edit import FAST, write_batch
from .test_train import make_subset, tiny_config

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096  # tmpfs counts space in pages


@pytest.fixture()
def tmpfs(tmp_path):
    """``make(size, options)``: a real tmpfs of ``size`` bytes (``",ro"``: read-only), and ``fill(mount, leave)``:
    take all but ``leave`` bytes."""
    mounts = []

    def make(size: int, options: str = "") -> Path:
        mount = tmp_path / f"disk{len(mounts)}"
        mount.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(mount)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(mount)
        return mount

    yield make
    for mount in mounts:
        subprocess.run(["umount", str(mount)], check=False)


def fill(mount: Path, leave: int = 0) -> Path:
    """Take all of ``mount``'s free space but ``leave`` bytes; returns the filler (delete it to free the space)."""
    filler = mount / "filler"
    free = shutil.disk_usage(mount).free
    with filler.open("wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


def one_line_error(captured: str) -> str:
    lines = [line for line in captured.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in captured, captured
    return lines[0]


# -- 1. a full disk at any write ------------------------------------------------------------------

def test_a_clip_on_a_full_disk_is_an_error_and_no_broken_file(tiny_diffusers, input_image, tmp_path, tmpfs, capsys):
    disk = tmpfs(64 * PAGE)
    image = tmp_path / "in.png"
    input_image.save(image)
    command = ["edit", "--model", str(tiny_diffusers), "--image", str(image), "--prompt", "x",
               "--output", str(disk / "a.png"), "--video", str(disk / "a.mp4"), *FAST]
    filler = fill(disk, leave=PAGE)  # room for the PNG, not the clip
    assert main(command) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"could not write {disk / 'a.mp4'}: ffmpeg: No space left on device" in error
    assert not (disk / "a.mp4").exists() and not list(disk.glob(".a.mp4*"))  # nothing that looks complete
    assert Image.open(disk / "a.png").size == (32, 32)
    filler.unlink()
    assert main(command) == 0
    import imageio.v2 as imageio

    assert len(imageio.mimread(disk / "a.mp4")) == 5


def test_a_training_run_on_a_full_disk_stops_in_one_line_and_reruns_once_freed(tiny_diffusers, tmp_path, tmpfs):
    dataset = make_subset(tmp_path / "data", 2)
    disk = tmpfs(4 * 2**20)
    output = disk / "run"
    command = [sys.executable, "-m", "chronoedit_lora.cli", "train", "--model", str(tiny_diffusers), "--dataset",
               str(dataset), "--output", str(output), "--height", "32", "--width", "32", "--dtype", "float32",
               "--rank", "4", "--max_steps", "2", "--save_every", "2", "--min_free_mb", "0",
               "--gradient_checkpointing", "false"]
    filler = fill(disk, leave=PAGE)  # the writability probe passes; the logs and checkpoints do not fit
    failed = subprocess.run(command, capture_output=True, text=True)
    assert failed.returncode == 2, failed.stderr[-2000:]
    error = one_line_error(failed.stderr)
    assert "No space left on device" in error and str(output) in error
    # nothing of this run can be resumed, so none of it is kept: the same command simply runs again
    assert not output.exists() or [p.name for p in output.iterdir()] in ([], [".lock"])
    filler.unlink()
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (output / "lora.safetensors").is_file()


def test_cache_entries_on_a_full_disk(tiny_diffusers, tmp_path, tmpfs, capsys):
    dataset = make_subset(tmp_path / "data", 2)
    disk = tmpfs(8 * 2**20)  # two tiny entries take about 2.8 MB (CLIP features are 257 x 1280 floats)
    filler = fill(disk)
    settings = ["--model", str(tiny_diffusers), "--dataset", str(dataset), "--output", str(tmp_path / "run"),
                "--height", "32", "--width", "32", "--dtype", "float32", "--cache_dir", str(disk / "cache")]
    assert main(["cache", *settings]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"could not write {disk / 'cache'}" in error and "No space left on device" in error
    assert not list((disk / "cache").rglob("*.safetensors")) and not list((disk / "cache").rglob(".*tmp*"))
    filler.unlink()
    assert main(["cache", *settings]) == 0
    assert len(list((disk / "cache").rglob("*.safetensors"))) == 2


def test_lora_merge_into_a_full_disk_leaves_no_model_folder(tiny_diffusers, random_lora, tmp_path, tmpfs, capsys):
    lora = tmp_path / "lora.safetensors"
    save_lora(random_lora, lora)
    disk = tmpfs(256 * PAGE)  # less than the tiny DiT's 6.4 MB
    command = ["lora", "merge", "--model", str(tiny_diffusers), "--lora", str(lora), "--output", str(disk / "merged")]
    assert main(command) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"could not write {disk / 'merged'}: No space left on device" in error
    assert sorted(p.name for p in disk.iterdir()) == []  # no half-merged model folder, no staging left
    roomy = tmp_path / "roomy"
    assert main([*command[:-1], str(roomy)]) == 0
    assert (roomy / "transformer").is_dir() and (roomy / "vae").is_symlink()


def test_batch_outputs_on_a_full_disk_resume_once_freed(tiny_diffusers, input_image, tmp_path, tmpfs, capsys):
    disk = tmpfs(64 * PAGE)
    edits = write_batch(disk, input_image, count=3)
    command = ["edit", "--model", str(tiny_diffusers), "--batch", str(edits), *FAST]
    filler = fill(disk, leave=PAGE)  # one 32x32 PNG fits
    assert main(command) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"could not write {disk / 'out' / '1.png'}" in error
    assert sorted(p.name for p in (disk / "out").iterdir()) == ["0.png"]
    filler.unlink()
    assert main(command) == 0
    assert "1 already done, 2 to do" in capsys.readouterr().out
    assert sorted(p.name for p in (disk / "out").iterdir()) == ["0.png", "1.png", "2.png"]


# -- 2. derived state that is damaged or foreign ---------------------------------------------------

def test_damaged_and_foreign_cache_entries_are_named_dropped_and_encoded_again(tiny_diffusers, tmp_path, capsys):
    dataset = make_subset(tmp_path / "data", 4)
    config = dict(cache=True, max_steps=1, save_every=1)
    train(tiny_config(tiny_diffusers, dataset, tmp_path / "first", **config))
    entries = sorted((tmp_path / "first" / "cache").rglob("*.safetensors"))
    assert len(entries) == 4
    good = {path: {k: v.clone() for k, v in load_file(str(path)).items()} for path in entries}  # not views of the files
    truncated, reshaped, retyped, foreign = entries
    truncated.write_bytes(truncated.read_bytes()[:-100])
    tensors = dict(good[reshaped], input_latents=torch.zeros(1, 16, 2, 3, 3))
    save_file(tensors, str(reshaped), metadata={"chronoedit_lora_cache": str(CACHE_VERSION), "key": reshaped.stem})
    save_file({k: v.double() for k, v in good[retyped].items()}, str(retyped),
              metadata={"chronoedit_lora_cache": str(CACHE_VERSION), "key": retyped.stem})
    save_file(good[foreign], str(foreign))  # no kit version in its header
    capsys.readouterr()
    result = train(tiny_config(tiny_diffusers, dataset, tmp_path / "first", **config, overwrite=True))
    out = capsys.readouterr().out
    for path, why in ((truncated, "truncated"), (reshaped, "latents of shape [1, 16, 2, 3, 3]"),
                      (retyped, "holds F64 tensors, not torch.float32"), (foreign, "another kit version")):
        assert f"{path} is " in out and why in out, (path, out)
    assert "4 new, 0 reused" in out and result.steps == 1
    for path in entries:  # encoded again: the same tensors as the first time
        again = load_file(str(path))
        assert all(torch.equal(again[k], v) for k, v in good[path].items())


def test_a_non_finite_cache_entry_stops_the_run_naming_it(tiny_diffusers, tmp_path):
    dataset = make_subset(tmp_path / "data", 1)
    train(tiny_config(tiny_diffusers, dataset, tmp_path / "run", cache=True, max_steps=1, save_every=1))
    (entry,) = (tmp_path / "run" / "cache").rglob("*.safetensors")
    tensors = load_file(str(entry))
    tensors["context"][0, 0, 0] = float("nan")
    save_file(tensors, str(entry), metadata={"chronoedit_lora_cache": str(CACHE_VERSION), "key": entry.stem})
    with pytest.raises(CacheEntryError, match=rf"{entry} holds NaN or inf in context; delete it"):
        train(tiny_config(tiny_diffusers, dataset, tmp_path / "run", cache=True, max_steps=2, save_every=1, resume=True))


@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"k": [1, 2]}', '{"k": {"sizes": "x", "problems": []}}', "{not json"])
def test_a_damaged_verdict_file_is_dropped_and_rewritten(tmp_path, capsys, content):
    dataset = make_subset(tmp_path / "data", 1)
    verdicts = tmp_path / "checked-files.json"
    verdicts.write_text(content)
    assert check_dataset(dataset, 32, 32, checked=CheckedFiles(verdicts)) == []
    assert "unreadable entries were dropped" in capsys.readouterr().out
    kept = json.loads(verdicts.read_text())
    assert isinstance(kept, dict) and len(kept) == 2 and "k" not in kept  # the pair's two images, checked anew
    assert check_dataset(dataset, 32, 32, checked=CheckedFiles(verdicts)) == []
    assert "dropped" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def runs(tiny_diffusers, tmp_path_factory) -> Path:
    """One step of a full fine-tune (its feed-forward layers) and of a LoRA run, a checkpoint each."""
    folder = tmp_path_factory.mktemp("runs")
    dataset = make_subset(folder / "data", 2)
    train(tiny_config(tiny_diffusers, dataset, folder / "full", finetune="full", trainable="blocks.*.ffn.*", max_steps=1,
                      save_every=1))
    train(tiny_config(tiny_diffusers, dataset, folder / "lora", max_steps=1, save_every=1))
    return folder


def _narrower_base(tiny_diffusers: Path, folder: Path) -> Path:
    """The tiny model with the same layer names but feed-forward layers 256 wide instead of 384."""
    shutil.copytree(tiny_diffusers, folder, symlinks=True)
    transformer = folder / "transformer"
    for shard in transformer.glob("*.safetensors"):
        tensors = load_file(str(shard))
        for key, tensor in tensors.items():
            if ".ffn." in key:
                tensors[key] = tensor[tuple(slice(0, 256) if size == 384 else slice(None) for size in tensor.shape)].clone()
        save_file(tensors, str(shard))
    config = transformer / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "ffn_dim": 256}))
    return folder


def test_a_dcp_shard_cut_short_is_named_on_export_and_on_resume(tiny_diffusers, runs, tmp_path, capsys):
    run = tmp_path / "full"
    shutil.copytree(runs / "full", run)
    checkpoint = checkpoint_dir(run, 1)
    (shard,) = (checkpoint / "state").glob("*.safetensors")
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-1000])
    assert main(["export", str(run), str(tmp_path / "model"), "--to", "diffusers"]) == 2
    assert f"{shard}: truncated or corrupt" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "model").exists()
    resume = ["train", "--model", str(tiny_diffusers), "--dataset", str(runs / "data" / "metadata.csv"), "--output",
              str(run), "--height", "32", "--width", "32", "--dtype", "float32", "--finetune", "full", "--trainable",
              "blocks.*.ffn.*", "--max_steps", "2", "--gradient_checkpointing", "false", "--resume"]
    assert main(resume) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"cannot resume from {checkpoint}: {shard}: truncated or corrupt" in error
    # whole shards, but progress.json says two processes wrote them: one rank's shards are missing
    shard.write_bytes(intact)
    progress = json.loads((checkpoint / "progress.json").read_text())
    (checkpoint / "progress.json").write_text(json.dumps({**progress, "processes": 2}))
    shutil.copy(checkpoint / "rng-rank0.pt", checkpoint / "rng-rank1.pt")
    assert main(["export", str(run), str(tmp_path / "model"), "--to", "diffusers"]) == 2
    assert f"says 2 process(es) wrote it" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("kind, misfit", [
    ("full", "blocks.0.ffn.0.weight: (384, 192) vs the model's (256, 192)"),
    ("lora", "blocks.0.ffn.0: LoRA (384, 8) @ (8, 192) vs layer (256, 192)"),
])
def test_export_onto_a_base_of_other_shapes_is_refused_writing_nothing(tiny_diffusers, runs, tmp_path, capsys, kind, misfit):
    base = _narrower_base(tiny_diffusers, tmp_path / "narrow")
    for fmt, out in (("diffusers", tmp_path / "model"), ("wan", tmp_path / "wan.safetensors")):
        assert main(["export", str(runs / kind), str(out), "--to", fmt, "--model", str(base)]) == 2
        err = capsys.readouterr().err
        assert "does not fit this model" in one_line_error(err) and misfit in err, err
        assert not out.exists() and not list(tmp_path.glob(".*"))
    if kind == "full":  # lora extract reads the run onto its --base through the same check
        assert main(["lora", "extract", str(tmp_path / "x.safetensors"), "--base", str(base), "--tuned",
                     str(runs / kind), "--rank", "2"]) == 2
        assert misfit in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


# -- trackers: set up before any model loads, and a failed write names the tracker's folder ----------------

@pytest.fixture()
def no_tracker_setup(tmp_path, monkeypatch) -> Path:
    """No W&B login or mode, no MLflow URI; an empty home (no netrc): a fresh machine. Returns the home."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    return home


def _train_with(tracker: str, tmp_path: Path) -> list[str]:
    return ["train", "--model", str(tmp_path / "no-model"), "--dataset", str(tmp_path / "x.csv"), "--output",
            str(tmp_path / "run"), "--log_with", tracker]


def test_wandb_without_a_login_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, no_tracker_setup):
    command = _train_with("wandb", tmp_path)  # no model there: the check comes first
    assert main(command) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "log_with wandb: not logged in to api.wandb.ai; run `wandb login`" in error and "WANDB_MODE=offline" in error
    netrc_file = no_tracker_setup / ".netrc"  # what `wandb login` writes
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert main(command) == 2 and "log_with wandb" not in capsys.readouterr().err  # past the tracker check: the model's turn
    netrc_file.unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(command) == 2 and "log_with wandb" not in capsys.readouterr().err


def test_mlflow_without_a_usable_store_is_one_line_naming_it(tmp_path, tmpfs, capsys, monkeypatch, no_tracker_setup):
    command = _train_with("mlflow", tmp_path)
    assert main(command) == 2
    assert "log_with mlflow: set MLFLOW_TRACKING_URI" in one_line_error(capsys.readouterr().err)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # mlflow-skinny: no database store
    assert main(command) == 2
    assert "has no database support: pip install mlflow" in one_line_error(capsys.readouterr().err)
    store = tmpfs(16 * PAGE, ",ro") / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    assert main(command) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"the MLflow store {store} (MLFLOW_TRACKING_URI) cannot be written" in error and "logs" not in error
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    assert main(command) == 2 and "log_with mlflow" not in capsys.readouterr().err


def test_a_full_disk_under_the_tensorboard_writer_is_one_line_naming_its_folder(tmp_path, tmpfs, capfd):
    from accelerate import Accelerator
    from chronoedit_lora.files import WriteError
    from chronoedit_lora.train.state.logs import TrainingLog
    from chronoedit_lora.train.state.trackers import end_trackers

    disk = tmpfs(32 * PAGE)
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(disk / "logs" / "tensorboard"))
    log = TrainingLog(accelerator, disk, 1000, 0, "full", "{}")
    fill(disk)
    with pytest.raises(WriteError) as raised:
        for step in range(1, 1000):  # TensorBoard writes on its own thread; the failure surfaces at a later write
            log.step(step, 1.0, 1e-4, None, 0.1, [0])
    # its events fill their page before metrics.csv's short rows fill theirs
    assert raised.value.filename == str(disk / "logs" / "tensorboard") and "No space left" in str(raised.value)
    with pytest.raises(WriteError) as raised:  # the last flush, at the end of training, says it again
        end_trackers(accelerator, disk)
    assert raised.value.filename == str(disk / "logs" / "tensorboard")
    assert "Traceback" not in capfd.readouterr().err  # not the writer thread's either


# -- eval: every model folder, run and output checked up front; one evaluation's files as a set -----------

def _eval_command(tmp_path: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["eval", "--model", str(model or tmp_path / "no-model"), "--height", "32", "--width", "32",
            "--dtype", "float32", "--device", "cpu", *extra]


def test_eval_refuses_a_model_folder_of_another_type_naming_the_flag(random_lora, tmp_path, capsys):
    from .tiny_metric_models import write_tiny_clip, write_tiny_dino

    clip, dino = write_tiny_clip(tmp_path / "clip"), write_tiny_dino(tmp_path / "dino")
    save_lora(random_lora, tmp_path / "a.safetensors")
    common = _eval_command(tmp_path, "--lora", str(tmp_path / "a.safetensors"), "--dataset", str(tmp_path / "x.csv"),
                           "--output", str(tmp_path / "out"))  # no model, no dataset: the folders are checked first
    for flag, folder, message in (("--dino", clip, "holds a 'clip' model, not a Dinov2Model model (dinov2)"),
                                  ("--clip", dino, "holds a 'dinov2' model, not a CLIPModel model (clip)"),
                                  ("--judge", clip, "holds a 'clip' model, not a Qwen2.5-VL or Qwen3-VL model")):
        assert main(common + [flag, str(folder)]) == 2
        assert f"{flag} {folder}: {message}" in one_line_error(capsys.readouterr().err)
    (dino / "preprocessor_config.json").unlink()  # the right model, but the kit cannot build its processor
    assert main(common + ["--dino", str(dino)]) == 2
    assert f"--dino {dino}: its AutoImageProcessor cannot be built" in one_line_error(capsys.readouterr().err)


def test_eval_refuses_a_full_run_with_the_command_that_works_and_an_output_inside_a_runs_files(runs, tmp_path, capsys):
    held_out = make_subset(tmp_path / "held", 1, start=8)
    assert main(_eval_command(tmp_path, "--run", str(runs / "full"), "--dataset", str(held_out))) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "is a full fine-tune" in error and f"lora extract RUN.safetensors --base MODEL --tuned {runs / 'full'}" in error
    logs = runs / "lora" / "logs" / "metrics.csv"
    before = logs.read_bytes()
    for inside in (runs / "lora" / "logs", runs / "lora" / "checkpoints" / "step-000001" / "x"):
        assert main(_eval_command(tmp_path, "--run", str(runs / "lora"), "--dataset", str(held_out), "--output",
                                  str(inside))) == 2
        assert f"is inside the training run {runs / 'lora'}'s own files" in one_line_error(capsys.readouterr().err)
    assert logs.read_bytes() == before


def test_eval_warns_when_held_out_rows_are_training_rows_by_file(runs, tmp_path, capsys):
    import csv as csv_module

    rows = list(csv_module.DictReader((runs / "data" / "metadata.csv").open()))
    (tmp_path / "held").mkdir()
    with (tmp_path / "held" / "metadata.csv").open("w", newline="") as f:  # the same files, spelled from elsewhere
        writer = csv_module.DictWriter(f, ["input_image", "edited_image", "prompt"])
        writer.writeheader()
        writer.writerows({**row, "input_image": f"../runs/{row['input_image']}",
                          "edited_image": f"../runs/{row['edited_image']}"} for row in rows[1:])
    (tmp_path / "runs").symlink_to(runs / "data")
    main(_eval_command(tmp_path, "--run", str(runs / "lora"), "--dataset", str(tmp_path / "held" / "metadata.csv"),
                       "--allow-outside"))  # then stops at the missing model, after the warning
    out = capsys.readouterr().out
    assert f"warning: 1 of the 1 held-out rows of {tmp_path / 'held' / 'metadata.csv'} are training rows" in out
    assert "row(s) 2;" in out


def test_one_evaluations_outputs_are_a_set(tiny_diffusers, random_lora, tmp_path, capsys):
    held_out = make_subset(tmp_path / "held", 1, start=8)
    save_lora(random_lora, tmp_path / "a.safetensors")
    out = tmp_path / "out"
    command = _eval_command(tmp_path, "--lora", str(tmp_path / "a.safetensors"), "--dataset", str(held_out), "--output",
                            str(out), "--steps", "1", "--scheduler", "euler", model=tiny_diffusers)
    assert main(command) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "metrics.csv", "metrics.png"]
    assert main(command + ["--loss-only"]) == 0  # no edits: no grid, and the first one's is not left beside it
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.png"]


# -- 3. numbers that would silently produce garbage ------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--shift", "nan"], "--shift must be a finite number, got nan"),
    (["--shift", "-1"], "--shift must be > 0 and <= 100"),
    (["--cfg", "inf"], "--cfg must be a finite number"),
    (["--seed", str(2**64)], f"--seed must be >= 0 and <= {2**64 - 1:g}, got {2**64}"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--lora", "x.safetensors:nan"], "scale must be a finite number"),
])
def test_edit_numbers_are_checked_where_they_enter(image_file_factory, tmp_path, capsys, flags, message):
    assert main(["edit", "--image", str(image_file_factory()), "--prompt", "x", "--output", str(tmp_path / "o.png"),
                 *flags]) == 2
    assert message in one_line_error(capsys.readouterr().err)


@pytest.fixture()
def image_file_factory(input_image, tmp_path):
    def make() -> Path:
        input_image.save(tmp_path / "in.png")
        return tmp_path / "in.png"
    return make


@pytest.mark.parametrize("change, message", [
    ({"flow_shift": float("nan")}, "flow_shift must be a finite number, got nan"),
    ({"flow_shift": -2.0}, "flow_shift must be > 0"),
    ({"num_train_timesteps": 10**12}, "num_train_timesteps must be >= 1 and <= 100000"),
    ({"solver_order": "two"}, "solver_order must be a number"),
])
def test_a_scheduler_config_follows_the_flags_rules(tiny_diffusers, input_image, tmp_path, capsys, change, message):
    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers, model, symlinks=True)
    config_path = model / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    input_image.save(tmp_path / "in.png")
    assert main(["edit", "--model", str(model), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--output", str(tmp_path / "o.png"), *FAST]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"{config_path}: {message}" in error
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("toml, message", [
    ("shift = nan", "shift must be a finite number, got nan"),
    ("learning_rate = inf", "learning_rate must be a finite number"),
    (f"seed = {2**32}", "seed must be >= 0 and <= 4.29497e+09"),
])
def test_training_numbers_are_checked_in_files_as_in_flags(tmp_path, capsys, toml, message):
    (tmp_path / "c.toml").write_text(toml + "\n")
    assert main(["train", "--config", str(tmp_path / "c.toml")]) == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_a_schedule_unipc_cannot_step_is_refused_before_loading(tiny_diffusers, input_image, tmp_path, capsys):
    input_image.save(tmp_path / "in.png")
    command = ["edit", "--model", str(tiny_diffusers), "--image", str(tmp_path / "in.png"), "--prompt", "x",
               "--output", str(tmp_path / "o.png"), "--steps", "500"]
    assert main(command) == 2
    assert "--steps 500 at flow shift 5: UniPC's schedule repeats timesteps" in one_line_error(capsys.readouterr().err)
    dataset = make_subset(tmp_path / "data", 1)
    with pytest.raises(ChronoEditError, match="sample_steps 300 at flow shift 5: UniPC's schedule repeats timesteps"):
        train(tiny_config(tiny_diffusers, dataset, tmp_path / "run", sample_every=1, sample_steps=300))


def test_a_batch_seed_out_of_range_is_a_row_problem(input_image, tmp_path, capsys):
    folder = tmp_path / "b"
    folder.mkdir()
    input_image.save(folder / "in.png")
    (folder / "edits.csv").write_text(f"image,prompt,output,seed\nin.png,a,o.png,{2**64}\nin.png,b,p.png,-5\n")
    assert main(["edit", "--batch", str(folder / "edits.csv"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "row 2: seed must be >= 0" in err and "row 3: seed must be >= 0" in err and "Traceback" not in err


def test_an_edit_that_overflows_writes_nothing(tiny_diffusers, random_lora, input_image, tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    save_lora(random_lora, lora)
    input_image.save(tmp_path / "in.png")
    out = tmp_path / "o.png"
    assert main(["edit", "--model", str(tiny_diffusers), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--output", str(out), "--video", str(tmp_path / "o.mp4"), "--lora", f"{lora}:1e30", *FAST]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "produced NaN or inf" in error and "nothing was written" in error
    assert not out.exists() and not (tmp_path / "o.mp4").exists()


# -- 5. frame folders -------------------------------------------------------------------------------

def _frames(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(folder / name)


def test_frame_folders_must_be_numbered_and_stay_inside(tmp_path):
    root = tmp_path / "ds"
    _frames(root / "words", ["first.png", "middle.png", "last.png"])
    _frames(root / "mixed", ["f01.png", "f02.png", "g03.png", "end.png"])
    _frames(root / "good", ["frame_2.png", "frame_10.png", "frame_1.png"])
    _frames(tmp_path / "elsewhere", ["00.png"])
    _frames(root / "linked", ["01.png", "02.png"])
    (root / "linked" / "00.png").symlink_to(tmp_path / "elsewhere" / "00.png")
    (root / "metadata.csv").write_text("trajectory,prompt\nwords,a\nmixed,b\ngood,c\nlinked,d\n")
    problems = check_dataset(root / "metadata.csv", 32, 32)
    by_row = {p.row: p.reason for p in problems if p.fatal}
    assert "3 frame(s) not named by their number: first.png, last.png, middle.png" in by_row[2]
    assert "2 frame(s) not named by their number: end.png, g03.png" in by_row[3]
    assert 4 not in by_row  # one prefix, numbers last: natural order 1, 2, 10
    assert f"00.png -> {tmp_path / 'elsewhere' / '00.png'}" in by_row[5] and "outside the dataset folder" in by_row[5]
    assert not [p for p in check_dataset(root / "metadata.csv", 32, 32, allow_outside=True) if p.fatal and p.row == 5]


# -- 6. batch edits ---------------------------------------------------------------------------------

def test_batch_outputs_that_are_one_file_are_reported_before_any_work(input_image, tmp_path, capsys):
    folder = tmp_path / "b"
    (folder / "out" / "x").mkdir(parents=True)
    (folder / "alias").symlink_to(folder / "out")
    input_image.save(folder / "in.png")
    (folder / "edits.csv").write_text("image,prompt,output\nin.png,a,out/a.png\nin.png,b,out/x/../a.png\n"
                                      "in.png,c,alias/a.png\nin.png,d,out/b.png\n")
    assert main(["edit", "--batch", str(folder / "edits.csv"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "row 3: output out/x/../a.png is the file row 2 writes" in err
    assert "row 4: output alias/a.png is the file row 2 writes" in err and "row 5" not in err


def test_a_batch_csv_that_is_not_utf8_gets_row_messages(input_image, tmp_path, capsys):
    folder = tmp_path / "b"
    folder.mkdir()
    input_image.save(folder / "in.png")
    (folder / "edits.csv").write_bytes("image,prompt,output\nin.png,caf\xe9 au lait,o.png\nin.png,ok,p.png\n"
                                       .encode("cp1252"))
    assert main(["edit", "--batch", str(folder / "edits.csv"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "row 2: prompt holds bytes that are not UTF-8; save the CSV as UTF-8" in err and "row 3" not in err
    assert "Traceback" not in err


# -- 7. bounded memory on any input ------------------------------------------------------------------

def _peak_rss_of(command: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    script = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
              "print(r.stdout); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
              "sys.stderr.write(r.stderr); sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True)
    return result, int(result.stdout.strip().splitlines()[-1]) * 1024


def test_a_multi_gb_one_line_csv_is_refused_in_bounded_memory(tmp_path):
    """A 3 GB file (sparse: one header, then one line of 3 GB) costs a line's cap, not 3 GB; measured
    peak RSS of the whole `dataset check` process: 977 MiB, as on the example dataset (976 MiB, mostly torch)."""
    csv_path = tmp_path / "metadata.csv"
    with csv_path.open("wb") as f:
        f.write(b"input_image,edited_image,prompt\n")
        f.truncate(3 * 2**30)
    result, peak = _peak_rss_of([sys.executable, "-m", "chronoedit_lora.cli", "dataset", "check", str(csv_path)])
    assert result.returncode == 1 and "row 2" in result.stdout and "longer than 1024 KiB" in result.stdout
    print(f"peak RSS: {peak / 2**20:.0f} MiB")
    assert peak < 1.5 * 2**30


@pytest.mark.parametrize("name", ["config.toml", "scheduler_config.json", "x.safetensors.index.json"])
def test_oversized_configs_and_json_are_refused_before_being_read(tiny_diffusers, tmp_path, capsys, name):
    big = tmp_path / name
    with big.open("wb") as f:
        f.write(b'{"a": 1}' if name.endswith("json") else b"seed = 1\n")
        f.truncate(2 * 2**30)
    if name == "config.toml":
        code = main(["train", "--config", str(big)])
    elif name == "scheduler_config.json":
        model = tmp_path / "model"
        shutil.copytree(tiny_diffusers, model, symlinks=True)
        shutil.move(big, model / "scheduler" / "scheduler_config.json")
        code = main(["edit", "--model", str(model), "--image", "x.png", "--prompt", "x", "--output", str(tmp_path / "o.png")])
    else:
        code = main(["lora", "merge", "--dit", str(big), "--lora", str(big), "--output", str(tmp_path / "m")])
    assert code == 2
    assert "is larger than" in one_line_error(capsys.readouterr().err)


# -- 8. the model card --------------------------------------------------------------------------------

def test_prompt_markup_stays_inside_the_model_cards_quote(tmp_path):
    import html
    import re

    import markdown

    from chronoedit_lora.train.state.model_card import render_model_card

    hostile = ("---\nbase_model: evil/model\n---\n<script>alert(1)</script> [click](http://x.example) **bold**\n"
               "# Heading\n| a | b |\n|---|---|\n~~strike~~ - item")
    config = tiny_config(tmp_path, tmp_path / "m.csv", tmp_path / "run <img src=x onerror=alert(1)>")
    card = render_model_card(config, 10, 3, hostile, None)
    benign = render_model_card(config, 10, 3, "a plain prompt", None)
    front = lambda text: text.split("---\n")[1]  # noqa: E731
    assert front(card) == front(benign) and "base_model: nvidia/ChronoEdit-14B-Diffusers" in front(card)
    rendered = markdown.markdown(card.split("---\n", 2)[2], extensions=["tables"])
    quote = re.search(r"<blockquote>(.*?)</blockquote>", rendered, re.S).group(1)
    shown = [html.unescape(re.sub(r"<[^>]+>", "", p)).strip() for p in re.findall(r"<p>(.*?)</p>", quote, re.S)]
    assert shown == [line for line in hostile.splitlines()]  # line for line, as written
    assert "<script>" not in rendered and 'href="http://x.example"' not in rendered and "<h1>Heading" not in rendered
    assert rendered.count("<table>") == 1  # the card's own training table only
    assert "run &lt;img src&#61;x onerror&#61;alert(1)&gt;" in rendered and "<img" not in rendered


# -- 9. plugins ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("plugin, message", [
    ("raising", "failed on pair before/000.png -> after/000.png: RuntimeError: CUDA out of memory"),
    ("blank", "returned an empty or blank text on pair before/000.png -> after/000.png"),
    ("exiting", "failed on pair before/000.png -> after/000.png: SystemExit: 0"),
    ("interrupted", "failed on pair before/000.png -> after/000.png: KeyboardInterrupt: (no message)"),
    ("huge", "returned text that is 3515 KiB, over a CSV line's 1024 KiB on pair before/000.png -> after/000.png"),
    ("nul", "returned text that holds a NUL byte on pair before/000.png -> after/000.png"),
    ("escape", "returned text that holds the control character U+001B on pair before/000.png -> after/000.png"),
])
def test_a_failing_captioner_names_itself_and_the_pair_and_writes_no_csv(tmp_path, capsys, monkeypatch, plugin, message):
    source = tmp_path / "pairs"
    for side in ("before", "after"):
        (source / side).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(source / side / "000.png")
    monkeypatch.syspath_prepend(str(ROOT))
    assert main(["dataset", "prepare", str(source), "--captioner", f"tests.faulty_plugins:{plugin}"]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"--captioner tests.faulty_plugins:{plugin} {message}" in error
    assert not (source / "metadata.csv").exists()
    monkeypatch.setenv("CHRONOEDIT_LORA_DEBUG", "1")  # the traceback, when asked for
    if plugin == "raising":
        with pytest.raises(ChronoEditError) as raised:
            main(["dataset", "prepare", str(source), "--captioner", f"tests.faulty_plugins:{plugin}"])
        assert isinstance(raised.value.__cause__, RuntimeError)


def test_a_prompt_a_plugin_could_not_return_is_refused_in_a_csv_too(tmp_path):
    for image in ("a.png", "b.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / image)
    (tmp_path / "metadata.csv").write_text("input_image,edited_image,prompt\na.png,b.png,make it red\n"
                                           "a.png,b.png,make it \x1b[31mred\na.png,b.png,make it\0 blue\n")
    _, problems = read_metadata(tmp_path / "metadata.csv")
    assert [(p.row, p.reason) for p in problems if p.fatal] == [
        (3, "The prompt holds the control character U+001B."), (4, "The prompt holds a NUL byte.")]


def test_a_failing_prompt_enhancer_writes_no_image(input_image, tmp_path, capsys, monkeypatch):
    input_image.save(tmp_path / "in.png")
    monkeypatch.syspath_prepend(str(ROOT))
    assert main(["edit", "--image", str(tmp_path / "in.png"), "--prompt", "x", "--output", str(tmp_path / "o.png"),
                 "--prompt-enhancer", "tests.faulty_plugins:blank_enhancer", *FAST]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"returned an empty or blank text on {tmp_path / 'in.png'}" in error
    assert not (tmp_path / "o.png").exists()


# -- 10. file modes ---------------------------------------------------------------------------------------

def test_every_written_file_honours_the_umask(tiny_diffusers, random_lora, input_image, tmp_path):
    previous = os.umask(0o027)
    try:
        assert main(["make-tiny", str(tmp_path / "tiny")]) == 0
        save_lora(random_lora, tmp_path / "lora.safetensors")
        assert main(["lora", "merge", "--model", str(tiny_diffusers), "--lora", str(tmp_path / "lora.safetensors"),
                     "--output", str(tmp_path / "merged")]) == 0
        dataset = make_subset(tmp_path / "data", 1)
        train(tiny_config(tiny_diffusers, dataset, tmp_path / "run", max_steps=1, save_every=1, cache=True))
        input_image.save(tmp_path / "in.png")
        assert main(["edit", "--model", str(tiny_diffusers), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                     "--output", str(tmp_path / "out" / "e.png"), "--video", str(tmp_path / "out" / "e.mp4"), *FAST]) == 0
    finally:
        os.umask(previous)
    written = [p for folder in ("tiny", "merged", "run", "out") for p in [tmp_path / folder, *(tmp_path / folder).rglob("*")]
               if not p.is_symlink() and p.name != "data"]
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written
             if p.stat().st_mode & 0o777 != (0o750 if p.is_dir() else 0o640)}
    assert len(written) > 40 and wrong == {}


# -- 11. smaller ------------------------------------------------------------------------------------------

def test_lora_info_refuses_an_adapter_of_another_model(tmp_path, capsys):
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 16),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(16, 4)},
              str(tmp_path / "llm.safetensors"))
    assert main(["lora", "info", str(tmp_path / "llm.safetensors")]) == 2
    assert "is not a ChronoEdit/Wan LoRA: none of its 1 layer(s) is a layer of the DiT" in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [("num_attention_heads", 7), ("rope_temporal_skip_len", -3)])
def test_an_impossible_model_config_names_its_file_and_key(tiny_diffusers, input_image, tmp_path, capsys, key, value):
    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers, model, symlinks=True)
    config_path = model / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), key: value}))
    input_image.save(tmp_path / "in.png")
    assert main(["edit", "--model", str(model), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--output", str(tmp_path / "o.png"), *FAST]) == 2
    assert f"{config_path}: {key} {value} is impossible for this DiT" in one_line_error(capsys.readouterr().err)


def test_video_errors_name_the_video_flag(input_image, tmp_path, capsys):
    input_image.save(tmp_path / "in.png")
    assert main(["edit", "--image", str(tmp_path / "in.png"), "--prompt", "x", "--output", str(tmp_path / "o.png"),
                 "--video", str(tmp_path / "clip.gif")]) == 2
    assert f"--video {tmp_path / 'clip.gif'}: expected a .mp4 file name" in capsys.readouterr().err


def test_a_fifo_given_as_a_dataset_is_not_a_regular_file(tmp_path, capsys):
    os.mkfifo(tmp_path / "metadata.csv")
    assert main(["dataset", "check", str(tmp_path / "metadata.csv")]) == 2
    assert "is not a regular file but a FIFO (named pipe)" in capsys.readouterr().err
    pairs, problems = read_metadata(tmp_path / "metadata.csv")
    assert pairs == [] and "is not a regular file but a FIFO" in problems[0].reason
    assert main(["edit", "--batch", str(tmp_path / "metadata.csv")]) == 2
    assert "is not a regular file but a FIFO" in capsys.readouterr().err


def test_a_non_finite_loss_in_a_cached_run_mentions_the_cache(tiny_diffusers, tmp_path):
    dataset = make_subset(tmp_path / "data", 1)
    with pytest.raises(ChronoEditError, match=r"(?s)loss is not finite.*conditioning cache .*delete it"):
        train(tiny_config(tiny_diffusers, dataset, tmp_path / "run", cache=True, max_steps=2, learning_rate=1e30,
                          max_grad_norm=0))
