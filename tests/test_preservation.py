"""Preservation (preservation_dataset, preservation_weight): the term is the distance between the
adapted DiT's prediction and the frozen base's, 0 at initialisation, with autograd's gradient of the
hand-written term, and a run with it changes the base's output on its pairs less than one without."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from chronoedit_lora.data import EditPairDataset
from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.models.rope import chronoedit_model_fn
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.train.loop.config import DEFAULT_TARGETS, load_config
from chronoedit_lora.train.loop.inputs import training_inputs
from chronoedit_lora.train.objective.lora_module import LoraTrainingModule
from chronoedit_lora.train.objective.loss import LossRecipe, preservation_loss, training_schedule

from .test_train import EXAMPLE, RESUME_ATOL, make_subset, tiny_config
from .test_train_processes import _max_diff

# float32 on CPU: the kit's term and the hand-written one run the same DiT ops; measured ~1e-7 relative
GRAD_RTOL = 1e-5


def _conditioning(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("input_latents", "change")}


@pytest.fixture(scope="module")
def setup(tiny_diffusers):
    base = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    dataset = EditPairDataset(EXAMPLE / "metadata.csv", 32, 32)
    pairs = [training_inputs(pipe, dataset[i]["video"], dataset[i]["prompt"]) for i in (0, 1)]
    return base, pipe, pairs


def test_the_term_is_0_at_initialisation_and_its_gradient_is_autograds(setup):
    base, pipe, (batch, kept) = setup
    module = LoraTrainingModule(pipe, 8, 8.0, DEFAULT_TARGETS, gradient_checkpointing=False,
                                recipe=LossRecipe(preservation_weight=2.0))
    plain = module(batch, noise_seed=3)
    total = module(batch, noise_seed=3, preserve=kept)
    assert module.last_preservation.item() == 0.0 and total.item() == plain.item()  # LoRA B = 0: the base itself

    generator = torch.Generator().manual_seed(0)
    for name, param in module.dit.named_parameters():
        if "lora_B" in name:
            param.data = 0.05 * torch.randn(param.shape, generator=generator)
    scheduler, x0 = training_schedule(), kept["input_latents"]
    timestep = scheduler.timesteps[300:301]
    noisy = scheduler.add_noise(x0, torch.randn(x0.shape, generator=generator), timestep)
    skip, rope = pipe.components.temporal_skip_len, pipe.rope

    def predict(latents, t):
        return chronoedit_model_fn(module.dit, latents, t, skip_len=skip, rope=rope, **_conditioning(kept))

    term = preservation_loss(predict, module.adapters_disabled, noisy, timestep)
    ours = torch.autograd.grad(term, module.lora_parameters())
    assert all(p.requires_grad for p in module.lora_parameters())  # turned back on after the base's pass
    # by hand: the base from its own, adapter-free copy of the DiT; the adapted prediction with gradients
    with torch.no_grad():
        frozen = chronoedit_model_fn(base.dit, noisy, timestep, skip_len=skip, rope=rope, **_conditioning(kept))
    hand = (predict(noisy, timestep) - frozen).square().mean()
    expected = torch.autograd.grad(hand, module.lora_parameters())
    assert hand.item() > 0 and term.item() == pytest.approx(hand.item(), rel=GRAD_RTOL)
    for got, want in zip(ours, expected):
        assert torch.allclose(got, want, rtol=GRAD_RTOL, atol=GRAD_RTOL * want.abs().max().item())


def _drift(pipe: ChronoEditPipeline, lora, items: list[dict]) -> float:
    """Mean squared change of the DiT's prediction on ``items`` (4 timesteps, fixed noise) that ``lora`` makes."""
    from chronoedit_lora.lora import fuse_lora, load_lora

    scheduler, generator = training_schedule(), torch.Generator().manual_seed(1)
    inputs = [training_inputs(pipe, item["video"], item["prompt"]) for item in items]
    points = [(x, scheduler.timesteps[i:i + 1], torch.randn(x["input_latents"].shape, generator=generator))
              for x in inputs for i in (100, 300, 500, 800)]

    def predictions():
        with torch.no_grad():
            return [chronoedit_model_fn(pipe.dit, scheduler.add_noise(x["input_latents"], noise, t), t,
                                        skip_len=pipe.components.temporal_skip_len, rope=pipe.rope, **_conditioning(x))
                    for x, t, noise in points]

    before = predictions()
    state = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    fuse_lora(pipe.dit, load_lora(lora)[0])
    after = predictions()
    pipe.dit.load_state_dict(state)
    return sum((a - b).square().mean().item() for a, b in zip(after, before)) / len(points)


