"""Full fine-tuning in one process: the EMA equals a hand computation, the exported model gives the
trained module's output in diffusers and loads in the kit's edit, a LoRA extracted from it is the
truncated SVD of the weight change."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from chronoedit_lora.cli import main
from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.lora import load_lora, save_lora
from chronoedit_lora.models.dit import load_dit
from chronoedit_lora.models.rope import chronoedit_model_fn
from chronoedit_lora.train.state import dcp
from chronoedit_lora.train.state.checkpoint import checkpoint_dir
from chronoedit_lora.train.loop.trainer import train

from .lora_parity import PARITY_RTOL
from .test_train import RESUME_ATOL, make_subset, tiny_config

STEPS = 3
EMA_DECAY = 0.8
EMA_POWER = 2.0
EMA_ATOL = 1e-6  # float32 lerp vs a float64 hand computation of three steps
EXTRACT_RTOL = 8 * torch.finfo(torch.float32).eps  # of the change's largest singular value
TRAINABLE = "blocks.*.self_attn.*,blocks.1.ffn.*"  # attention of every block, one block's feed-forward


@pytest.fixture(scope="module")
def full_run(tiny_diffusers, tmp_path_factory):
    """Three full fine-tuning steps with an EMA, a checkpoint after each."""
    folder = tmp_path_factory.mktemp("full")
    dataset = make_subset(folder / "data", 4)
    result = train(tiny_config(tiny_diffusers, dataset, folder / "run", finetune="full", trainable=TRAINABLE,
                               learning_rate=1e-3, max_steps=STEPS, save_every=1, keep_checkpoints=STEPS,
                               ema_decay=EMA_DECAY))
    return folder / "run", result


def _saved(run, step: int, ema: bool = False) -> dict[str, torch.Tensor]:
    folder = checkpoint_dir(run, step)
    return dcp.read_weights(folder, dcp.trained_names(folder), ema)


def test_only_the_trainable_weights_train_and_the_ema_is_the_hand_computed_average(tiny_diffusers, full_run):
    run, result = full_run
    assert result.lora == checkpoint_dir(run, STEPS) and result.steps == STEPS
    names = dcp.trained_names(result.lora)
    base = load_dit(tiny_diffusers / "transformer", dtype=torch.float32)[0].state_dict()
    assert names == sorted(n for n in base if ".self_attn." in n or n.startswith("blocks.1.ffn."))
    weights = [_saved(run, step) for step in range(1, STEPS + 1)]
    assert all(w.dtype == torch.float32 for w in weights[0].values())  # float32 masters of bf16 weights
    assert max((weights[-1][n] - base[n]).abs().max() for n in names) > 1e-3  # they did train
    expected = {n: weights[0][n].double() for n in names}  # d_1 = 0: the average starts at step 1's weights
    for w in weights[1:]:
        expected = {n: EMA_DECAY * expected[n] + (1 - EMA_DECAY) * w[n].double() for n in names}
    ema = _saved(run, STEPS, ema=True)
    assert max((ema[n].double() - expected[n]).abs().max().item() for n in names) <= EMA_ATOL


@pytest.fixture(scope="module")
def lora_run(tiny_diffusers, tmp_path_factory):
    """Three LoRA steps with a power EMA, a LoRA file after each."""
    folder = tmp_path_factory.mktemp("lora-ema")
    dataset = make_subset(folder / "data", 2)
    train(tiny_config(tiny_diffusers, dataset, folder / "run", max_steps=STEPS, save_every=1, ema_power=EMA_POWER,
                      learning_rate=1e-2))
    return folder / "run"


def test_lora_power_ema_equals_hand_computation(lora_run):
    steps = [load_lora(lora_run / f"lora-step{s:06d}.safetensors")[0] for s in range(1, STEPS + 1)]
    expected = {k: (lora.down.double(), lora.up.double()) for k, lora in steps[0].items()}
    for t, weights in enumerate(steps[1:], start=2):
        d = (1 - 1 / t) ** (EMA_POWER + 1)
        expected = {k: (d * down + (1 - d) * weights[k].down.double(), d * up + (1 - d) * weights[k].up.double())
                    for k, (down, up) in expected.items()}
    ema, _ = load_lora(lora_run / "lora-ema.safetensors")
    assert ema.keys() == expected.keys()
    diff = max(max((ema[k].down.double() - down).abs().max().item(), (ema[k].up.double() - up).abs().max().item())
               for k, (down, up) in expected.items())
    assert diff <= EMA_ATOL
    assert (lora_run / "checkpoints" / f"step-{STEPS:06d}" / "lora-ema.safetensors").is_file()


def test_a_lora_runs_ema_resumes_exactly(tiny_diffusers, lora_run, tmp_path):
    """Stopped after step 1 and resumed to step 3: the EMA (read back from the checkpoint's
    lora-ema.safetensors) ends where the uninterrupted run's did."""
    dataset = lora_run.parent / "data" / "metadata.csv"
    common = dict(save_every=1, ema_power=EMA_POWER, learning_rate=1e-2)
    train(tiny_config(tiny_diffusers, dataset, tmp_path / "split", max_steps=1, **common))
    train(tiny_config(tiny_diffusers, dataset, tmp_path / "split", max_steps=STEPS, resume=True, **common))
    straight, _ = load_lora(lora_run / "lora-ema.safetensors")
    resumed, _ = load_lora(tmp_path / "split" / "lora-ema.safetensors")
    assert resumed.keys() == straight.keys()
    diff = max(max((resumed[k].down - straight[k].down).abs().max().item(),
                   (resumed[k].up - straight[k].up).abs().max().item()) for k in straight)
    assert diff <= RESUME_ATOL
    assert max(straight[k].up.abs().max().item() for k in straight) > 1e-4  # the average moved from zero


