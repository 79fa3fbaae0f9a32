"""``chronoedit-lora eval`` and evaluation during training on the tiny checkpoint: the quantile loss
against the objective by hand, an overfitted LoRA beating the base, the files a web UI reads, the
best pick, and keep_best exact across --resume."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from chronoedit_lora.cli import main
from chronoedit_lora.data import EditPairDataset
from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.eval.checkpoints import Checkpoint, find_checkpoints
from chronoedit_lora.eval.metrics import QUANTILES, quantile_column
from chronoedit_lora.eval.report import best_per_metric, metrics_csv, overall_pick
from chronoedit_lora.lora import load_lora
from chronoedit_lora.train.state.loss_plot import COLOURS, HELD_OUT
from chronoedit_lora.train.loop.samples import LABEL_HEIGHT
from chronoedit_lora.train.loop.trainer import train

from .test_train import EXAMPLE, RESUME_ATOL, make_subset, tiny_config
from .tiny_metric_models import write_tiny_clip, write_tiny_dino, write_tiny_lpips
from .tiny_vlm import write_tiny_qwen_vl

# Overfitting 2 pairs for 30 steps (rank 16, lr 1e-2) on the tiny model, measured on those pairs: the
# quantile loss 1.466 -> 1.017 (1.44x lower) and the PSNR of 4-step edits to their targets
# 8.14 -> 8.44 dB (+0.29 dB; the random 2-block base cannot get close to a target in 4 steps).
# Asserted with margin to spare: 1.3x and +0.1 dB. A LoRA that learns nothing gives 1.0x and +0.
LOSS_RATIO, PSNR_MARGIN = 1.3, 0.1


@pytest.fixture(scope="module")
def two_pairs(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("pairs"), 2)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("held_out"), 2, start=8)


def test_quantile_loss_is_the_objective_by_hand(tiny_diffusers, two_pairs):
    from chronoedit_lora.eval.held_out import encode_pairs
    from chronoedit_lora.eval.quantile_loss import quantile_losses
    from chronoedit_lora.models.rope import chronoedit_model_fn
    from chronoedit_lora.pipeline import ChronoEditPipeline
    from chronoedit_lora.train.objective.loss import training_schedule

    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    dataset = EditPairDataset(two_pairs, 32, 32)
    pairs = encode_pairs(pipe, [dataset[0], dataset[1]], len(QUANTILES), seed=3)
    values = quantile_losses(pipe, pairs)
    timesteps = sorted(training_schedule().timesteps.tolist())  # the 1000 that training draws uniformly
    for q_index, quantile in enumerate(QUANTILES):
        t = timesteps[round(quantile * (len(timesteps) - 1))]
        # it is that quantile of the training draws, to one timestep
        assert abs(sum(x <= t for x in timesteps) / len(timesteps) - quantile) <= 1 / len(timesteps) + 1e-9
        sigma = t / 1000  # DiffSynth's Wan schedule: timestep = 1000 sigma
        for p_index, pair in enumerate(pairs):
            x0, noise = pair.inputs["input_latents"], pair.noises[q_index]
            conditioning = {k: v for k, v in pair.inputs.items() if k != "input_latents"}
            with torch.no_grad():
                velocity = chronoedit_model_fn(pipe.dit, (1 - sigma) * x0 + sigma * noise, torch.tensor([t]),
                                               skip_len=pipe.components.temporal_skip_len, rope="skip", **conditioning)
            expected = ((velocity - (noise - x0)) ** 2).mean().item()
            assert values[quantile_column(quantile)][p_index] == pytest.approx(expected, rel=1e-5)
    for p_index in range(2):
        per_quantile = [values[quantile_column(q)][p_index] for q in QUANTILES]
        assert values["loss"][p_index] == pytest.approx(sum(per_quantile) / len(per_quantile), rel=1e-12)
    again = encode_pairs(pipe, [dataset[0], dataset[1]], len(QUANTILES), seed=3)  # fixed noise: same numbers
    assert quantile_losses(pipe, again) == values


def test_eval_edits_are_the_pipelines_edits_for_pairs_and_trajectories(tiny_diffusers):
    """One encoding serves loss and edit: the edit equals the pipeline's own (a trajectory row's in
    the temporal-reasoning mode throughout), and every metric of the cheap part is filled."""
    from chronoedit_lora.eval.held_out import EditSettings, encode_pairs, edit_pair
    from chronoedit_lora.eval.runner import score_current
    from chronoedit_lora.pipeline import ChronoEditPipeline

    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    dataset = EditPairDataset(EXAMPLE / "with_trajectories.csv", 32, 32)
    items = [dataset[0], dataset[12]]
    assert [item["kind"] for item in items] == ["pair", "trajectory"]  # the trajectory at its own (smaller) size
    pairs = encode_pairs(pipe, items, len(QUANTILES))
    settings = EditSettings(steps=2, seed=4)
    values, edits = score_current(pipe, pairs, settings, None)
    for pair, edit in zip(pairs, edits):
        reasoning = settings.steps if pair.kind == "trajectory" else 0
        expected = pipe(pair.source, pair.prompt, seed=4, steps=2, cfg=1.0, height=pair.source.height,
                        width=pair.source.width, temporal_reasoning_steps=reasoning, progress=False).image
        # equal up to the VAE condition's float noise (its own pass vs batched with the clip): one level at most
        assert np.abs(np.asarray(edit, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
        assert edit_pair(pipe, pair, settings, None).tobytes() == edit.tobytes()  # reproducible
    assert set(values) == {"loss", *(quantile_column(q) for q in QUANTILES), "psnr", "ssim", "source_ssim"}
    assert all(len(v) == 2 for v in values.values())


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_eval_of_an_overfitted_run_beats_the_base_and_writes_every_output(tiny_diffusers, two_pairs, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_diffusers, two_pairs, run, max_steps=30, save_every=15, rank=16, alpha=16,
                      learning_rate=1e-2, max_grad_norm=0))
    folders = {"--lpips": tmp_path / "lpips", "--clip": write_tiny_clip(tmp_path / "clip"),
               "--dino": write_tiny_dino(tmp_path / "dino"), "--judge": tmp_path / "vlm"}
    write_tiny_lpips(folders["--lpips"])
    write_tiny_qwen_vl(folders["--judge"])
    args = ["eval", "--model", str(tiny_diffusers), "--run", str(run), "--dataset", str(two_pairs), "--height", "32",
            "--width", "32", "--steps", "4", "--cfg", "1", "--dtype", "float32"]
    assert main(args + [x for flag, folder in folders.items() for x in (flag, str(folder))]) == 0

    rows = _rows(run / "eval" / "metrics.csv")
    assert [(r["checkpoint"], r["step"]) for r in rows] == [("base", ""), ("step-000015", "15"), ("final", "30")]
    columns = list(rows[0])
    assert columns[:2] == ["checkpoint", "step"] and {"loss", "loss_q10", "loss_q90", "psnr", "ssim", "lpips",
                                                     "clip_image", "clip_text_direction", "dino", "source_ssim",
                                                     "source_dino", "judge_unparsed"} <= set(columns)
    base, final = rows[0], rows[-1]
    assert float(final["loss"]) < float(base["loss"]) / LOSS_RATIO, (base["loss"], final["loss"])
    assert float(final["psnr"]) > float(base["psnr"]) + PSNR_MARGIN, (base["psnr"], final["psnr"])
    judged = _rows(run / "eval" / "judge.csv")
    assert len(judged) == 3 * 2  # every (checkpoint, pair) judged; unreadable answers counted, never fatal
    for row in rows:
        unparsed = sum(1 for j in judged if j["checkpoint"] == row["checkpoint"] for s in ("instruction", "quality")
                       if j[s] == "")
        assert float(row["judge_unparsed"]) == unparsed

    grid = Image.open(run / "eval" / "grid.png").convert("RGB")
    from chronoedit_lora.eval.figures import GRID_CELL

    assert grid.size == (GRID_CELL * 5, LABEL_HEIGHT + GRID_CELL * 2)  # input, target, base, 2 LoRAs x 2 pairs
    source = EditPairDataset(two_pairs, 32, 32)[0]["video"][:, 0]
    from chronoedit_lora.video import tensor_to_pil

    expected = tensor_to_pil(source).resize((GRID_CELL, GRID_CELL), Image.Resampling.NEAREST)
    assert list(grid.crop((0, LABEL_HEIGHT, GRID_CELL, LABEL_HEIGHT + GRID_CELL)).getdata()) == list(expected.getdata())
    for column in range(5):  # each column is labelled
        assert min(grid.convert("L").crop((column * GRID_CELL, 0, (column + 1) * GRID_CELL, LABEL_HEIGHT)).getdata()) < 128
    plot = np.asarray(Image.open(run / "eval" / "metrics.png").convert("RGB"))
    from chronoedit_lora.train.state.loss_plot import MARK

    assert (plot == MARK).all(axis=2).sum() > 20  # the best of each metric is ringed
    card = (run / "README.md").read_text()
    assert "## Evaluation" in card and "| final | 30 |" in card and card.index("## Evaluation") < card.index("## Use")


def test_best_per_metric_and_the_overall_pick():
    checkpoints = [Checkpoint("base", None, None), Checkpoint("step-000010", None, 10), Checkpoint("step-000020", None, 20),
                   Checkpoint("final", None, 30)]
    table = {"base": {"loss": 2.0, "psnr": 9.0, "source_ssim": 0.9},
             "step-000010": {"loss": 1.5, "psnr": 11.0, "source_ssim": 0.5},
             "step-000020": {"loss": 1.2, "psnr": 10.0, "source_ssim": 0.4},
             "final": {"loss": 1.2, "psnr": 8.0, "source_ssim": 0.3}}
    assert best_per_metric(checkpoints, table) == {"loss": "step-000020", "psnr": "step-000010"}  # tie: the earlier
    # ranks (loss, psnr): step-10 (3, 1), step-20 (1, 2), final (1, 3): mean 2, 1.5, 2
    assert overall_pick(checkpoints, table) == ("step-000020", 1.5, ["loss", "psnr"])
    text = metrics_csv(checkpoints, table)
    assert text.splitlines()[:2] == ["checkpoint,step,loss,psnr,source_ssim", "base,,2,9,0.9"]


def test_checkpoints_of_a_run_and_of_files(tmp_path):
    from chronoedit_lora.lora import LoraModule, save_lora

    weights = {"blocks.0.self_attn.q": LoraModule(torch.zeros(2, 8), torch.zeros(8, 2), 2.0)}
    for name, step in (("lora-step000005.safetensors", "5"), ("lora-step000010.safetensors", "10"),
                       ("lora.safetensors", "10"), ("other.safetensors", None)):
        save_lora(weights, tmp_path / name, {"step": step} if step else {})
    found = find_checkpoints(tmp_path, [])
    # the step-10 file holds the final LoRA's weights: listed once, as final
    assert [(c.label, c.step) for c in found] == [("base", None), ("step-000005", 5), ("final", 10)]
    files = find_checkpoints(None, [str(tmp_path / "other.safetensors"), str(tmp_path / "lora-step000005.safetensors")])
    assert [(c.label, c.step) for c in files] == [("base", None), ("other", None), ("lora-step000005", 5)]
    with pytest.raises(ChronoEditError, match="not both"):
        find_checkpoints(tmp_path, [str(tmp_path / "other.safetensors")])
    with pytest.raises(ChronoEditError, match="--lora .*missing.safetensors: file not found"):
        find_checkpoints(None, [str(tmp_path / "missing.safetensors")])


def test_bad_input_is_refused_before_any_model_loads(tmp_path, held_out, capsys):
    model = tmp_path / "no-model"  # never read: every error comes first
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"not a safetensors file")
    common = ["eval", "--model", str(model), "--dataset", str(held_out), "--output", str(tmp_path / "out")]
    for extra, message in ((["--lora", str(lora)], "not a readable safetensors file"),
                           (["--run", str(tmp_path)], "no lora-stepNNNNNN.safetensors"),
                           (["--run", str(tmp_path / "nope")], "--run .*nope: not a folder"),
                           (["--lora", str(lora), "--run", str(tmp_path)], "not both")):
        assert main(common + extra) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and re.search(message, error), error
    for key, value, message in (("eval_every", "2", "eval_every needs eval_dataset"),
                                ("keep_best", "psnr", "keep_best = 'psnr' needs eval_every")):
        with pytest.raises(ChronoEditError, match=message):
            tiny_config(model, held_out, tmp_path / "run", **{key: value})
    with pytest.raises(ChronoEditError, match="keep_best 'psnr' is not one of 'loss'"):
        tiny_config(model, held_out, tmp_path / "run", eval_every=2, eval_dataset=held_out, eval_steps=0, keep_best="psnr")


@pytest.mark.slow
def test_eval_during_training_keeps_the_best_lora_exactly_across_resume(tiny_diffusers, two_pairs, held_out, tmp_path):
    common = dict(save_every=2, eval_every=2, eval_dataset=held_out, eval_count=2, eval_steps=2, keep_best="psnr", seed=5)
    straight = tmp_path / "straight"
    train(tiny_config(tiny_diffusers, two_pairs, straight, max_steps=6, **common))
    split = tmp_path / "split"
    train(tiny_config(tiny_diffusers, two_pairs, split, max_steps=4, **common))
    # what an abandoned continuation could leave (written in place, as a copy over it would): the checkpoint's wins
    (split / "lora-best.safetensors").write_bytes(b"a later best of an abandoned run")
    train(tiny_config(tiny_diffusers, two_pairs, split, max_steps=6, resume=True, **common))

    logs = {run: _rows(run / "logs" / "metrics.csv") for run in (straight, split)}
    evaluated = [int(r["step"]) for r in logs[straight] if r["eval/loss"]]
    assert evaluated == [2, 4, 6] and [int(r["step"]) for r in logs[split] if r["eval/psnr"]] == evaluated
    for a, b in zip(logs[straight], logs[split]):
        for column in ("eval/loss", "eval/loss_q50", "eval/psnr", "eval/ssim"):
            assert (a[column] == "") == (b[column] == "")
            if a[column]:
                assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-4)
    bests = [json.loads((run / "checkpoints" / "step-000006" / "progress.json").read_text())["best"]
             for run in (straight, split)]
    assert bests[0]["metric"] == "psnr" and bests[0]["step"] == bests[1]["step"]
    assert bests[0]["value"] == pytest.approx(bests[1]["value"], rel=1e-4)
    psnrs = {int(r["step"]): float(r["eval/psnr"]) for r in logs[straight] if r["eval/psnr"]}
    assert bests[0]["value"] == pytest.approx(max(psnrs.values()), rel=1e-5) and psnrs[bests[0]["step"]] == max(psnrs.values())
    best, metadata = load_lora(split / "lora-best.safetensors")
    same_step, _ = load_lora(straight / f"lora-step{bests[0]['step']:06d}.safetensors")
    assert metadata["step"] == str(bests[0]["step"])
    assert max((best[k].up - same_step[k].up).abs().max().item() for k in best) <= RESUME_ATOL
    loss_png = np.asarray(Image.open(straight / "loss.png").convert("RGB"))
    assert (loss_png == COLOURS[HELD_OUT]).all(axis=2).sum() > 10  # the held-out loss is drawn
