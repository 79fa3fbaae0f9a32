"""base_loras, sample_loras and sample_preset: training on a base with adapters fused in, and
previews made as the trained LoRA will be used (stacked on the distill LoRA, its preset)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from chronoedit_lora.cli import main
from chronoedit_lora.data import EditPairDataset
from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.lora import load_lora, save_lora
from chronoedit_lora.lora.merge import merge_model
from chronoedit_lora.train.loop.samples import CELL, LABEL_HEIGHT
from chronoedit_lora.train.loop.trainer import train
from chronoedit_lora.video import tensor_to_pil

from .test_train import make_subset, tiny_config

# Fused at load (float32) vs merged on disk (float32): the same weights, so the same numbers up to
# float noise.
BASE_ATOL = 1e-6
# Pixel difference (of 255) between a training sample and the same edit made by `edit`: the same
# sampler and float32 weights, so at most a rare one-level rounding flip (measured: 0). The bound was
# 4 while training sampled with Euler and `edit` with the model folder's UniPC.
SAMPLE_MAX, SAMPLE_MEAN = 1, 0.05


@pytest.fixture(scope="module")
def two_pairs(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("two"), 2)


def _cell(grid: Image.Image) -> torch.Tensor:
    """The first row's edit cell of a sample grid, as pixel values."""
    return torch.tensor(list(grid.convert("RGB").crop((CELL, LABEL_HEIGHT, 2 * CELL, LABEL_HEIGHT + CELL)).getdata()),
                        dtype=torch.float32)


def test_training_on_base_loras_equals_training_on_the_merged_base(float32_model, distill_like, two_pairs, tmp_path):
    merged, _ = merge_model(float32_model, None, [(distill_like, 0.7)], tmp_path / "merged")
    common = dict(max_steps=3, save_every=100, seed=3)
    stacked = train(tiny_config(float32_model, two_pairs, tmp_path / "stacked", base_loras=f"{distill_like}:0.7",
                                **common))
    plain = train(tiny_config(merged.parent, two_pairs, tmp_path / "plain", **common))
    on_base = train(tiny_config(float32_model, two_pairs, tmp_path / "base", **common))
    a, b, c = (load_lora(r.lora)[0] for r in (stacked, plain, on_base))
    difference = max(max((a[k].up - b[k].up).abs().max().item(), (a[k].down - b[k].down).abs().max().item()) for k in a)
    assert difference <= BASE_ATOL and abs(stacked.final_loss - plain.final_loss) <= BASE_ATOL
    # and the base LoRA did change what was trained (so the equality above is not trivial)
    assert max((a[k].up - c[k].up).abs().max().item() for k in a) > 1e-4
    assert abs(stacked.final_loss - on_base.final_loss) > 1e-4
    card = (tmp_path / "stacked" / "README.md").read_text()
    assert "trained on the base with `distill\\.safetensors&#58;0\\.7`" in card
    assert "--lora distill.safetensors:0.7 --lora lora.safetensors" in card
    assert f"{distill_like}:0.7" in load_lora(stacked.lora)[1]["config"]


def test_resume_refuses_changed_base_loras(tiny_diffusers, distill_like, two_pairs, tmp_path):
    train(tiny_config(tiny_diffusers, two_pairs, tmp_path / "run", max_steps=1, save_every=1,
                      base_loras=f"{distill_like}:1.0"))
    for changed in (f"{distill_like}:0.5", ""):
        with pytest.raises(ChronoEditError, match="base_loras.*only fit the base they were trained on"):
            train(tiny_config(tiny_diffusers, two_pairs, tmp_path / "run", max_steps=2, resume=True, allow_changes=True,
                              base_loras=changed))
    assert train(tiny_config(tiny_diffusers, two_pairs, tmp_path / "run", max_steps=2, resume=True,
                             base_loras=f"{distill_like}:1.0")).steps == 2