def test_a_run_with_preservation_changes_the_base_less_on_its_pairs(tiny_diffusers, tmp_path):
    dataset = make_subset(tmp_path / "train", 1)
    kept_csv = make_subset(tmp_path / "keep", 1, start=1)
    common = dict(max_steps=8, save_every=1000, seed=2)
    without = train_run(tiny_diffusers, dataset, tmp_path / "without", **common)
    with_ = train_run(tiny_diffusers, dataset, tmp_path / "with", preservation_dataset=kept_csv,
                      preservation_weight=10.0, **common)
    rows = list(csv.DictReader((tmp_path / "with" / "logs" / "metrics.csv").open()))
    assert float(rows[0]["preservation"]) == 0.0  # step 1 trains from B = 0
    assert all(float(r["preservation"]) >= 0 for r in rows) and max(float(r["preservation"]) for r in rows) > 0
    assert "preservation" not in next(csv.DictReader((tmp_path / "without" / "logs" / "metrics.csv").open()))
    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    kept = EditPairDataset(kept_csv, 32, 32)
    items = [kept[i] for i in range(len(kept))]
    drift_without, drift_with = _drift(pipe, without, items), _drift(pipe, with_, items)
    print(f"mean squared change of the base's prediction on the preservation pairs: without {drift_without:.3g}, "
          f"with preservation {drift_with:.3g} ({drift_with / drift_without:.3g}x)")
    # measured (8 steps, weight 10): 0.621 without, 0.00299 with (0.005x); a term that does not pull
    # toward the base leaves the two about equal
    assert drift_with < 0.5 * drift_without


def train_run(model, dataset, output, **settings):
    from chronoedit_lora.train.loop.trainer import train

    return train(tiny_config(model, dataset, output, **settings)).lora


@pytest.mark.parametrize("values, says", [
    ({"preservation_weight": "-1"}, "preservation_weight must be >= 0"),
    ({"preservation_weight": "nan"}, "preservation_weight must be a finite number"),
    ({"preservation_dataset": "/no/such/keep.csv"}, "preservation_dataset /no/such/keep.csv not found"),
    ({"preservation_dataset": str(EXAMPLE / "metadata.csv"), "finetune": "full"},
     "a full fine-tune has no adapter to turn off, and a frozen copy of the base would double the DiT's memory"),
    ({"preservation_dataset": str(EXAMPLE / "before"), "preservation_prompt": " "}, "preservation_prompt is empty"),
])
def test_bad_preservation_settings_are_refused_in_one_line(values, says):
    with pytest.raises(ChronoEditError) as error:
        load_config(None, values)
    assert says in str(error.value) and "\n" not in str(error.value)




KEEP = "Keep the image unchanged."


