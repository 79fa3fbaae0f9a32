"""`dataset prepare`: metadata.csv from folders of pairs, with prompts from files, flags or a plugin."""

from __future__ import annotations

import shutil
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from chronoedit_lora.cli import main
from chronoedit_lora.data import has_fatal, read_metadata

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "example_dataset"


def _two_folders(tmp_path: Path) -> Path:
    source = tmp_path / "pairs"
    shutil.copytree(EXAMPLE / "before", source / "before")
    shutil.copytree(EXAMPLE / "after", source / "after")
    return source


def test_folders_template_and_txt_precedence(tmp_path, capsys):
    source = _two_folders(tmp_path)
    (source / "after" / "003.png").unlink()
    (source / "before" / "001.txt").write_text("The user wants a charcoal drawing.\n")
    assert main(["dataset", "prepare", str(source), "--prompt-template",
                 "The user wants to transform {name} into {style} style.", "--style", "pencil sketch"]) == 0
    out = capsys.readouterr().out
    assert "11 pairs (before/ + after/)" in out and "unmatched: before/003.png (no edited image)" in out
    pairs, problems = read_metadata(source / "metadata.csv")
    assert not has_fatal(problems) and len(pairs) == 11
    by_name = {p.input_image.name: p.prompt for p in pairs}
    assert by_name["001.png"] == "The user wants a charcoal drawing."
    assert by_name["000.png"] == "The user wants to transform 000 into pencil sketch style."
    assert main(["dataset", "prepare", str(source), "--prompt", "x"]) == 2  # no silent overwrite
    assert main(["dataset", "prepare", str(source), "--prompt", "x", "--overwrite"]) == 0


def test_suffix_pairs_with_a_captioner_plugin(tmp_path, monkeypatch, capsys):
    source = tmp_path / "flat"
    source.mkdir()
    for i in range(3):
        shutil.copy(EXAMPLE / "before" / f"{i:03d}.png", source / f"pic{i}_before.png")
        shutil.copy(EXAMPLE / "after" / f"{i:03d}.png", source / f"pic{i}_after.png")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out_csv = tmp_path / "elsewhere" / "metadata.csv"
    assert main(["dataset", "prepare", str(source), "--output", str(out_csv), "--captioner", "captioner_plugin:caption"]) == 0
    assert "allow_outside" in capsys.readouterr().out  # the CSV is not next to the pairs
    pairs, problems = read_metadata(out_csv, allow_outside=True)
    assert not has_fatal(problems) and len(pairs) == 3
    assert all(p.prompt.startswith("The user wants an edit that removes the colour") for p in pairs)


def test_two_frame_videos(tmp_path):
    source = tmp_path / "videos"
    source.mkdir()
    frames = [np.full((32, 32, 3), v, np.uint8) for v in (30, 200)]
    imageio.mimwrite(source / "clip.mp4", frames, fps=1, macro_block_size=1)
    assert main(["dataset", "prepare", str(source), "--prompt", "The user wants it brighter."]) == 0
    assert (source / "metadata.csv").read_text().splitlines()[0] == "video,prompt"
    pairs, problems = read_metadata(source / "metadata.csv")
    assert len(pairs) == 1 and pairs[0].is_video and not has_fatal(problems)


@pytest.mark.parametrize("spec, message", [("nomodule:f", "cannot import"), ("captioner_plugin:missing", "no attribute"),
                                           ("justaname", "expected MODULE:CALLABLE")])
def test_bad_captioner_spec(tmp_path, monkeypatch, capsys, spec, message):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    source = _two_folders(tmp_path)
    assert main(["dataset", "prepare", str(source), "--captioner", spec]) == 2
    assert message in capsys.readouterr().err


def test_no_pairs_and_no_prompt(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["dataset", "prepare", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    assert "no pairs or trajectories found" in capsys.readouterr().err
    source = _two_folders(tmp_path)
    assert main(["dataset", "prepare", str(source)]) == 2
    assert "no prompt for 12 row(s)" in capsys.readouterr().err


@pytest.mark.parametrize("template, extra, messages", [
    ("The user wants {name} in {stlye} style.", ["--style", "ink"],
     ["unknown placeholder {stlye} (did you mean {style}?)", "the placeholders are {style}, {name}"]),
    ("The user wants {name} in {style", ["--style", "ink"], ["the placeholders are {style}, {name}", "{{ or }}"]),
    ("The user wants {0}.", [], ["unknown placeholder {0}", "the placeholders are {style}, {name}"]),
    ("The user wants it in {style} style.", [], ["uses {style} but no style was given", "pass --style"]),
])
def test_bad_prompt_template_is_a_clear_error_and_writes_nothing(tmp_path, capsys, template, extra, messages):
    source = _two_folders(tmp_path)
    assert main(["dataset", "prepare", str(source), "--prompt-template", template, *extra]) == 2
    err = capsys.readouterr().err
    assert f"--prompt-template {template!r}" in err and "Traceback" not in err
    assert all(message in err for message in messages), err
    assert not (source / "metadata.csv").exists()


def test_template_with_only_name_needs_no_style(tmp_path):
    source = _two_folders(tmp_path)
    assert main(["dataset", "prepare", str(source), "--prompt-template", "The user wants {name} {{sharper}}."]) == 0
    pairs, _ = read_metadata(source / "metadata.csv")
    assert pairs[0].prompt == "The user wants 000 {sharper}."