def sample_against_edit(run: Path, model: list[str], loras: list[str], pairs: Path, folder: Path,
                        unfused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The first sample of ``run``'s step 1 (made with ``sample_preset = "distill"``) and its pixel
    differences to `edit --preset distill` of the same input on ``model`` (its flags) with ``loras``,
    then the step-1 adapter, stacked (``unfused``: as hooks; else fused in that order)."""
    item = EditPairDataset(pairs, 32, 32)[0]
    tensor_to_pil(item["video"][:, 0]).save(folder / "input.png")
    stacked = [flag for lora in [*loras, str(run / "lora-step000001.safetensors")] for flag in ("--lora", lora)]
    stacked += ["--unfused"] if unfused else []
    assert main(["edit", *model, "--dtype", "float32", "--device", "cpu", "--preset", "distill", *stacked,
                 "--image", str(folder / "input.png"), "--prompt", item["prompt"], "--height", "32", "--width", "32",
                 "--output", str(folder / "edited.png")]) == 0
    cell = _cell(Image.open(run / "samples" / "step-000001.png"))
    edited = Image.open(folder / "edited.png").convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
    return cell, (cell - torch.tensor(list(edited.getdata()), dtype=torch.float32)).abs()


def test_distill_preset_samples_equal_edit_with_the_same_loras_stacked(tiny_diffusers, distill_like, two_pairs,
                                                                      tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_diffusers, two_pairs, run, max_steps=1, save_every=1, sample_every=1, sample_count=1,
                      sample_preset="distill", sample_loras=f"{distill_like}:0.8"))
    cell, difference = sample_against_edit(run, ["--model", str(tiny_diffusers)], [f"{distill_like}:0.8"], two_pairs,
                                           tmp_path)
    assert difference.max().item() <= SAMPLE_MAX and difference.mean().item() <= SAMPLE_MEAN
    # without the preset and the stacked LoRA the sample is another picture
    train(tiny_config(tiny_diffusers, two_pairs, tmp_path / "plain", max_steps=1, save_every=1, sample_every=1,
                      sample_count=1))
    other = _cell(Image.open(tmp_path / "plain" / "samples" / "step-000001.png"))
    print("sample vs edit", difference.max().item(), difference.mean().item(), "plain sample vs preset sample",
          (other - cell).abs().max().item(), (other - cell).abs().mean().item())
    assert (other - cell).abs().mean().item() > 5.0


@pytest.mark.parametrize("adapter, base, sample, unfused", [
    ("loha", 0.5, 0.8, True), ("lokr", 0.5, 0.8, True),
    # a DoRA's row norms are those of the base it trained on: base_loras fused in (so the edit fuses
    # them first, the default), sample_loras not (hooks beneath it, as the edit's --unfused stack)
    ("dora", None, 0.8, True), ("dora", 0.5, None, False)])
def test_other_adapters_sample_as_edit_stacks_them(tiny_diffusers, distill_like, two_pairs, tmp_path, adapter, base,
                                                    sample, unfused):
    """A DoRA, LoHa or LoKr trained with base_loras and/or sample_loras: its samples equal `edit` with
    the base LoRA, the sample LoRA and the adapter stacked in that order."""
    run = tmp_path / "run"
    loras = [f"{distill_like}:{scale}" for scale in (base, sample) if scale is not None]
    train(tiny_config(tiny_diffusers, two_pairs, run, max_steps=1, save_every=1, sample_every=1, sample_count=1,
                      sample_preset="distill", adapter=adapter, rank=4, alpha=4,
                      base_loras=loras[0] if base else "", sample_loras=loras[-1] if sample else ""))
    _, difference = sample_against_edit(run, ["--model", str(tiny_diffusers)], loras, two_pairs, tmp_path, unfused)
    print(f"{adapter}: sample vs edit max {difference.max().item()}, mean {difference.mean().item():.3f}")
    assert difference.max().item() <= SAMPLE_MAX and difference.mean().item() <= SAMPLE_MEAN


@pytest.mark.parametrize("key, value, message", [
    ("base_loras", "missing.safetensors:1.0", "base_loras missing.safetensors: file not found"),
    ("sample_loras", "{distill}:nan", "sample_loras .*the scale must be a finite number"),
    ("sample_preset", "distil", "sample_preset 'distil' is not one of 'distill'"),
])
def test_bad_settings_are_refused_before_loading(distill_like, two_pairs, tmp_path, key, value, message):
    with pytest.raises(ChronoEditError, match=message):
        tiny_config(tmp_path / "no-model", two_pairs, tmp_path / "run", **{key: value.format(distill=distill_like)})


def test_a_base_lora_for_another_model_is_refused_before_loading(tiny_diffusers, two_pairs, tmp_path):
    from chronoedit_lora.lora import LoraModule

    misfit = save_lora({"blocks.0.self_attn.q": LoraModule(torch.zeros(2, 7), torch.zeros(5, 2), 2.0)},
                       tmp_path / "other.safetensors")
    with pytest.raises(ChronoEditError, match="base_loras .*other.safetensors does not fit this model"):
        train(tiny_config(tiny_diffusers, two_pairs, tmp_path / "run", max_steps=1, base_loras=str(misfit)))


def test_eval_base_lora_equals_evaluating_on_the_merged_base(float32_model, distill_like, two_pairs, tmp_path):
    import csv

    merged, _ = merge_model(float32_model, None, [(distill_like, 0.7)], tmp_path / "merged")
    other = save_lora({k: type(v)(v.down * 0.5, v.up, v.alpha) for k, v in load_lora(distill_like)[0].items()},
                      tmp_path / "evaluated.safetensors")
    common = ["eval", "--lora", str(other), "--dataset", str(two_pairs), "--height", "32", "--width", "32",
              "--preset", "distill", "--dtype", "float32", "--device", "cpu"]
    assert main(common + ["--model", str(float32_model), "--base-lora", f"{distill_like}:0.7",
                          "--output", str(tmp_path / "stacked")]) == 0
    assert main(common + ["--model", str(merged.parent), "--output", str(tmp_path / "merged-eval")]) == 0
    assert main(common + ["--model", str(float32_model), "--output", str(tmp_path / "plain")]) == 0
    stacked, on_merged, plain = ({row["checkpoint"]: row for row in csv.DictReader((tmp_path / name / "metrics.csv").open())}
                                 for name in ("stacked", "merged-eval", "plain"))
    for checkpoint in ("base", "evaluated"):  # the base row is evaluated on the base with the LoRA under it too
        for metric in ("loss", "psnr"):
            assert abs(float(stacked[checkpoint][metric]) - float(on_merged[checkpoint][metric])) <= BASE_ATOL
        assert abs(float(stacked[checkpoint]["loss"]) - float(plain[checkpoint]["loss"])) > 1e-3