def image_folder(folder: Path, count: int, start: int = 0) -> Path:
    """``count`` of the example dataset's edited images (from ``start`` on) in ``folder``, plus a
    note that is not an image."""
    folder.mkdir(parents=True)
    for path in sorted((EXAMPLE / "after").iterdir())[start:start + count]:
        shutil.copy(path, folder / path.name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_a_folder_of_images_is_read_as_identity_pairs_with_the_keep_prompt(tmp_path):
    folder = image_folder(tmp_path / "keep", 3)
    dataset = EditPairDataset(folder, 32, 32, keep_prompt=KEEP)
    assert [pair.input_image.name for pair in dataset.pairs] == sorted(p.name for p in folder.glob("*.png"))
    assert all(pair.edited_image == pair.input_image for pair in dataset.pairs)
    for i in range(len(dataset)):
        item = dataset[i]
        # the clip [input, edited x 4] is the one image five times, trained with the keep instruction
        assert item["prompt"] == KEEP and torch.equal(item["video"], item["video"][:, :1].expand_as(item["video"]))
    image = folder / "001.png"  # damaged after the check: loading it names the file and the command that checks a folder
    image.write_bytes(image.read_bytes()[:300])
    with pytest.raises(ChronoEditError, match="001.png") as raised:
        dataset[1]
    assert "dataset check YOUR_CONFIG.toml` (it checks its preservation_dataset folder)" in str(raised.value)


@pytest.mark.parametrize("damage, says", [
    ("truncate", "000.png is unreadable or truncated"),
    ("empty", "holds no images"),
    ("link", "000.png is a link to"),
])
def test_a_bad_preservation_folder_is_refused_in_one_line_before_any_model_loads(tiny_diffusers, tmp_path,
                                                                                  monkeypatch, damage, says):
    from chronoedit_lora.train.loop.trainer import train

    folder = image_folder(tmp_path / "keep", 2)
    image = folder / "000.png"
    if damage == "truncate":
        image.write_bytes(image.read_bytes()[:300])
    elif damage == "empty":
        for path in folder.glob("*.png"):
            path.unlink()
    else:
        outside = tmp_path / "outside.png"
        image.rename(outside)
        image.symlink_to(outside)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ChronoEditPipeline, "from_pretrained", no_model)
    with pytest.raises(ChronoEditError) as error:
        train(tiny_config(tiny_diffusers, make_subset(tmp_path / "train", 1), tmp_path / "run",
                          preservation_dataset=folder))
    message = str(error.value)
    assert message.startswith(f"preservation_dataset {folder}: ") and says in message and "\n" not in message


def test_dataset_check_of_a_config_checks_its_preservation_folder(tmp_path, capsys):
    from chronoedit_lora.cli import main

    folder = image_folder(tmp_path / "keep", 2)
    toml = tmp_path / "train.toml"
    toml.write_text(f'dataset = "{make_subset(tmp_path / "train", 1)}"\npreservation_dataset = "{folder}"\n'
                    'height = 32\nwidth = 32\n')
    assert main(["dataset", "check", str(toml)]) == 0
    assert f"{folder}:" in capsys.readouterr().out
    (folder / "001.png").write_bytes(b"not a png")
    assert main(["dataset", "check", str(toml)]) == 1
    assert "001.png is not an image PIL can read" in capsys.readouterr().out


def test_a_preservation_folder_is_cached_and_resumes_exactly(tiny_diffusers, tmp_path):
    """A folder's identity pairs go through the conditioning cache like the training pairs (the
    resumed run loads no encoder), and a cached run stopped and resumed continues with the same
    preservation items: its `preservation` column and LoRA equal those of a straight, uncached run."""
    from chronoedit_lora.train.loop.trainer import train

    dataset, folder = make_subset(tmp_path / "train", 2), image_folder(tmp_path / "keep", 3)
    common = dict(preservation_dataset=folder, preservation_weight=10.0, save_every=2, seed=5)
    straight = train(tiny_config(tiny_diffusers, dataset, tmp_path / "straight", max_steps=4, **common))
    train(tiny_config(tiny_diffusers, dataset, tmp_path / "split", max_steps=2, cache=True, **common))
    assert len(list((tmp_path / "split" / "cache").rglob("*.safetensors"))) == 2 + 3  # training pairs + images
    resumed = train(tiny_config(tiny_diffusers, dataset, tmp_path / "split", max_steps=4, cache=True, resume=True,
                                **common))
    assert not resumed.loaded_encoders  # every item, the preservation images too, came from the cache

    def column(run: str) -> list[float]:
        return [float(r["preservation"]) for r in csv.DictReader((tmp_path / run / "logs" / "metrics.csv").open())]

    assert len(column("straight")) == 4 and column("straight")[0] == 0.0 and max(column("straight")) > 0
    # float32 on CPU, same ops in the same order: equal up to float noise (RESUME_ATOL, the resume tests')
    assert column("split") == pytest.approx(column("straight"), abs=RESUME_ATOL)
    diff = _max_diff(resumed.lora, straight.lora)
    print(f"cached, stopped and resumed vs straight uncached, LoRA max |diff|: {diff:.3g}")
    assert diff <= RESUME_ATOL


