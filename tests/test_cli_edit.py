"""`chronoedit-lora edit` and `make-tiny` as a user runs them, including bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from chronoedit_lora.cli import main

FAST = ["--steps", "2", "--height", "32", "--width", "32", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture()
def image_file(input_image, tmp_path):
    path = tmp_path / "in.png"
    input_image.save(path)
    return path


def test_edit_writes_png_and_video(tiny_diffusers, image_file, tmp_path, capsys):
    out, video = tmp_path / "out" / "edit.png", tmp_path / "out" / "clip.mp4"
    code = main(["edit", "--model", str(tiny_diffusers), "--image", str(image_file), "--prompt", "Make it night.",
                 "--output", str(out), "--video", str(video), *FAST])
    assert code == 0
    assert Image.open(out).size == (32, 32)
    frames = imageio.mimread(video)
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    assert str(out) in capsys.readouterr().out


def test_edit_with_per_component_overrides(tiny_diffusers, image_file, tmp_path):
    out = tmp_path / "edit.png"
    args = ["edit", "--dit", str(tiny_diffusers / "transformer"), "--text-encoder", str(tiny_diffusers / "text_encoder"),
            "--image-encoder", str(tiny_diffusers / "image_encoder"), "--vae", str(tiny_diffusers / "vae"),
            "--tokenizer", str(tiny_diffusers / "tokenizer"), "--image", str(image_file), "--prompt", "x",
            "--output", str(out), *FAST]
    assert main(args) == 0 and out.is_file()


@pytest.mark.parametrize("case, message", [
    ("missing_image", "image not found"),
    ("corrupt_image", "unreadable or truncated|not an image"),
    ("wrong_suffix", "expected a .png"),
    ("missing_model", "no such folder"),
    ("empty_model", "components not found"),
    ("no_cuda", "no CUDA GPU"),
])
def test_bad_input_is_one_clear_line(tiny_diffusers, image_file, tmp_path, capsys, case, message):
    args = {"model": str(tiny_diffusers), "image": str(image_file), "output": str(tmp_path / "o.png")}
    extra = []
    if case == "missing_image":
        args["image"] = str(tmp_path / "nope.png")
    elif case == "corrupt_image":
        bad = tmp_path / "bad.png"
        bad.write_bytes(image_file.read_bytes()[:60])
        args["image"] = str(bad)
    elif case == "wrong_suffix":
        args["output"] = str(tmp_path / "o.gif")
    elif case == "missing_model":
        args["model"] = str(tmp_path / "no-model")
    elif case == "empty_model":
        (tmp_path / "empty").mkdir()
        args["model"] = str(tmp_path / "empty")
    elif case == "no_cuda":
        extra = ["--device", "cuda"]
    argv = ["edit", "--prompt", "x"] + [f"--{k}={v}" for k, v in args.items()] + FAST + extra
    if case == "no_cuda":
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_unwritable_output_folder(tiny_diffusers, image_file, tmp_path, capsys):
    if os.geteuid() == 0:
        target = "/proc/chronoedit-test/out.png"  # not creatable even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "out.png")
    assert main(["edit", "--model", str(tiny_diffusers), "--image", str(image_file), "--prompt", "x",
                 "--output", target, *FAST]) == 2
    err = capsys.readouterr().err
    assert f"--output {target}" in err and ("cannot be created" in err or "not writable" in err)


def test_make_tiny_command_and_console_script(tmp_path):
    target = tmp_path / "tiny-wan"
    result = subprocess.run([sys.executable, "-m", "chronoedit_lora.cli", "make-tiny", str(target), "--layout", "wan"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (target / "Wan2.1_VAE.pth").is_file() and "wan layout" in result.stdout
    again = subprocess.run([sys.executable, "-m", "chronoedit_lora.cli", "make-tiny", str(target)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_sequence_parallel_without_its_hardware_is_refused(tiny_diffusers, image_file, tmp_path, capsys):
    from chronoedit_lora.parallel import missing_for_sequence_parallel

    missing = missing_for_sequence_parallel()
    if not missing:
        pytest.skip("this machine can run sequence parallelism")
    assert main(["edit", "--model", str(tiny_diffusers), "--image", str(image_file), "--prompt", "x",
                 "--output", str(tmp_path / "o.png"), "--sequence-parallel", *FAST]) == 2
    err = capsys.readouterr().err
    assert "--sequence-parallel needs" in err and missing[0] in err


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 50) (default" not in text and "(default: None)" not in text and "(default: False)" not in text
    assert "denoising steps, 1 to 1000 (default 50)" in text and "(a batch row's seed column wins) (default: 0)" in text


def test_model_pointing_at_a_component_folder_suggests_its_parent(tiny_diffusers, image_file, tmp_path, capsys):
    code = main(["edit", "--model", str(tiny_diffusers / "transformer"), "--image", str(image_file), "--prompt", "x",
                 "--output", str(tmp_path / "o.png"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and f"looks like the transformer/ folder of a model: pass its parent, --model {tiny_diffusers}" in err
    assert f"--dit {tiny_diffusers / 'transformer'}" in err


def test_scheduler_guidance_and_tiling_flags(tiny_diffusers, image_file, tmp_path):
    outputs = {}
    for name, flags in {"default": [], "same": ["--scheduler", "unipc", "--guidance", "separate", "--vae-tiling", "on"],
                        "euler": ["--scheduler", "euler"]}.items():
        outputs[name] = tmp_path / f"{name}.png"
        assert main(["edit", "--model", str(tiny_diffusers), "--image", str(image_file), "--prompt", "x", "--cfg", "3",
                     "--output", str(outputs[name]), *FAST, *flags]) == 0
    default, same, euler = (np.asarray(Image.open(outputs[n]), dtype=int) for n in ("default", "same", "euler"))
    assert np.abs(default - same).max() <= 1  # unipc is the default; a 32x32 frame is one VAE tile
    assert np.abs(default - euler).max() > 1


@pytest.mark.parametrize("config, message", [
    ("{not json", "is not valid JSON .*delete it to sample with --scheduler euler"),
    ('{"_class_name": "DDIMScheduler"}', "names 'DDIMScheduler', which the kit does not sample with; pass --scheduler"),
    ('{"_class_name": "UniPCMultistepScheduler", "prediction_type": "epsilon"}',
     "ChronoEdit needs flow_prediction with flow sigmas. Fix the config or pass --scheduler euler"),
])
def test_bad_scheduler_config_is_one_line_before_loading(image_file, tmp_path, capsys, config, message):
    model = tmp_path / "model"
    (model / "scheduler").mkdir(parents=True)
    (model / "scheduler" / "scheduler_config.json").write_text(config)
    assert main(["edit", "--model", str(model), "--image", str(image_file), "--prompt", "x",
                 "--output", str(tmp_path / "o.png"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "components not found" not in err
    assert re.search(message, err), err


def test_sequence_parallel_refusal_is_the_same_with_the_context_cache(tiny_diffusers, image_file, tmp_path, capsys):
    """The context cache stays on under --sequence-parallel (exact per rank, tests/test_context_cache.py):
    it adds no refusal of its own, while a step cache is refused by name before the hardware is checked."""
    edit = ["edit", "--model", str(tiny_diffusers), "--image", str(image_file), "--prompt", "x",
            "--output", str(tmp_path / "o.png"), "--sequence-parallel", *FAST]
    refusals = []
    for extra in ((), ("--no-context-cache",), ("--step-cache", "first-block")):
        assert main(edit + list(extra)) == 2
        refusals.append(capsys.readouterr().err.strip())
    assert refusals[0] == refusals[1] and len(refusals[0].splitlines()) == 1
    assert "--step-cache cannot be combined with --sequence-parallel" in refusals[2]
    assert not (tmp_path / "o.png").exists()
