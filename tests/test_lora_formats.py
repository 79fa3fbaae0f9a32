"""LoRA files: every format round-trips to the same weight delta; diffusers and DiffSynth load our
files with the effect we fuse; files written by diffusers/PEFT and DiffSynth load with the alpha those
tools apply; a LoRA that does not fit, or a file that is not a LoRA, is refused with a list of why."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from chronoedit_lora.cli import main
from chronoedit_lora.errors import CheckpointError
from chronoedit_lora.lora import (
    FORMATS, LoraMismatchError, LoraModule, UnfusedLora, check_lora_matches, detect_format, from_peft_parameters,
    fuse_lora, load_lora, save_lora,
)
from chronoedit_lora.lora.formats import format_state
from chronoedit_lora.lora.names import WAN_TO_DIFFUSERS, WAN_TO_DIFFUSERS_TOP, from_diffusers, from_musubi, to_diffusers, to_musubi
from chronoedit_lora.models.rope import chronoedit_model_fn

from .lora_parity import PARITY_RTOL, diffusers_and_ours

DELTA_ATOL = 1e-6  # fp32 deltas of ~0.1-scale factors; only alpha folding multiplies
WEIGHT_ATOL = 1e-6  # fp32 fused weights, two ways of adding the same delta
OUTPUT_ATOL = 1e-5  # fp32 DiT output, fused (W + dW) x vs hooked W x + dW x
TARGETS = ["q", "k", "v", "o", "ffn.0", "ffn.2"]  # the recipe's peft target list


@pytest.fixture(scope="module")
def mixed_lora(dit, random_lora):
    """random_lora with per-layer ranks/alphas and two layers outside the blocks."""
    g = torch.Generator().manual_seed(1)
    modules = dict(dit.named_modules())

    def layer(name, rank, alpha):
        m = modules[name]
        return LoraModule(torch.randn(rank, m.in_features, generator=g) * 0.1,
                          torch.randn(m.out_features, rank, generator=g) * 0.1, alpha)

    return {**random_lora, "blocks.0.cross_attn.k": layer("blocks.0.cross_attn.k", 2, 3.0),
            "blocks.1.ffn.2": layer("blocks.1.ffn.2", 6, 1.5), "head.head": layer("head.head", 4, 8.0),
            "time_projection.1": layer("time_projection.1", 4, 2.0)}


def _max_delta_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[n].delta() - b[n].delta()).abs().max().item() for n in a)


def _forward(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    context, clip = torch.randn(1, 512, 32, generator=g), torch.randn(1, 257, 1280, generator=g)
    with torch.no_grad():
        return chronoedit_model_fn(model, x, torch.tensor([500.0]), context=context, clip_feature=clip, y=y)


def _randomize_lora_parameters(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_names_match_diffsynths_converter_and_cover_every_linear(dit):
    from diffsynth.utils.state_dict_converters.wan_video_dit import WanVideoDiTFromDiffusers

    pairs = {f"blocks.1.{w}": f"blocks.1.{d}" for w, d in WAN_TO_DIFFUSERS.items()} | WAN_TO_DIFFUSERS_TOP
    converted = WanVideoDiTFromDiffusers({f"{d}.weight": torch.zeros(1) for d in pairs.values()})
    assert set(converted) == {f"{w}.weight" for w in pairs}
    linears = [n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * len(WAN_TO_DIFFUSERS) + len(WAN_TO_DIFFUSERS_TOP)
    for name in linears:
        assert from_diffusers(to_diffusers(name)) == name and from_musubi(to_musubi(name)) == name


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_the_delta(mixed_lora, tmp_path, fmt):
    path = save_lora(mixed_lora, tmp_path / f"{fmt}.safetensors", fmt=fmt)
    loaded, metadata = load_lora(path)
    assert metadata["detected_format"] == fmt and detect_format(load_file(str(path))) == fmt
    assert _max_delta_diff(loaded, mixed_lora) <= DELTA_ATOL
    for name, lora in mixed_lora.items():
        if fmt == "musubi" or (fmt in ("comfyui", "wan") and name.startswith("blocks.")):
            # alpha is carried: the factors come back bit for bit (what --resume relies on)
            assert loaded[name].alpha == lora.alpha
            assert torch.equal(loaded[name].down, lora.down) and torch.equal(loaded[name].up, lora.up)
        else:
            assert loaded[name].alpha == lora.rank  # folded into B


def test_key_names_per_format(random_lora):
    lora = {"blocks.0.ffn.0": random_lora["blocks.0.ffn.0"], "blocks.1.self_attn.o": random_lora["blocks.1.self_attn.o"]}
    assert set(format_state(lora, "comfyui")[0]) == {
        "diffusion_model.blocks.0.ffn.0.lora_A.weight", "diffusion_model.blocks.0.ffn.0.lora_B.weight",
        "diffusion_model.blocks.0.ffn.0.alpha", "diffusion_model.blocks.1.self_attn.o.lora_A.weight",
        "diffusion_model.blocks.1.self_attn.o.lora_B.weight", "diffusion_model.blocks.1.self_attn.o.alpha"}
    assert set(format_state(lora, "musubi")[0]) >= {"lora_unet_blocks_0_ffn_0.lora_down.weight", "lora_unet_blocks_0_ffn_0.alpha"}
    assert set(format_state(lora, "diffsynth")[0]) >= {"blocks.1.self_attn.o.lora_B.default.weight"}
    state, header = format_state(lora, "diffusers")
    assert set(state) == {"transformer.blocks.0.ffn.net.0.proj.lora_A.weight", "transformer.blocks.0.ffn.net.0.proj.lora_B.weight",
                          "transformer.blocks.1.attn1.to_out.0.lora_A.weight", "transformer.blocks.1.attn1.to_out.0.lora_B.weight"}
    config = json.loads(header["lora_adapter_metadata"])
    assert config["transformer.r"] == config["transformer.lora_alpha"] == 4 and config["transformer.rank_pattern"] == {}


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers", "musubi"])
def test_diffusers_loads_our_files_with_the_same_effect(tiny_diffusers, random_lora, mixed_lora, tmp_path, fmt):
    # diffusers' musubi converter needs the full q/k/v/o/ffn set in every block, with alpha: the kit's recipe
    lora = random_lora if fmt == "musubi" else mixed_lora
    path = save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt=fmt)
    expected, got, without = diffusers_and_ours(tiny_diffusers, path, seed=1)
    assert (got - without).abs().max() > 1e-2  # the LoRA matters
    assert (expected - got).abs().max().item() <= PARITY_RTOL * expected.abs().max().item()


@pytest.mark.filterwarnings("ignore:Alpha detected")  # DiffSynth notes that it applies .alpha keys
@pytest.mark.parametrize("fmt", ["comfyui", "wan", "diffsynth"])
def test_diffsynth_loads_our_files_as_we_fuse_them(dit, mixed_lora, tmp_path, fmt):
    from diffsynth.utils.lora.general import GeneralLoRALoader

    path = save_lora(mixed_lora, tmp_path / f"{fmt}.safetensors", fmt=fmt)
    ours, theirs = copy.deepcopy(dit), copy.deepcopy(dit)
    fuse_lora(ours, load_lora(path)[0])
    GeneralLoRALoader().fuse_lora_to_base_model(theirs, load_file(str(path)))
    a, b = ours.state_dict(), theirs.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_ATOL
    assert not torch.equal(a["head.head.weight"], dit.state_dict()["head.head.weight"])


@pytest.mark.parametrize("level, rslora", [("pipeline", False), ("model", False), ("pipeline", True)])
def test_peft_files_written_by_diffusers_load_with_peft_alpha(tiny_diffusers, tmp_path, level, rslora):
    from diffusers import ChronoEditPipeline as ReferencePipeline
    from diffusers import ChronoEditTransformer3DModel
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    transformer = ChronoEditTransformer3DModel.from_pretrained(tiny_diffusers / "transformer", torch_dtype=torch.float32)
    transformer.add_adapter(LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out"],
        rank_pattern={"blocks.1.ffn.net.2": 2}, alpha_pattern={"blocks.0.attn1.to_q": 3.0}, use_rslora=rslora))
    _randomize_lora_parameters(transformer, seed=2)
    expected = {from_diffusers(name): layer.get_delta_weight("default")
                for name, layer in transformer.named_modules() if isinstance(layer, LoraLayer)}
    if level == "model":  # unprefixed keys and header, as transformer.load_lora_adapter reads them
        transformer.save_lora_adapter(tmp_path)
    else:
        ReferencePipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    loaded, metadata = load_lora(next(tmp_path.glob("*.safetensors")))
    assert metadata["detected_format"] == "diffusers" and loaded.keys() == expected.keys() and len(loaded) == 21
    assert max((loaded[n].delta() - expected[n]).abs().max().item() for n in expected) <= DELTA_ATOL
    assert loaded["blocks.0.self_attn.q"].scale == pytest.approx(3.0 / (2.0 if rslora else 4.0))


def test_peft_file_without_header_means_alpha_equals_rank(random_lora, tmp_path):
    state = {f"transformer.{to_diffusers(m)}.lora_{p}.weight": t for m, l in random_lora.items()
             for p, t in (("A", l.down), ("B", l.up))}
    save_file(state, str(tmp_path / "peft.safetensors"))
    loaded, _ = load_lora(tmp_path / "peft.safetensors")
    assert all(l.alpha == 4.0 for l in loaded.values())
    assert torch.allclose(loaded["blocks.0.ffn.2"].delta(), random_lora["blocks.0.ffn.2"].delta() / 2, atol=DELTA_ATOL)


@pytest.mark.parametrize("fmt", ["comfyui", "wan"])
def test_lora_down_up_spelling_reads_the_same(random_lora, tmp_path, fmt):
    state, _ = format_state(random_lora, fmt)
    renamed = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "l.safetensors"))
    loaded, metadata = load_lora(tmp_path / "l.safetensors")
    assert metadata["detected_format"] == fmt and _max_delta_diff(loaded, random_lora) == 0.0


def test_diffsynth_training_export_loads_as_diffsynth_applies_it(dit, tmp_path):
    """DiffSynth's trainer (peft, targets q,k,v,o,ffn.0,ffn.2) saves `.default.` keys without alpha;
    DiffSynth then adds B @ A, and so do we. The trainer's in-memory peft model equals our fuse."""
    from diffsynth.diffusion.training_module import DiffusionTrainingModule
    from diffsynth.utils.lora.general import GeneralLoRALoader

    trainer = DiffusionTrainingModule()
    trainer.dit = trainer.add_lora_to_model(copy.deepcopy(dit).requires_grad_(False), TARGETS, lora_rank=4, lora_alpha=8)
    _randomize_lora_parameters(trainer.dit, seed=3)
    save_file(trainer.export_trainable_state_dict(trainer.state_dict(), remove_prefix="dit."), str(tmp_path / "ds.safetensors"))
    loaded, metadata = load_lora(tmp_path / "ds.safetensors")
    assert metadata["detected_format"] == "diffsynth" and len(loaded) == 20
    assert not any("_img" in name for name in loaded)  # "k"/"v" do not catch k_img/v_img
    assert all(l.alpha == l.rank == 4 for l in loaded.values())
    ours, theirs = copy.deepcopy(dit), copy.deepcopy(dit)
    fuse_lora(ours, loaded)
    GeneralLoRALoader().fuse_lora_to_base_model(theirs, load_file(str(tmp_path / "ds.safetensors")))
    a, b = ours.state_dict(), theirs.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_ATOL

    exported = from_peft_parameters(dict(trainer.dit.named_parameters()), alpha=8, rank=4)  # the kit's trainer export
    fused = copy.deepcopy(dit)
    fuse_lora(fused, exported)
    assert (_forward(fused) - _forward(trainer.dit)).abs().max().item() <= OUTPUT_ATOL


