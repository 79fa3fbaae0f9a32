"""DoRA, LoHa and LoKr (and LoRA) through peft: each trains on the tiny model and lowers the loss,
resumes exactly, is saved in ComfyUI's keys for its type (the file's delta, computed here by hand as
ComfyUI's loader reads the keys, equals the trained peft module's output), and edits, merges and
converts like a LoRA."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from safetensors.torch import load_file

from chronoedit_lora.cli import main
from chronoedit_lora.data import EditPairDataset
from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.lora import DoraModule, LokrModule, fuse_lora, load_lora, save_lora
from chronoedit_lora.lora.merge import merge_model
from chronoedit_lora.lora.weights import from_peft_parameters, to_peft_parameters
from chronoedit_lora.models.components import discover_components
from chronoedit_lora.models.dit import load_dit
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.train.objective.adapter_config import peft_config
from chronoedit_lora.train.loop.config import load_config
from chronoedit_lora.train.state.lora_export import load_into
from chronoedit_lora.train.objective.lora_module import LoraTrainingModule
from chronoedit_lora.train.objective.loss import validation_loss
from chronoedit_lora.train.loop.trainer import train

from .lora_parity import PARITY_RTOL, diffusers_and_ours
from .test_train import RESUME_ATOL, make_subset, tiny_config
from .test_train_processes import _max_diff

# rank 8 with alpha 4 (scale 1/2), so a lost or doubled alpha shows; the LoKr splits both factors
# (rank 2 is below half of the tiny DiT's Kronecker factors), the path that carries alpha. LoHa and
# LoKr learn slower from their start (at lr 1e-2, 4 steps: 1.51 -> 1.46 and 1.48), so they get 3e-2.
FASTER = {"learning_rate": "3e-2"}
ADAPTERS = {"lora": {}, "dora": {}, "loha": FASTER, "lokr": {"rank": 2, "lokr_decompose_both": True, **FASTER}}
STEPS = dict(max_steps=4, save_every=2, alpha=4, learning_rate="1e-2", max_grad_norm=0, seed=7)
# Measured on the tiny model (one pair, 4 steps): validation loss 1.506 -> lora 1.199, dora 1.194,
# loha 1.218, lokr 1.361; an adapter that does not learn stays at 1.506.
LEARNS_BY = 1.05
OUTPUT_ATOL = 1e-5  # fp32 layer output of the peft module vs the file's delta applied by hand
VIDEO_ATOL = 1e-4  # fp32 edit in [-1, 1]: (W + dW) x fused vs W x + dW x hooked


@pytest.fixture(scope="module")
def one_pair(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("one"), 1)


@pytest.fixture(scope="module", params=list(ADAPTERS))
def trained(request, tiny_diffusers, one_pair, tmp_path_factory):
    """(kind, config, straight run, resumed run): 4 steps straight, and 2 steps then --resume to 4."""
    kind, folder = request.param, tmp_path_factory.mktemp(request.param)
    settings = {**STEPS, "adapter": kind, **ADAPTERS[kind]}
    straight = train(tiny_config(tiny_diffusers, one_pair, folder / "straight", **settings))
    train(tiny_config(tiny_diffusers, one_pair, folder / "split", **{**settings, "max_steps": 2}))
    resumed = train(tiny_config(tiny_diffusers, one_pair, folder / "split", resume=True, **settings))
    return kind, tiny_config(tiny_diffusers, one_pair, folder / "straight", **settings), straight, resumed


def comfy_delta(state: dict[str, torch.Tensor], stem: str, weight: torch.Tensor) -> torch.Tensor:
    """One layer's weight change as ComfyUI's loader (comfy/weight_adapter) reads its keys, written
    out here independently of the kit. DoRA is normalised by the adapted weight's row norms
    (LyCORIS and peft; ComfyUI's output-axis branch uses the base weight's, an open bug there)."""
    alpha = state.get(f"{stem}.alpha")
    if f"{stem}.lora_A.weight" in state:
        down, up = state[f"{stem}.lora_A.weight"], state[f"{stem}.lora_B.weight"]
        delta = (alpha / down.shape[0] if alpha is not None else 1.0) * up @ down
        if f"{stem}.dora_scale" in state:
            adapted = weight + delta
            delta = state[f"{stem}.dora_scale"] / adapted.norm(dim=1, keepdim=True) * adapted - weight
        return delta
    if f"{stem}.hada_w1_a" in state:
        w1a, w1b, w2a, w2b = (state[f"{stem}.hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
        return (alpha / w1b.shape[0] if alpha is not None else 1.0) * (w1a @ w1b) * (w2a @ w2b)
    factors, rank = [], None
    for i in (1, 2):
        whole = state.get(f"{stem}.lokr_w{i}")
        if whole is None:
            rank = state[f"{stem}.lokr_w{i}_b"].shape[0]
            whole = state[f"{stem}.lokr_w{i}_a"] @ state[f"{stem}.lokr_w{i}_b"]
        factors.append(whole)
    return (alpha / rank if alpha is not None and rank is not None else 1.0) * torch.kron(*factors)


def _peft_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: layer for name, layer in module.named_modules() if hasattr(layer, "base_layer")}


def _check_file_against_module(path, dit: torch.nn.Module) -> int:
    """Every layer of a peft-injected ``dit``: output - base output == x @ (the file's delta).T."""
    state = load_file(str(path))
    g = torch.Generator().manual_seed(0)
    layers = _peft_layers(dit)
    with torch.no_grad():
        for name, layer in layers.items():
            x = torch.randn(3, layer.base_layer.in_features, generator=g)
            change = layer(x) - layer.base_layer(x)
            by_hand = x @ comfy_delta(state, f"diffusion_model.{name}", layer.base_layer.weight).T
            assert change.abs().max() > 1e-6, name  # the adapter moved away from its zero start
            assert (change - by_hand).abs().max().item() <= OUTPUT_ATOL, name
    return len(layers)


def test_training_lowers_the_loss(trained, tiny_diffusers, one_pair):
    kind, _, straight, _ = trained
    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    item = EditPairDataset(one_pair, 32, 32)[0]
    before = validation_loss(pipe, [item])
    fuse_lora(pipe.dit, load_lora(straight.lora)[0])
    after = validation_loss(pipe, [item])
    print(f"{kind}: validation loss {before:.4f} -> {after:.4f}")
    assert after < before / LEARNS_BY


def test_resume_is_exact(trained):
    kind, _, straight, resumed = trained
    assert {w.kind for w in load_lora(straight.lora)[0].values()} == {kind}
    assert _max_diff(straight.lora, resumed.lora) <= RESUME_ATOL


def test_saved_file_is_the_trained_module(trained, tiny_diffusers):
    """ComfyUI's keys for the type, whose delta applied by hand equals the peft layers' output."""
    kind, config, straight, _ = trained
    keys = set(load_file(str(straight.lora)))
    suffix = {"lora": ".lora_B.weight", "dora": ".dora_scale", "loha": ".hada_w2_b", "lokr": ".lokr_w2_b"}[kind]
    assert "diffusion_model.blocks.1.ffn.2" + suffix in keys and all(k.startswith("diffusion_model.") for k in keys)
    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    module = LoraTrainingModule(pipe, config.rank, config.alpha, config.targets, adapter=peft_config(config),
                                gradient_checkpointing=False)
    load_into(module, straight.lora, config)  # --resume's path: the file back into peft's parameters
    assert _check_file_against_module(straight.lora, module.dit) == 20


def test_edit_fused_equals_unfused(trained, tiny_diffusers, input_image):
    _, _, straight, _ = trained

    def edit(pipe):
        return pipe(input_image, "x", steps=2, cfg=1.0, seed=0, height=32, width=32, progress=False).video

    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    base = edit(pipe)
    pipe.load_lora(straight.lora, scale=1.0)
    fused = edit(pipe)
    hooked = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    adapter = hooked.load_lora(straight.lora, scale=1.0, fuse=False)
    unfused = edit(hooked)
    adapter.remove()
    assert torch.equal(edit(hooked), base)
    assert (fused - base).abs().max() > 1e-3
    assert (fused - unfused).abs().max().item() <= VIDEO_ATOL


def test_merge_equals_fused(trained, tiny_diffusers, tmp_path):
    _, _, straight, _ = trained
    target, _ = merge_model(tiny_diffusers, None, [(straight.lora, 0.7)], tmp_path / "merged")
    source = discover_components(tiny_diffusers).dit
    fused, _ = load_dit(source, dtype=torch.bfloat16)  # the stored dtype: merging rounds as fusing does
    fuse_lora(fused, load_lora(straight.lora)[0], scale=0.7)
    a, b = fused.state_dict(), load_dit(target, dtype=torch.bfloat16)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(b["blocks.1.ffn.2.weight"], load_dit(source, dtype=torch.bfloat16)[0].state_dict()["blocks.1.ffn.2.weight"])


def test_info_and_convert(trained, dit, tmp_path, capsys):
    kind, _, straight, _ = trained
    assert main(["lora", "info", str(straight.lora)]) == 0
    assert f"type: {kind} (20)" in capsys.readouterr().out
    musubi = tmp_path / "m.safetensors"
    assert main(["lora", "convert", str(straight.lora), str(musubi), "--to", "musubi"]) == 0
    a, b = load_lora(straight.lora)[0], load_lora(musubi)[0]
    modules = dict(dit.named_modules())
    assert a.keys() == b.keys() and all(
        torch.equal(a[n].delta(modules[n].weight), b[n].delta(modules[n].weight)) for n in a)
    code = main(["lora", "convert", str(straight.lora), str(tmp_path / "d.safetensors"), "--to", "diffsynth"])
    if kind == "lora":
        assert code == 0
    else:
        assert code == 2 and not (tmp_path / "d.safetensors").exists()
        assert "DiffSynth's LoRA loader adds B @ A only" in capsys.readouterr().err
    code = main(["lora", "convert", str(straight.lora), str(tmp_path / "p.safetensors"), "--to", "diffusers"])
    error = capsys.readouterr().err
    assert code == (0 if kind == "lora" else 2)
    if kind == "dora":  # the default targets have cross_attn.k but not k_img/v_img
        assert "diffusers cannot load this DoRA" in error and "k_img,v_img" in error
    elif kind != "lora":
        assert "load_lora_weights builds PEFT LoRA/DoRA adapters only" in error


def test_dora_trains_on_a_trajectory_from_the_cache_as_without(tiny_diffusers, tmp_path):
    """The adapter type is the DiT's business only: trajectory rows and the conditioning cache train
    a DoRA (whose change depends on the base weight) exactly as they train a LoRA."""
    from .test_trajectories import make_mixed

    dataset = make_mixed(tmp_path / "mixed", 1, 1)
    common = dict(max_steps=2, save_every=100, seed=2, trajectory_max_pixels=1024, trajectory_share=0.5, adapter="dora")
    plain = train(tiny_config(tiny_diffusers, dataset, tmp_path / "plain", **common))
    cached = train(tiny_config(tiny_diffusers, dataset, tmp_path / "cached", cache=True, **common))
    assert len(list((tmp_path / "cached" / "cache").rglob("*.safetensors"))) == 2  # it trained from the cache
    rows = list(csv.DictReader((tmp_path / "plain" / "logs" / "metrics.csv").open()))
    assert sorted(r["samples"] for r in rows) == ["0", "1"]  # the pair, then the trajectory (or the other way)
    assert _max_diff(plain.lora, cached.lora) <= 1e-6


def test_lokr_with_whole_factors_keeps_its_scale(dit, tmp_path):
    """At rank >= half a Kronecker factor peft keeps both factors whole and still scales by alpha / r,
    where ComfyUI (and LyCORIS) apply none: the export folds it into w1, resume takes it out."""
    from peft import LoKrConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoKrConfig(r=8, alpha=2, target_modules=["cross_attn.o", "self_attn.q"]),
                                    copy.deepcopy(dit))
    g = torch.Generator().manual_seed(4)
    named = {n: p for n, p in model.named_parameters() if "lokr_" in n}
    with torch.no_grad():
        for p in named.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    weights = from_peft_parameters(named, alpha=2, rank=8)
    assert all(isinstance(w, LokrModule) and w.rank is None for w in weights.values())
    assert _check_file_against_module(save_lora(weights, tmp_path / "lokr.safetensors"), model) == 4
    back = to_peft_parameters(weights, alpha=2, rank=8)
    assert back.keys() == named.keys()
    assert max((back[n] - p).abs().max().item() for n, p in named.items()) <= 1e-7


