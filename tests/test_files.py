"""The one atomic write: the target appears whole or not at all, with the permissions of a normal file."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest
import torch

from chronoedit_lora.files import atomic_folder, atomic_path, save_image, write_text
from chronoedit_lora.lora import LoraModule, save_lora


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_get_the_mode_a_normal_write_gives(tmp_path, input_image, mask, expected):
    lora = {"blocks.0.self_attn.q": LoraModule(torch.ones(2, 4), torch.ones(4, 2), 2.0)}
    with umask(mask):
        write_text(tmp_path / "a.csv", "x\n")
        save_image(input_image, tmp_path / "a.png")
        save_lora(lora, tmp_path / "a.safetensors")
        with atomic_folder(tmp_path / "folder") as staging:
            (staging / "inside.json").write_text("{}")
    for name in ("a.csv", "a.png", "a.safetensors", "folder/inside.json"):
        assert mode(tmp_path / name) == expected, name
    assert mode(tmp_path / "folder") == 0o777 & ~mask  # what mkdir gives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.png", "a.safetensors", "folder"]  # no temp files


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_a_failed_folder_write_leaves_nothing_and_a_full_folder_is_refused(tmp_path):
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "model") as staging:
        (staging / "shard").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep").write_text("mine")
    with pytest.raises(FileExistsError), atomic_folder(tmp_path / "model"):
        pass
    assert (tmp_path / "model" / "keep").read_text() == "mine"
