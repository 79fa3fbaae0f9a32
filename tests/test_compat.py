"""The original release's commands (scripts/run_inference_diffusers.py, train_diffsynth.py,
run_inference_diffsynth.py): each, run on the tiny model, writes the same bytes as the kit command it
prints; what has no equivalent is refused by name; missing model files are named with where to put them."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from chronoedit_lora.cli import main as kit_main
from chronoedit_lora.compat import diffsynth_inference, diffsynth_train, diffusers_inference
from chronoedit_lora.compat.common import PRINTED
from chronoedit_lora.models.components import WAN_FILES

from .test_data_images import write_video

WAN_I2V = Path("models/Wan-AI/Wan2.1-I2V-14B-720P")
README_MODEL_IDS = ",".join(f"Wan-AI/Wan2.1-I2V-14B-720P:{WAN_FILES[key][0]}"
                            for key in ("text_encoder", "vae", "image_encoder"))


def printed_command(out: str) -> list[str]:
    """The kit argv of the command a compat script printed (without env assignments and launcher)."""
    words = shlex.split(out.split(PRINTED, 1)[1].strip().splitlines()[0])
    return words[words.index("chronoedit-lora") + 1:]


def run_both(compat_main, argv: list[str], outputs: list[Path], capsys) -> dict[Path, Path]:
    """Run a compat script, set its outputs aside, run the printed kit command; {kit output: compat output}."""
    assert compat_main(argv) == 0
    kit_argv = printed_command(capsys.readouterr().out)
    aside = {path: path.with_name(path.name + ".compat") for path in outputs}
    for path, moved in aside.items():
        path.rename(moved)
    assert kit_main(kit_argv) == 0
    return aside


@pytest.fixture()
def original_layout(tiny_diffusers, tiny_wan, tmp_path, monkeypatch, input_image) -> Path:
    """A working folder as the original README leaves it: checkpoints/ChronoEdit-14B-Diffusers, the Wan
    encoders and umT5 tokenizer where DiffSynth downloads them, and the input image (cwd = this folder)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ChronoEdit-14B-Diffusers").symlink_to(tiny_diffusers)
    (tmp_path / WAN_I2V).mkdir(parents=True)
    for key in ("text_encoder", "vae", "image_encoder"):
        (tmp_path / WAN_I2V / WAN_FILES[key][0]).symlink_to(tiny_wan / WAN_FILES[key][0])
    (tmp_path / "models/Wan-AI/Wan2.1-T2V-1.3B").mkdir(parents=True)
    (tmp_path / "models/Wan-AI/Wan2.1-T2V-1.3B/google").symlink_to(tiny_wan / "google")
    (tmp_path / "assets/images").mkdir(parents=True)
    input_image.convert("RGB").resize((48, 32)).save(tmp_path / "assets/images/input.jpg")
    return tmp_path


def test_diffusers_inference_writes_what_the_printed_command_writes(original_layout, capsys):
    argv = ["--input", "assets/images/input.jpg", "--prompt", "Add a hat.", "--output", "out/edit.mp4",
            "--model-path", "checkpoints/ChronoEdit-14B-Diffusers", "--device", "cpu", "--offload_model",
            "--num-inference-steps", "2", "--guidance-scale", "3.0", "--flow-shift", "2.0", "--seed", "7",
            "--width", "48", "--height", "32"]
    aside = run_both(diffusers_inference.main, argv, [Path("out/edit.mp4"), Path("out/edit.png")], capsys)
    for kit, compat in aside.items():  # the clip, and its last frame beside it as .png
        assert kit.read_bytes() == compat.read_bytes()


def test_diffsynth_inference_as_written_writes_what_the_printed_command_writes(original_layout, capsys):
    # the original script takes no flags; the tiny run only lowers its size and steps
    argv = ["--device", "cpu", "--height", "32", "--width", "48", "--num_inference_steps", "1", "--cfg_scale", "1.0"]
    aside = run_both(diffsynth_inference.main, argv, [Path("output.mp4"), Path("output.png")], capsys)
    for kit, compat in aside.items():
        assert kit.read_bytes() == compat.read_bytes()
    command = diffsynth_inference.translate([])  # as written: the original's values and files
    assert shlex.join(command.argv).endswith(
        "--device cuda --height 720 --width 1280 --steps 50 --cfg 5.0 --seed 0 --scheduler euler --shift 5.0 "
        "--vae-tiling off --temporal-reasoning-steps 0")
    assert f"--text-encoder {WAN_I2V / WAN_FILES['text_encoder'][0]}" in shlex.join(command.argv)


