"""LoRA key formats: every format round-trips to the same weight delta, diffusers loads ours, and a
LoRA that does not fit is refused with a list of what does not fit."""

from __future__ import annotations

import pytest
import torch

from chronoedit_lora.cli import main
from chronoedit_lora.errors import CheckpointError
from chronoedit_lora.lora import FORMATS, LoraMismatchError, LoraModule, check_lora_matches, load_lora, save_lora

from .lora_parity import PARITY_RTOL, diffusers_and_ours

DELTA_ATOL = 1e-6  # fp32 round trip; only the alpha folding multiplies


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_the_delta(random_lora, tmp_path, fmt):
    path = tmp_path / f"{fmt}.safetensors"
    save_lora(random_lora, path, fmt=fmt)
    loaded, metadata = load_lora(path)
    assert metadata["detected_format"] == fmt
    assert loaded.keys() == random_lora.keys()
    for name, lora in random_lora.items():
        assert (loaded[name].delta() - lora.delta()).abs().max().item() <= DELTA_ATOL


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers", "musubi"])
def test_diffusers_loads_our_files_with_the_same_effect(tiny_diffusers, random_lora, tmp_path, fmt):
    path = tmp_path / f"{fmt}.safetensors"
    save_lora(random_lora, path, fmt=fmt)
    expected, got, without = diffusers_and_ours(tiny_diffusers, path, seed=1)
    assert (got - without).abs().max() > 1e-2  # the LoRA matters
    assert (expected - got).abs().max().item() <= PARITY_RTOL * expected.abs().max().item()


def test_mismatched_lora_lists_what_does_not_fit(dit, random_lora):
    bad = dict(random_lora)
    bad["blocks.99.self_attn.q"] = random_lora["blocks.0.self_attn.q"]
    bad["blocks.0.ffn.0"] = LoraModule(torch.zeros(4, 7), torch.zeros(5, 4), 4.0)
    with pytest.raises(LoraMismatchError) as error:
        check_lora_matches(bad, dit, "my.safetensors")
    message = str(error.value)
    assert "my.safetensors" in message and "blocks.99.self_attn.q" in message
    assert "blocks.0.ffn.0: LoRA (5, 4) @ (4, 7)" in message


def test_edit_refuses_a_mismatched_lora(tiny_diffusers, random_lora, input_image, tmp_path, capsys):
    bad = {"blocks.5.self_attn.q": random_lora["blocks.0.self_attn.q"]}
    save_lora(bad, tmp_path / "bad.safetensors")
    input_image.save(tmp_path / "in.png")
    code = main(["edit", "--model", str(tiny_diffusers), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--output", str(tmp_path / "o.png"), "--lora", f"{tmp_path / 'bad.safetensors'}:0.5",
                 "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32"])
    assert code == 2
    assert "not in the model: blocks.5.self_attn.q" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_unknown_keys_and_damaged_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(tmp_path / "full.safetensors"))
    with pytest.raises(CheckpointError, match="unrecognised key"):
        load_lora(tmp_path / "full.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_lora(tmp_path / "cut.safetensors")


def test_info_and_convert_commands(random_lora, tmp_path, capsys):
    save_lora(random_lora, tmp_path / "a.safetensors", metadata={"rank": "4"})
    assert main(["lora", "convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--to", "diffusers"]) == 0
    assert main(["lora", "info", str(tmp_path / "b.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "format: diffusers" in out and "layers: 20 in 2 blocks" in out and "rank: 4 (20)" in out
    assert "targets: cross_attn.k, cross_attn.o" in out


def test_unfused_lora_matches_fused_and_rescales_without_reloading(tiny_diffusers, random_lora, input_image, tmp_path):
    from chronoedit_lora.pipeline import ChronoEditPipeline

    save_lora(random_lora, tmp_path / "l.safetensors")

    def edit(pipe):
        return pipe(input_image, "x", steps=2, cfg=1.0, seed=0, height=32, width=32, progress=False).video

    hooked = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    base = edit(hooked)
    adapter = hooked.load_lora(tmp_path / "l.safetensors", scale=1.0, fuse=False)
    unfused = {1.0: edit(hooked)}
    adapter.scale = 0.5
    unfused[0.5] = edit(hooked)
    adapter.remove()
    assert torch.equal(edit(hooked), base)  # removing restores the base model exactly
    for scale, got in unfused.items():
        fused = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
        fused.load_lora(tmp_path / "l.safetensors", scale=scale)
        expected = edit(fused)
        assert (got - base).abs().max() > 1e-2
        assert (got - expected).abs().max().item() <= 1e-4  # fp32: (W + dW) x vs W x + dW x