@pytest.mark.slow
def test_preservation_under_fsdp_equals_one_process_and_resumes_exactly(tiny_diffusers, tmp_path):
    """2-process FSDP (gloo, CPU): the base's prediction with the adapters off runs on the same
    sharded blocks (every rank joins its all-gathers). The run equals one process accumulating the
    same two batches per step, and a stopped FSDP run resumed continues exactly."""
    import subprocess

    from .test_fsdp import ACCUMULATION_ATOL, CHECKPOINTING, _launch
    from .test_train_processes import _train_cmd

    dataset, folder = make_subset(tmp_path / "train", 4), image_folder(tmp_path / "keep", 2)
    flags = ["--seed", "3", "--save_every", "2", "--preservation_dataset", str(folder), "--preservation_weight", "10",
             *CHECKPOINTING]
    fsdp = _launch("cpu_2proc_fsdp.yaml", tiny_diffusers, dataset, tmp_path / "fsdp", "--max_steps", "4", *flags)
    assert "FSDP rank 1: holds" in fsdp.stdout
    one = subprocess.run(_train_cmd(tiny_diffusers, dataset, tmp_path / "one", "--max_steps", "4", *flags,
                                    "--gradient_accumulation", "2"), capture_output=True, text=True, timeout=480)
    assert one.returncode == 0, one.stderr[-3000:]
    _launch("cpu_2proc_fsdp.yaml", tiny_diffusers, dataset, tmp_path / "split", "--max_steps", "2", *flags)
    _launch("cpu_2proc_fsdp.yaml", tiny_diffusers, dataset, tmp_path / "split", "--max_steps", "4", *flags, "--resume")

    def columns(run: str) -> dict[str, list[float]]:
        rows = list(csv.DictReader((tmp_path / run / "logs" / "metrics.csv").open()))
        return {key: [float(r[key]) for r in rows] for key in ("loss", "preservation")}

    sharded = columns("fsdp")
    assert len(sharded["loss"]) == 4 and sharded["preservation"][0] == 0.0 and max(sharded["preservation"]) > 0
    # measured: the columns (written to 6 digits) equal, the LoRA within 3.2e-5 (one process sums two
    # half-weighted gradients where FSDP reduce-scatters them: test_fsdp's ACCUMULATION_ATOL)
    for key, values in columns("one").items():
        assert values == pytest.approx(sharded[key], rel=1e-5, abs=1e-7), key
    diff = _max_diff(tmp_path / "fsdp" / "lora.safetensors", tmp_path / "one" / "lora.safetensors")
    print(f"preservation: 2-process FSDP vs 1 process x accumulation 2, LoRA max |diff| {diff:.3g}")
    assert diff <= ACCUMULATION_ATOL
    for key, values in columns("split").items():
        assert values == pytest.approx(sharded[key], abs=RESUME_ATOL), key
    resumed = _max_diff(tmp_path / "fsdp" / "lora.safetensors", tmp_path / "split" / "lora.safetensors")
    print(f"preservation: FSDP stopped at step 2 and resumed vs uninterrupted, LoRA max |diff| {resumed:.3g}")
    assert resumed <= RESUME_ATOL
