"""A full disk never costs more than the steps since the last checkpoint (real tiny tmpfs mounts)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.train.state.checkpoint import latest_checkpoint, load_progress
from chronoedit_lora.train.loop.trainer import train

from .test_train import make_subset, tiny_config


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MiB tmpfs: room for one tiny checkpoint, not two."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_too_little_space_is_refused_before_loading(tmp_path, small_disk):
    dataset = make_subset(tmp_path / "data", 1)
    config = tiny_config(tmp_path / "model-not-needed", dataset, small_disk / "run", max_steps=1)
    with pytest.raises(ChronoEditError, match=r"only 2 MiB free .* at least 1024 MiB"):
        train(config)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_diffusers, tmp_path, small_disk):
    dataset = make_subset(tmp_path / "data", 2)
    output = small_disk / "run"
    config = tiny_config(tiny_diffusers, dataset, output, max_steps=6, save_every=2, min_free_mb=0, keep_checkpoints=3)
    with pytest.raises(ChronoEditError, match=r"could not write the step-\d+ checkpoint .* is intact.*--resume"):
        train(config)
    kept = latest_checkpoint(output)
    assert kept is not None and load_progress(kept).step >= 2
    assert not list((output / "checkpoints").glob(".*partial"))  # the broken write was cleaned up
    # Move to a bigger disk and resume: the run completes from the kept checkpoint.
    moved = tmp_path / "moved"
    shutil.copytree(output, moved)
    result = train(tiny_config(tiny_diffusers, dataset, moved, max_steps=6, save_every=2, min_free_mb=0, resume=True))
    assert result.steps == 6 and Path(result.lora).is_file()