def test_unfused_hooks_match_fusing_and_leave_the_model_untouched(dit, mixed_lora):
    base = _forward(dit)
    for scale in (1.0, 0.5):
        fused = copy.deepcopy(dit)
        fuse_lora(fused, mixed_lora, scale)
        expected = _forward(fused)
        with UnfusedLora(dit, mixed_lora, scale) as adapter:
            got = _forward(dit)
            adapter.scale = 0.0
            assert torch.equal(_forward(dit), base)
        assert (got - base).abs().max() > 1e-2
        assert (got - expected).abs().max().item() <= OUTPUT_ATOL
    assert torch.equal(_forward(dit), base)  # hooks removed on exit; weights never changed


def test_mismatched_lora_lists_what_does_not_fit(dit, random_lora):
    bad = dict(random_lora)
    for block in range(10, 22):
        bad[f"blocks.{block}.self_attn.q"] = random_lora["blocks.0.self_attn.q"]
    bad["patch_embedding"] = random_lora["blocks.0.self_attn.q"]
    bad["blocks.0.ffn.0"] = LoraModule(torch.zeros(4, 7), torch.zeros(5, 4), 4.0)
    with pytest.raises(LoraMismatchError) as error:
        check_lora_matches(bad, dit, "my.safetensors")
    message = str(error.value)
    assert "my.safetensors" in message and "13 layer(s) not in the model" in message
    assert "blocks.19.self_attn.q …" in message and "blocks.20" not in message  # the count, then the first ten
    ffn = dict(dit.named_modules())["blocks.0.ffn.0"]
    assert f"1 shape mismatch(es): blocks.0.ffn.0: LoRA (5, 4) @ (4, 7) vs layer ({ffn.out_features}, {ffn.in_features})" in message
    before = copy.deepcopy(dit.state_dict())
    with pytest.raises(LoraMismatchError):
        fuse_lora(dit, bad)
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())  # nothing fused


