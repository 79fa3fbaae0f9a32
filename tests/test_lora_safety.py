"""LoRA safety: NaN/inf LoRAs are refused by edit, merge and convert (and flagged by info) with the
layers named; a bad ``--lora PATH:SCALE`` says what is wrong; convert never overwrites unasked and
checks its output folder first; a converted file's header describes the new file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from chronoedit_lora.cli import main
from chronoedit_lora.errors import CheckpointError
from chronoedit_lora.lora import LoraModule, check_finite, load_lora, non_finite_layers, parse_lora_spec, save_lora
from chronoedit_lora.lora.formats import format_state
from chronoedit_lora.models.loading import read_header

BAD_LAYERS = ["blocks.0.ffn.0", "blocks.1.cross_attn.v", "blocks.1.self_attn.o"]
TRAINED_HEADER = {"format": "chronoedit-lora", "base_model": "ChronoEdit", "rank": "4", "alpha": "8.0", "step": "10"}


def _damaged(weights):
    """A copy of ``weights`` with NaN in a down, inf in an up and a NaN alpha (one layer each)."""
    bad = {name: LoraModule(lora.down.clone(), lora.up.clone(), lora.alpha) for name, lora in weights.items()}
    bad[BAD_LAYERS[0]].down[0, 0] = float("nan")
    bad[BAD_LAYERS[1]].up[-1, -1] = float("-inf")
    bad[BAD_LAYERS[2]].alpha = float("nan")
    return bad


@pytest.fixture
def nan_lora(random_lora, tmp_path):
    return save_lora(_damaged(random_lora), tmp_path / "nan.safetensors")


def test_non_finite_layers_names_down_up_and_alpha(random_lora):
    assert non_finite_layers(random_lora) == []
    check_finite(random_lora)  # a clean LoRA passes
    assert non_finite_layers(_damaged(random_lora)) == BAD_LAYERS


def test_non_finite_layers_survive_saving_in_every_format(random_lora, tmp_path):
    for fmt in ("comfyui", "musubi"):  # formats that keep alpha, so the NaN alpha is in the file too
        path = save_lora(_damaged(random_lora), tmp_path / f"{fmt}.safetensors", fmt=fmt)
        assert non_finite_layers(load_lora(path)[0]) == BAD_LAYERS


def test_check_finite_lists_at_most_ten_layers_and_names_the_file(random_lora):
    weights = {name: LoraModule(lora.down * float("inf"), lora.up, lora.alpha) for name, lora in random_lora.items()}
    with pytest.raises(CheckpointError) as error:
        check_finite(weights, "x.safetensors")
    message = str(error.value)
    assert message.startswith("x.safetensors: 20 layer(s) with NaN or inf weights: blocks.0.cross_attn.k")
    assert message.count("blocks.") == 10 and " …" in message


def test_info_prints_a_nan_lora_with_a_warning(nan_lora, capsys):
    assert main(["lora", "info", str(nan_lora)]) == 0
    out = capsys.readouterr().out
    assert f"file: {nan_lora}" in out and "layers: 20 in 2 blocks" in out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING:"))
    assert "3 layer(s) with NaN or inf weights: " + ", ".join(BAD_LAYERS) in warning


def test_convert_refuses_a_nan_lora_and_writes_nothing(nan_lora, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert main(["lora", "convert", str(nan_lora), str(out), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert str(nan_lora) in err and ", ".join(BAD_LAYERS) in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_merge_refuses_a_nan_lora_before_writing(tiny_diffusers, random_lora, nan_lora, tmp_path, capsys):
    from chronoedit_lora.lora.merge import merge_model

    good = save_lora(random_lora, tmp_path / "good.safetensors")
    out = tmp_path / "merged"
    assert main(["lora", "merge", "--model", str(tiny_diffusers), "--lora", str(good), "--lora", f"{nan_lora}:0.5",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(nan_lora) in err and BAD_LAYERS[0] in err
    assert not out.exists()
    with pytest.raises(CheckpointError, match="blocks.1.cross_attn.v"):
        merge_model(tiny_diffusers, None, [(good, 1.0), (nan_lora, 1.0)], out)
    assert not out.exists()


@pytest.mark.parametrize("unfused", [False, True])
def test_edit_refuses_a_nan_lora_before_writing(tiny_diffusers, nan_lora, input_image, tmp_path, capsys, unfused):
    input_image.save(tmp_path / "in.png")
    output = tmp_path / "o.png"
    code = main(["edit", "--model", str(tiny_diffusers), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--output", str(output), "--lora", str(nan_lora), "--steps", "1", "--height", "32", "--width", "32",
                 "--dtype", "float32", "--device", "cpu"] + (["--unfused"] if unfused else []))
    assert code == 2
    err = capsys.readouterr().err
    assert str(nan_lora) in err and "NaN or inf" in err and ", ".join(BAD_LAYERS) in err
    assert not output.exists()


def test_pipeline_load_lora_refuses_a_nan_lora_and_leaves_the_dit_untouched(tiny_diffusers, nan_lora):
    from chronoedit_lora.pipeline import ChronoEditPipeline

    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    for fuse in (True, False):
        with pytest.raises(CheckpointError, match="blocks.0.ffn.0"):
            pipe.load_lora(nan_lora, fuse=fuse)
    after = pipe.dit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(module._forward_hooks for module in pipe.dit.modules())


def test_lora_spec_with_a_bad_scale_says_so(random_lora, tmp_path):
    path = save_lora(random_lora, tmp_path / "l.safetensors")
    assert parse_lora_spec(f"{path}:0.5") == (path, 0.5)
    assert parse_lora_spec(str(path)) == (path, 1.0)
    for scale in ("abc", "", "1,5"):
        with pytest.raises(CheckpointError) as error:
            parse_lora_spec(f"{path}:{scale}")
        assert f"the scale {scale!r} is not a number" in str(error.value) and "PATH[:SCALE]" in str(error.value)
        assert "not found" not in str(error.value)
    for scale in ("nan", "inf"):
        with pytest.raises(CheckpointError, match="finite number"):
            parse_lora_spec(f"{path}:{scale}")
    with pytest.raises(CheckpointError, match="file not found"):
        parse_lora_spec(f"{tmp_path / 'missing.safetensors'}:abc")
    colon = save_lora(random_lora, tmp_path / "style:v2.safetensors")  # a ':' in the name itself
    assert parse_lora_spec(str(colon)) == (colon, 1.0)


@pytest.mark.parametrize("command", ["edit", "merge"])
def test_cli_bad_scale_is_one_line_and_exit_2(random_lora, tmp_path, capsys, command):
    path = save_lora(random_lora, tmp_path / "l.safetensors")
    argv = (["edit", "--image", "in.png", "--prompt", "x", "--output", str(tmp_path / "o.png")] if command == "edit"
            else ["lora", "merge", "--dit", str(tmp_path / "dit"), "--output", str(tmp_path / "out")])
    assert main(argv + ["--lora", f"{path}:abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the scale 'abc' is not a number; expected PATH[:SCALE]" in err
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "out").exists()


def test_convert_does_not_overwrite_unless_asked(random_lora, tmp_path, capsys):
    source = save_lora(random_lora, tmp_path / "a.safetensors")
    target = tmp_path / "b.safetensors"
    target.write_bytes(b"precious")
    assert main(["lora", "convert", str(source), str(target), "--to", "musubi"]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "--overwrite" in err
    assert target.read_bytes() == b"precious"
    assert main(["lora", "convert", str(source), str(target), "--to", "musubi", "--overwrite"]) == 0
    assert load_lora(target)[1]["detected_format"] == "musubi"
    assert main(["lora", "convert", str(source), str(tmp_path), "--to", "wan", "--overwrite"]) == 2  # a folder
    assert "is a folder" in capsys.readouterr().err


def test_convert_checks_the_output_folder_before_reading_the_input(tmp_path, capsys, monkeypatch):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")  # reading it would fail with another message
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["lora", "convert", str(junk), str(blocker / "sub" / "out.safetensors"), "--to", "wan"]) == 2
    err = capsys.readouterr().err
    assert "cannot be created" in err and str(blocker / "sub") in err and "junk" not in err
    assert main(["lora", "convert", str(junk), str(tmp_path / "out.txt"), "--to", "wan"]) == 2
    assert "expected a .safetensors file name" in capsys.readouterr().err
    monkeypatch.setattr("chronoedit_lora.files.os.access", lambda path, mode: False)  # root can write anywhere
    assert main(["lora", "convert", str(junk), str(tmp_path / "ro" / "out.safetensors"), "--to", "wan"]) == 2
    err = capsys.readouterr().err
    assert f"its folder {tmp_path / 'ro'} is not writable" in err and "junk" not in err
    assert not (tmp_path / "ro" / "out.safetensors").exists()


def test_converted_header_describes_the_new_file(random_lora, dit, tmp_path, capsys):
    source = save_lora(random_lora, tmp_path / "trained.safetensors", TRAINED_HEADER)
    for fmt, alpha in (("diffusers", "4.0"), ("musubi", "8.0")):  # diffusers folds alpha / rank into B
        target = tmp_path / f"{fmt}.safetensors"
        assert main(["lora", "convert", str(source), str(target), "--to", fmt]) == 0
        header = read_header(target)[1]
        assert header["format"] == fmt and header["alpha"] == alpha
        assert header["converted_from"] == "trained.safetensors (comfyui)"
        assert {k: header[k] for k in ("base_model", "rank", "step")} == {"base_model": "ChronoEdit", "rank": "4", "step": "10"}
        capsys.readouterr()
        assert main(["lora", "info", str(target)]) == 0
        out = capsys.readouterr().out
        assert f"format: {fmt}\n" in out and "chronoedit-lora" not in out and f"  alpha: {alpha}\n" in out
    head = dict(random_lora)  # a layer outside the blocks: comfyui folds its alpha, so alphas differ
    modules = dict(dit.named_modules())
    head["head.head"] = LoraModule(torch.zeros(4, modules["head.head"].in_features),
                                   torch.zeros(modules["head.head"].out_features, 4), 8.0)
    mixed = save_lora(head, tmp_path / "mixed.safetensors", TRAINED_HEADER, fmt="musubi")
    assert main(["lora", "convert", str(mixed), str(tmp_path / "c.safetensors"), "--to", "comfyui"]) == 0
    header = read_header(tmp_path / "c.safetensors")[1]
    assert "alpha" not in header and header["format"] == "comfyui"


def test_info_format_comes_from_the_keys_not_the_header(random_lora, tmp_path, capsys):
    state, _ = format_state(random_lora, "comfyui")
    save_file(state, str(tmp_path / "x.safetensors"),
              metadata={"format": "diffusers", "detected_format": "musubi", "lora_adapter_metadata": json.dumps({})})
    assert main(["lora", "info", str(tmp_path / "x.safetensors")]) == 0
    assert "\nformat: comfyui\n" in capsys.readouterr().out


def test_lora_help_names_every_action(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lora", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    assert all(f"`lora {action}`" in out for action in ("info", "convert", "merge"))
    with pytest.raises(SystemExit):
        main(["--help"])
    lora_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("lora "))
    assert "merge" in lora_line