def test_a_lora_runs_ema_exports_baked_into_the_base(tiny_diffusers, lora_run, tmp_path, capsys):
    out = tmp_path / "wan.safetensors"
    assert main(["export", str(lora_run), str(out), "--to", "wan", "--ema", "--dtype", "float32"]) == 0
    base = load_dit(tiny_diffusers / "transformer", dtype=torch.float32)[0].state_dict()
    ema, _ = load_lora(lora_run / "lora-ema.safetensors")
    state = load_file(str(out))
    layer = "blocks.0.self_attn.q"
    assert torch.allclose(state[f"{layer}.weight"], base[f"{layer}.weight"] + ema[layer].delta(), atol=1e-6)
    assert main(["export", str(tmp_path), str(tmp_path / "y"), "--to", "diffusers"]) == 2
    assert "nor a checkpoint folder" in capsys.readouterr().err


def test_export_refuses_a_run_whose_layers_the_base_lacks_before_writing(lora_run, tmp_path, capsys):
    """A LoRA layer the base has no weight for (blocks.9 of a 2-block DiT): refused naming it, and
    neither a model folder nor a file is left behind."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    final = checkpoint_dir(run, STEPS) / "lora.safetensors"
    weights, metadata = load_lora(final)
    weights["blocks.9.self_attn.q"] = weights["blocks.0.self_attn.q"]
    save_lora(weights, final, metadata)
    for fmt, out in (("diffusers", tmp_path / "model"), ("wan", tmp_path / "wan.safetensors")):
        assert main(["export", str(run), str(out), "--to", fmt]) == 2
        assert "not in the model (as a Linear): blocks.9.self_attn.q" in capsys.readouterr().err
        assert not out.exists()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    return x, y, torch.randn(1, 512, 32, generator=g), torch.randn(1, 257, 1280, generator=g), torch.tensor([500.0])


def test_exported_model_gives_the_trained_modules_output_in_diffusers(tiny_diffusers, full_run, tmp_path):
    from diffusers import ChronoEditTransformer3DModel

    run, _ = full_run
    out = tmp_path / "model"
    assert main(["export", str(run), str(out), "--to", "diffusers", "--dtype", "float32"]) == 0
    assert (out / "vae").resolve() == (tiny_diffusers / "vae").resolve()  # untouched components linked
    trained = load_dit(tiny_diffusers / "transformer", dtype=torch.float32)[0]
    trained.load_state_dict(_saved(run, STEPS), strict=False)  # the trained module's DiT
    base = load_dit(tiny_diffusers / "transformer", dtype=torch.float32)[0]
    reference = ChronoEditTransformer3DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32)
    x, y, context, clip, t = _inputs()
    with torch.no_grad():
        expected = reference(torch.cat([x, y], 1), t, context, clip, return_dict=False)[0]
        got, before = (chronoedit_model_fn(m, x, t, context=context, clip_feature=clip, y=y) for m in (trained, base))
    scale = expected.abs().max().item()
    print(f"diffusers vs trained module: max |diff| {(expected - got).abs().max().item():.3g} (output scale {scale:.3g})")
    assert (expected - got).abs().max().item() <= PARITY_RTOL * scale
    assert (got - before).abs().max().item() > 100 * PARITY_RTOL * scale  # training changed the output

    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    assert main(["edit", "--model", str(out), "--image", str(image), "--prompt", "x", "--output", str(tmp_path / "o.png"),
                 "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32", "--device", "cpu"]) == 0
    assert (tmp_path / "o.png").is_file()


def test_single_file_export_and_ema_export(tiny_diffusers, full_run, tmp_path):
    run, _ = full_run
    for fmt, prefix in (("comfyui", "model.diffusion_model."), ("wan", "")):
        path = tmp_path / f"{fmt}.safetensors"
        assert main(["export", str(run), str(path), "--to", fmt, "--ema"]) == 0
        state = load_file(str(path))
        ema = _saved(run, STEPS, ema=True)
        base = load_dit(tiny_diffusers / "transformer", dtype=torch.bfloat16)[0].state_dict()
        assert set(state) == {prefix + n for n in base}
        assert all(torch.equal(state[prefix + n], ema[n].to(torch.bfloat16) if n in ema else base[n]) for n in base)
    loaded = load_dit(path, dtype=torch.float32)[0]  # the kit reads the Wan file back
    assert torch.equal(loaded.state_dict()["blocks.0.self_attn.q.weight"], ema["blocks.0.self_attn.q.weight"].bfloat16().float())


def test_extracted_lora_is_the_truncated_svd_of_the_change(tiny_diffusers, full_run, tmp_path):
    run, _ = full_run
    trained, base = _saved(run, STEPS), load_dit(tiny_diffusers / "transformer", dtype=torch.float32)[0].state_dict()
    for rank in (4, 1000):
        out = tmp_path / f"r{rank}.safetensors"
        assert main(["lora", "extract", str(out), "--base", str(tiny_diffusers), "--tuned", str(run), "--rank", str(rank)]) == 0
        lora, metadata = load_lora(out)
        layers = sorted(n[: -len(".weight")] for n in trained if n.endswith(".weight") and trained[n].ndim == 2)
        assert sorted(lora) == layers
        for layer in layers:
            delta = (trained[f"{layer}.weight"] - base[f"{layer}.weight"]).double()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(rank, s.numel())
            best = (u[:, :r] * s[:r]) @ vh[:r]
            got = lora[layer].delta().double()
            # float32 difference, SVD and factors vs float64: a float32 SVD's backward error is a few ulps of the
            # change's largest singular value (measured: at most 1.5 ulps of it here; the weights' size does not enter)
            atol = EXTRACT_RTOL * s[0].item()
            assert (got - best).abs().max().item() <= atol, layer
            if rank == 1000:  # full rank: the change itself
                assert (got - delta).abs().max().item() <= atol, layer
    assert metadata["extracted_from"] == str(run)
    # the same from the exported model folder (model vs model, read layer by layer from the shards)
    assert main(["export", str(run), str(tmp_path / "model"), "--to", "diffusers", "--dtype", "float32"]) == 0
    assert main(["lora", "extract", str(tmp_path / "m.safetensors"), "--base", str(tiny_diffusers), "--tuned",
                 str(tmp_path / "model"), "--rank", "1000"]) == 0
    from_model, _ = load_lora(tmp_path / "m.safetensors")
    assert from_model.keys() == lora.keys()
    assert all(torch.equal(from_model[k].delta(), lora[k].delta()) for k in lora)


def test_settings_are_checked_before_any_model_loads(tmp_path):
    from chronoedit_lora.train.loop.config import load_config
    from chronoedit_lora.train.objective.full_module import check_trainable

    for overrides, message in (({"ema_decay": "0.9", "ema_power": "7"}, "choose one EMA"),
                               ({"ema_decay": "1"}, "ema_decay must be"),
                               ({"sample_ema": "true"}, "sample_ema = true needs an EMA"),
                               ({"finetune": "full", "fp8_base": "true"}, "set fp8_base = false"),
                               ({"finetune": "partial"}, "finetune 'partial' is not one of")):
        with pytest.raises(ChronoEditError, match=message):
            load_config(None, overrides)
    with pytest.raises(ChronoEditError, match="'blocks.\\*.atn.\\*' match"):
        check_trainable(["blocks.*", "blocks.*.atn.*"], ["blocks.0.self_attn.q.weight"])


def test_samples_see_the_ema_inside_swapped_in_and_the_weights_after():
    from chronoedit_lora.train.state.ema import ExponentialMovingAverage

    layer = torch.nn.Linear(3, 2)
    ema = ExponentialMovingAverage(dict(layer.named_parameters()), ema_decay=0.5, ema_power=0.0)
    trained = {name: p.detach().clone() + 1.0 for name, p in layer.named_parameters()}
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(trained[name])
    ema.update(2)  # d = 0.5: halfway from the initial weights to the trained ones
    with ema.swapped_in():
        assert all(torch.allclose(p, trained[name] - 0.5) for name, p in layer.named_parameters())
    assert all(torch.equal(p, trained[name]) for name, p in layer.named_parameters())