def test_diffusers_loads_a_dora_in_its_layout(tiny_diffusers, dit, tmp_path):
    """With k_img/v_img among its layers (else diffusers pads them without magnitudes and fails)."""
    g = torch.Generator().manual_seed(5)
    weights = {}
    for name, layer in dit.named_modules():
        if name.startswith("blocks.") and isinstance(layer, torch.nn.Linear) and ".norm" not in name:
            norms = layer.weight.detach().norm(dim=1)
            weights[name] = DoraModule(torch.randn(4, layer.in_features, generator=g) * 0.1,
                                       torch.randn(layer.out_features, 4, generator=g) * 0.1, 8.0,
                                       norms * (1 + 0.2 * torch.rand(norms.shape, generator=g)))
    path = save_lora(weights, tmp_path / "dora.safetensors", fmt="diffusers")
    expected, got, without = diffusers_and_ours(tiny_diffusers, path)
    assert (got - without).abs().max() > 1e-2
    assert (expected - got).abs().max().item() <= PARITY_RTOL * expected.abs().max().item()


def test_malformed_adapter_files_are_refused_with_what_is_wrong(tmp_path):
    from safetensors.torch import save_file

    from chronoedit_lora.errors import CheckpointError

    stem = "diffusion_model.blocks.0.ffn.0"
    cases = [
        ({f"{stem}.lokr_w1_a": torch.zeros(4, 2), f"{stem}.lokr_w2": torch.zeros(8, 8)}, "a LoKr needs w1 or both w1_a and w1_b"),
        ({f"{stem}.hada_w1_a": torch.zeros(4, 2), f"{stem}.hada_w1_b": torch.zeros(2, 8),
          f"{stem}.hada_w2_a": torch.zeros(4, 2), f"{stem}.hada_w2_b": torch.zeros(2, 6)}, "do not give two products of one shape"),
        ({f"{stem}.lora_A.weight": torch.zeros(2, 8), f"{stem}.lora_B.weight": torch.zeros(4, 2),
          f"{stem}.dora_scale": torch.zeros(3, 1)}, "does not have one value per output row"),
        ({f"{stem}.lora_A.weight": torch.zeros(2, 8), f"{stem}.hada_w1_a": torch.zeros(4, 2)}, "are not one of the adapter types"),
    ]
    for state, message in cases:
        save_file(state, str(tmp_path / "x.safetensors"))
        with pytest.raises(CheckpointError, match=f"bad layer.*blocks.0.ffn.0: .*{message}"):
            load_lora(tmp_path / "x.safetensors")


@pytest.mark.parametrize("settings, message", [
    ({"adapter": "lycoris"}, "adapter 'lycoris' is not one of 'lora', 'dora', 'loha', 'lokr'"),
    ({"adapter": "lora", "lokr_factor": "4"}, "lokr_factor set, but they shape a LoKr only"),
    ({"adapter": "lokr", "lokr_factor": "0"}, "lokr_factor must be -1"),
    ({"adapter": "loha", "rank": "0"}, "rank must be >= 1"),
])
def test_adapter_settings_are_checked_before_any_model_loads(tmp_path, settings, message):
    with pytest.raises(ChronoEditError, match=message):
        load_config(None, {"model": str(tmp_path / "no-model"), "dataset": "x.csv", **settings})