def test_diffsynth_inference_under_torchrun_splits_the_edit(original_layout, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    command = diffsynth_inference.translate([])
    assert command.argv[-1] == "--sequence-parallel"
    assert command.shell().startswith("torchrun --nproc_per_node 2 scripts/infer.py --model ")
    assert diffsynth_inference.main(["--device", "cpu"]) == 2  # the kit's refusal: no CUDA/NCCL/xfuser here
    assert "--sequence-parallel needs CUDA GPUs" in capsys.readouterr().err


def test_train_diffsynth_readme_command_writes_what_the_printed_command_writes(original_layout, capsys):
    """The original README's command, --num_frames 5 on 2-frame clips included (it fails on DiffSynth)."""
    (original_layout / "data/example_dataset/videos").mkdir(parents=True)
    write_video(original_layout / "data/example_dataset/videos/0.mp4", [(200, 40, 30), (20, 200, 90)], (48, 32))
    (original_layout / "data/example_dataset/metadata.csv").write_text(
        "video,prompt\nvideos/0.mp4,The user wants to recolour the whole picture.\n")
    shards = sorted(str(p) for p in Path("checkpoints/ChronoEdit-14B-Diffusers/transformer").glob("*.safetensors"))
    argv = ["--dataset_base_path", "data/example_dataset", "--dataset_metadata_path", "data/example_dataset/metadata.csv",
            "--height", "32", "--width", "48", "--num_frames", "5", "--dataset_repeat", "1",
            "--model_paths", json.dumps([shards]), "--model_id_with_origin_paths", README_MODEL_IDS,
            "--learning_rate", "1e-4", "--num_epochs", "1", "--remove_prefix_in_ckpt", "pipe.dit.",
            "--output_path", "./models/train/ChronoEdit-14B_lora", "--lora_base_model", "dit",
            "--lora_target_modules", "q,k,v,o,ffn.0,ffn.2", "--lora_rank", "4", "--extra_inputs", "input_image",
            "--use_gradient_checkpointing_offload"]
    output = Path("models/train/ChronoEdit-14B_lora")
    compat = run_both(diffsynth_train.main, argv, [output], capsys)[output]
    # safetensors writes header metadata in a random order (a Rust HashMap), so the LoRA is compared as
    # bitwise-equal tensors and equal metadata; the checkpoint's files byte for byte
    with safe_open(output / "lora.safetensors", "pt") as kit, safe_open(compat / "lora.safetensors", "pt") as ours:
        assert kit.metadata() == ours.metadata() and sorted(kit.keys()) == sorted(ours.keys())
        assert all(torch.equal(kit.get_tensor(key), ours.get_tensor(key)) for key in kit.keys())
        assert json.loads(kit.metadata()["config"])["rank"] == 4
    checkpoint = Path("checkpoints/step-000001")
    for name in ("optimizer.pt", "rng-rank0.pt", "progress.json"):
        assert (output / checkpoint / name).read_bytes() == (compat / checkpoint / name).read_bytes()


@pytest.mark.parametrize("flags, refused", [
    (["--trainable_models", "dit"], "--trainable_models has no equivalent"),
    (["--lora_base_model", "dit", "--lora_checkpoint", "x.safetensors"], "--lora_checkpoint has no equivalent"),
    (["--lora_base_model", "dit", "--extra_inputs", "input_image,end_image"], "--extra_inputs input_image,end_image"),
    (["--lora_base_model", "dit", "--max_timestep_boundary", "0.5"], "timestep_boundary has no equivalent"),
])
def test_train_flags_without_equivalent_are_refused_by_name(original_layout, flags, refused, capsys):
    argv = ["--dataset_base_path", "d", "--dataset_metadata_path", "d/metadata.csv", *flags]
    assert diffsynth_train.main(argv) == 2
    assert refused in capsys.readouterr().err


def test_missing_model_files_say_where_to_put_them(original_layout, capsys):
    (original_layout / WAN_I2V / "Wan2.1_VAE.pth").unlink()
    (original_layout / "d").mkdir()
    argv = ["--dataset_base_path", "d", "--dataset_metadata_path", "d/metadata.csv", "--lora_base_model", "dit",
            "--model_id_with_origin_paths", README_MODEL_IDS]
    assert diffsynth_train.main(argv) == 2
    error = capsys.readouterr().err
    # DiffSynth 1.x redirected the VAE download to Wan2.1-T2V-1.3B: both places are named
    assert f"Put the file at {WAN_I2V}/Wan2.1_VAE.pth or models/Wan-AI/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth" in error
    assert f"hf download Wan-AI/Wan2.1-I2V-14B-720P Wan2.1_VAE.pth --local-dir {WAN_I2V}" in error
    argv = ["--input", "assets/images/input.jpg", "--prompt", "x", "--model-path", "nvidia/ChronoEdit-14B-Diffusers"]
    assert diffusers_inference.main(argv) == 2
    assert "hf download nvidia/ChronoEdit-14B-Diffusers --local-dir checkpoints/ChronoEdit-14B-Diffusers" in \
        capsys.readouterr().err


def test_diffusers_flags_translate_to_the_kit_flags(original_layout):
    model = "checkpoints/ChronoEdit-14B-Diffusers"
    command = diffusers_inference.translate(
        ["-i", "in.png", "-p", "x", "-o", "res.png", "--model-path", model, "--enable-temporal-reasoning",
         "--num-inference-steps", "8", "--lora-path", "a.safetensors", "b.safetensors", "--lora-scale", "0.5"])
    argv = shlex.join(command.argv)
    assert "--output res.png" in argv and "--video" not in argv  # a .png --output: the image only
    assert "--temporal-reasoning-steps 8" in argv  # reasoning for all 8 steps (the original's default, 50, capped)
    assert "--lora a.safetensors:0.5 --lora b.safetensors:0.5" in argv
    with pytest.raises(Exception, match="--num-temporal-reasoning-steps 0 with --enable-temporal-reasoning"):
        diffusers_inference.translate(["-i", "in.png", "-p", "x", "--model-path", model,
                                       "--enable-temporal-reasoning", "--num-temporal-reasoning-steps", "0"])