def test_a_non_linear_layer_is_named_with_its_type(dit, random_lora):
    with pytest.raises(LoraMismatchError, match=r"patch_embedding \(Conv3d\)"):
        check_lora_matches({"patch_embedding": random_lora["blocks.0.self_attn.q"]}, dit)


def test_edit_refuses_a_mismatched_lora(tiny_diffusers, random_lora, input_image, tmp_path, capsys):
    bad = {"blocks.5.self_attn.q": random_lora["blocks.0.self_attn.q"]}
    save_lora(bad, tmp_path / "bad.safetensors")
    input_image.save(tmp_path / "in.png")
    code = main(["edit", "--model", str(tiny_diffusers), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--output", str(tmp_path / "o.png"), "--lora", f"{tmp_path / 'bad.safetensors'}:0.5",
                 "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32"])
    assert code == 2
    assert "not in the model (as a Linear): blocks.5.self_attn.q" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_files_that_are_not_loras_are_refused_with_what_is_wrong(random_lora, tmp_path):
    def refused(state, match, metadata=None):
        save_file(state, str(tmp_path / "x.safetensors"), metadata=metadata)
        with pytest.raises(CheckpointError, match=match) as error:
            load_lora(tmp_path / "x.safetensors")
        assert str(tmp_path / "x.safetensors") in str(error.value)

    refused({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, r"1 unrecognised key\(s\): blocks.0.self_attn.q.weight")
    comfy, _ = format_state(random_lora, "comfyui")
    refused({**comfy, "diffusion_model.blocks.0.norm3.diff_b": torch.zeros(64)}, r"unrecognised key\(s\): diffusion_model.blocks.0.norm3.diff_b")
    refused({k: v for k, v in comfy.items() if k != "diffusion_model.blocks.1.ffn.2.lora_B.weight"}, r"blocks.1.ffn.2: no B/up tensor")
    refused({"blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 64), "blocks.0.ffn.0.lora_B.weight": torch.zeros(128, 3)}, r"is not a linear-layer LoRA")
    diffusers, header = format_state(random_lora, "diffusers")
    refused(diffusers, "rank than header", {"lora_adapter_metadata": json.dumps({"transformer.r": 8, "transformer.lora_alpha": 8})})
    refused(diffusers, "DoRA", {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.use_dora": True})})


def test_damaged_files_name_the_file(random_lora, tmp_path):
    path = save_lora(random_lora, tmp_path / "l.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: truncated"):
        load_lora(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"junk.safetensors: corrupt"):
        load_lora(tmp_path / "junk.safetensors")


def test_save_is_atomic_and_keeps_metadata_as_strings(random_lora, tmp_path):
    path = tmp_path / "l.safetensors"
    shared = {"blocks.0.self_attn.q": random_lora["blocks.0.self_attn.q"], "blocks.0.self_attn.k": random_lora["blocks.0.self_attn.q"]}
    save_lora(shared, path, metadata={"rank": 4, "alpha": 8.0, "targets": TARGETS, "lora_adapter_metadata": "{stale}"})
    before = path.read_bytes()
    _, metadata = load_lora(path)
    assert metadata["rank"] == "4" and metadata["alpha"] == "8.0" and json.loads(metadata["targets"]) == TARGETS
    assert "lora_adapter_metadata" not in metadata  # a caller's stale PEFT config would mislead diffusers
    broken = {"blocks.0.ffn.0": LoraModule(torch.zeros(4, 64, device="meta"), torch.zeros(128, 4, device="meta"), 4.0)}
    with pytest.raises(NotImplementedError):  # meta tensors have no data to write
        save_lora(broken, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["l.safetensors"]


def test_info_and_convert_commands(random_lora, tmp_path, capsys):
    save_lora(random_lora, tmp_path / "a.safetensors", metadata={"rank": "4"})
    assert main(["lora", "convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--to", "diffusers"]) == 0
    assert main(["lora", "info", str(tmp_path / "b.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "format: diffusers" in out and "layers: 20 in 2 blocks" in out and "rank: 4 (20)" in out
    assert "targets: cross_attn.k, cross_attn.o" in out


def test_pipeline_unfused_lora_matches_fused_and_rescales_without_reloading(tiny_diffusers, random_lora, input_image, tmp_path):
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
        assert (got - expected).abs().max().item() <= 1e-4  # fp32 video in [-1, 1]: (W + dW) x vs W x + dW x
