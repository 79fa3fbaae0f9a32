"""The dataset check remembers what it learnt about each file, and forgets it when the file changes."""

from __future__ import annotations

import pytest

import chronoedit_lora.data.checked_files as checked_files
from chronoedit_lora.data import check_dataset
from chronoedit_lora.data.checked_files import CheckedFiles

from .test_train import make_subset


def test_a_rerun_decodes_nothing_and_reports_the_same(tmp_path, monkeypatch):
    dataset = make_subset(tmp_path / "data", 3)
    memo = tmp_path / "cache" / "checked.json"
    first = CheckedFiles(memo)
    problems = check_dataset(dataset, max_pixels=64 * 64, checked=first)
    assert (first.hits, first.misses) == (0, 6)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a remembered file was decoded again")

    monkeypatch.setattr(checked_files, "read_image", no_decoding)
    second = CheckedFiles(memo)
    assert check_dataset(dataset, max_pixels=64 * 64, checked=second) == problems
    assert (second.hits, second.misses) == (6, 0)


def test_a_changed_file_is_checked_again(tmp_path):
    dataset = make_subset(tmp_path / "data", 2)
    memo = tmp_path / "checked.json"
    assert not [p for p in check_dataset(dataset, checked=CheckedFiles(memo)) if p.fatal]
    edited = next((tmp_path / "data" / "after").iterdir())
    edited.write_bytes(edited.read_bytes()[:200])  # truncated: another size, another verdict
    again = CheckedFiles(memo)
    fatal = [p for p in check_dataset(dataset, checked=again) if p.fatal]
    assert again.misses == 1 and len(fatal) == 1 and edited.name in fatal[0].reason


def test_an_unusable_cache_only_means_checking_again(tmp_path):
    dataset = make_subset(tmp_path / "data", 1)
    (tmp_path / "file").write_text("not a folder")
    memo = CheckedFiles(tmp_path / "file" / "checked.json")  # cannot be created
    assert not [p for p in check_dataset(dataset, checked=memo) if p.fatal] and memo.misses == 2
    (tmp_path / "broken.json").write_text("{not json")
    assert CheckedFiles(tmp_path / "broken.json").entries == {}


@pytest.mark.parametrize("variable", ["CHRONOEDIT_LORA_CACHE", "XDG_CACHE_HOME"])
def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch, variable):
    monkeypatch.delenv("CHRONOEDIT_LORA_CACHE", raising=False)
    monkeypatch.setenv(variable, str(tmp_path))
    expected = tmp_path if variable == "CHRONOEDIT_LORA_CACHE" else tmp_path / "chronoedit-lora"
    assert checked_files.cache_folder() == expected
