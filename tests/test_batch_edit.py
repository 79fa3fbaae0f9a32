"""Batch edits: validated up front, resumable, split across torchrun processes; presets."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chronoedit_lora.cli import main
from chronoedit_lora.commands.edit import sampling_settings

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--height", "32", "--width", "32", "--dtype", "float32", "--device", "cpu"]


def write_batch(folder: Path, input_image, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    input_image.save(folder / "in.png")
    with (folder / "edits.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt", "output", "seed"])
        for i in range(count):
            writer.writerow(["in.png", f"The user wants edit number {i}.", f"out/{i}.png", str(i)])
    return folder / "edits.csv"


def test_batch_writes_every_output_and_resumes(tiny_diffusers, input_image, tmp_path, capsys):
    edits = write_batch(tmp_path / "b", input_image)
    assert main(["edit", "--model", str(tiny_diffusers), "--batch", str(edits), *FAST]) == 0
    outputs = sorted((tmp_path / "b" / "out").glob("*.png"))
    assert [p.name for p in outputs] == ["0.png", "1.png", "2.png", "3.png"]
    assert outputs[0].read_bytes() != outputs[1].read_bytes()  # per-row seeds
    outputs[2].unlink()
    assert main(["edit", "--model", str(tiny_diffusers), "--batch", str(edits), *FAST]) == 0
    assert "3 already done, 1 to do" in capsys.readouterr().out
    assert (tmp_path / "b" / "out" / "2.png").is_file()


def test_rank_share_does_not_depend_on_what_other_ranks_already_wrote(tiny_diffusers, input_image, tmp_path,
                                                                      monkeypatch):
    """Rank 1 may write out/1.png before rank 0 looks: rank 0 must still do rows 0 and 2, not re-split."""
    edits = write_batch(tmp_path / "b", input_image)
    (tmp_path / "b" / "out").mkdir()
    (tmp_path / "b" / "out" / "1.png").write_bytes(b"written by rank 1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["edit", "--model", str(tiny_diffusers), "--batch", str(edits), *FAST]) == 0
    assert sorted(p.name for p in (tmp_path / "b" / "out").glob("*.png")) == ["0.png", "1.png", "2.png"]


def test_batch_problems_are_all_reported_before_loading(input_image, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    input_image.save(folder / "in.png")
    (folder / "edits.csv").write_text("image,prompt,output,seed\nin.png,a,o.png,1\nmissing.png,b,p.png,2\n"
                                      "in.png,,q.png,x\nin.png,c,o.png,3\n")
    assert main(["edit", "--model", str(tmp_path / "no-model"), "--batch", str(folder / "edits.csv"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "row 3: image 'missing.png' not found" in err
    assert "row 4: empty prompt" in err and "row 4: seed 'x'" in err
    assert "row 5: output o.png is the file row 2 writes" in err


def test_batch_paths_outside_the_csv_folder_are_refused_before_anything_is_read(input_image, tmp_path, capsys):
    """image/output leading out of the CSV's folder (../, absolute, a symlink to outside) are row
    problems, all reported at once; nothing outside is read or created. A link that stays inside is
    fine, and --allow-outside lifts the rule."""
    folder, elsewhere = tmp_path / "b", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    input_image.save(folder / "in.png")
    input_image.save(elsewhere / "secret.png")
    (folder / "link_out.png").symlink_to(elsewhere / "secret.png")
    (folder / "dir_out").symlink_to(elsewhere, target_is_directory=True)
    (folder / "sub").mkdir()
    (folder / "link_in.png").symlink_to(Path("sub") / ".." / "in.png")
    rows = [("in.png", "../made/o.png"),               # row 2: output escapes (its folder would be created)
            ("../elsewhere/secret.png", "o3.png"),    # row 3: image escapes
            ("link_out.png", "o4.png"),               # row 4: image is a link to outside
            ("in.png", "dir_out/o5.png"),             # row 5: output goes through a link to outside
            ("in.png", str(elsewhere / "o6.png")),    # row 6: absolute output
            ("link_in.png", "sub/o7.png")]            # row 7: fine
    (folder / "edits.csv").write_text("image,prompt,output\n" + "".join(f"{i},p,{o}\n" for i, o in rows))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["edit", "--model", str(tmp_path / "no-model"), "--batch", str(folder / "edits.csv"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "5 problem(s)" in err
    real = folder.resolve()
    assert f"row 2: output '../made/o.png' leads to {tmp_path.resolve() / 'made' / 'o.png'}, outside the CSV's folder {real}" in err
    assert "row 3: image '../elsewhere/secret.png' leads to" in err
    assert f"row 4: image 'link_out.png' leads to {(elsewhere / 'secret.png').resolve()}, outside" in err
    assert f"row 5: output 'dir_out/o5.png' leads to {elsewhere.resolve() / 'o5.png'}, outside" in err
    assert f"row 6: output '{elsewhere / 'o6.png'}' is an absolute path, outside" in err
    assert err.count("or pass --allow-outside") == 5 and "row 7" not in err
    assert "not found" not in err  # outside files are not even looked at
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created, here or outside

    from chronoedit_lora.batch import read_batch

    jobs = read_batch(folder / "edits.csv", 0, allow_outside=True)
    assert [job.row for job in jobs] == [2, 3, 4, 5, 6, 7]
    assert main(["edit", "--model", str(tmp_path / "no-model"), "--batch", str(folder / "edits.csv"),
                 "--allow-outside", *FAST]) == 2  # got past the rows, to the (missing) model
    assert "problem(s)" not in capsys.readouterr().err


def test_distill_preset_and_explicit_flags():
    def settings(**kw):
        base = {"preset": None, "steps": None, "cfg": None, "shift": None}
        return sampling_settings(argparse.Namespace(**{**base, **kw}))

    assert settings() == {"steps": 50, "cfg": 5.0, "shift": None}  # None: the model's scheduler config, else 5.0
    assert settings(preset="distill") == {"steps": 8, "cfg": 1.0, "shift": 2.0}
    assert settings(preset="distill", steps=4) == {"steps": 4, "cfg": 1.0, "shift": 2.0}


@pytest.mark.slow
def test_two_torchrun_processes_match_one(tiny_diffusers, input_image, tmp_path):
    single = write_batch(tmp_path / "single", input_image)
    double = write_batch(tmp_path / "double", input_image)
    # Both sides run one thread per process (torchrun's own default): another thread count may round a
    # pixel differently (measured: 1 of 255 on one pixel of 2 of the 4 edits).
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run([sys.executable, "-m", "chronoedit_lora.cli", "edit", "--model", str(tiny_diffusers),
                                "--batch", str(single), *FAST], capture_output=True, text=True, timeout=600, env=one_thread)
    assert reference.returncode == 0, reference.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(ROOT / "scripts/infer.py"), "--model", str(tiny_diffusers), "--batch", str(double), *FAST],
                            capture_output=True, text=True, timeout=600, env=one_thread)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "across 2 processes" in result.stdout
    for i in range(4):
        assert (tmp_path / "single" / "out" / f"{i}.png").read_bytes() == (tmp_path / "double" / "out" / f"{i}.png").read_bytes()


def test_plan_batch_splits_the_whole_list_before_skipping_finished_outputs(tmp_path, monkeypatch):
    from chronoedit_lora.batch import EditJob, plan_batch

    jobs = [EditJob(tmp_path / "in.png", "p", tmp_path / f"{i}.png", i, i + 2) for i in range(5)]
    (tmp_path / "1.png").write_bytes(b"done")  # rank 1's job, already written
    (tmp_path / "2.png").write_bytes(b"done")  # rank 0's job
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = plan_batch(jobs)
    assert [j.seed for j in plan.todo] == [0, 4] and plan.done == 2 and (plan.rank, plan.world) == (0, 2)
    assert [j.seed for j in plan_batch(jobs, split=False).todo] == [0, 3, 4]  # sequence parallel: all ranks, all jobs
    assert [j.seed for j in plan_batch(jobs, skip_existing=False).todo] == [0, 2, 4]
