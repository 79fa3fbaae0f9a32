"""Trajectory rows: a video or frame folder of the edit happening trains the 29-frame reasoning clip."""

from __future__ import annotations

import csv
import math
import shutil
from fractions import Fraction
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from diffusers import ChronoEditTransformer3DModel
from PIL import Image

from chronoedit_lora.data import EditPairDataset, check_dataset, has_fatal, read_metadata
from chronoedit_lora.data.buckets import plan_crop
from chronoedit_lora.data.trajectories import load_trajectory, resample_indices
from chronoedit_lora.lora import fuse_lora, load_lora
from chronoedit_lora.models.rope import chronoedit_model_fn
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.train.loop.data import TrainingData
from chronoedit_lora.train.loop.inputs import BATCHED_VAE_MAX_PIXELS, encode_clip
from chronoedit_lora.train.objective.lora_module import LoraTrainingModule
from chronoedit_lora.train.objective.loss import validation_loss
from chronoedit_lora.train.loop.trainer import cache_conditioning, train
from chronoedit_lora.video import REASONING_FRAMES, to_tensor

from .test_dit import PARITY_RTOL
from .test_train import RESUME_ATOL, tiny_config

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "example_dataset"
COLUMNS = ["input_image", "edited_image", "trajectory", "prompt"]


def make_mixed(folder: Path, pairs: int, trajectories: int) -> Path:
    """The first ``pairs`` pairs and ``trajectories`` trajectories of the example, in their own folder."""
    rows = list(csv.DictReader((EXAMPLE / "with_trajectories.csv").open()))
    chosen = [r for r in rows if not r["trajectory"]][:pairs] + [r for r in rows if r["trajectory"]][:trajectories]
    for row in chosen:
        for column in ("input_image", "edited_image", "trajectory"):
            if row[column]:
                copy = shutil.copytree if (EXAMPLE / row[column]).is_dir() else shutil.copy
                (folder / row[column]).parent.mkdir(parents=True, exist_ok=True)
                copy(EXAMPLE / row[column], folder / row[column])
    return write_csv(folder / "metadata.csv", chosen)


def write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_frames(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i}.png")
    return frames


def test_resampling_keeps_the_ends_and_picks_the_nearest_frames():
    for count in (3, 9, 28, 29, 30, 100, 1000):
        expected = [math.floor(Fraction(i * (count - 1), REASONING_FRAMES - 1) + Fraction(1, 2))
                    for i in range(REASONING_FRAMES)]
        indices = resample_indices(count)
        assert indices == expected and indices[0] == 0 and indices[-1] == count - 1
        assert indices == sorted(indices) and len(set(indices)) == min(count, REASONING_FRAMES)
    assert resample_indices(29) == list(range(29))


def test_metadata_layouts_and_their_errors(tmp_path):
    write_frames(tmp_path / "walk", [(16, 16)] * 3)
    only = write_csv(tmp_path / "only.csv", [{"trajectory": "walk", "prompt": "Walk."}], ["trajectory", "prompt"])
    pairs, problems = read_metadata(only)
    assert not problems and pairs[0].is_trajectory and pairs[0].input_image == tmp_path / "walk"
    assert pairs[0].columns == ("trajectory", "trajectory")

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    mixed = write_csv(tmp_path / "mixed.csv", [
        {"input_image": "a.png", "edited_image": "a.png", "prompt": "Pair."},
        {"trajectory": "walk", "prompt": "Trajectory."},
        {"input_image": "a.png", "trajectory": "walk", "prompt": "Both."},
        {"trajectory": "../outside", "prompt": "Out."},
        {"trajectory": "missing", "prompt": "Missing."}])
    pairs, problems = read_metadata(mixed)
    assert [p.kind for p in pairs] == ["pair", "trajectory"]
    fatal = {(p.row, p.column): p for p in problems if p.fatal}
    assert set(fatal) == {(4, "input_image"), (5, "trajectory"), (6, "trajectory")}
    assert "fills both 'trajectory' and 'input_image'" in fatal[4, "input_image"].reason
    assert "outside the dataset folder" in fatal[5, "trajectory"].reason
    assert "not found" in fatal[6, "trajectory"].reason

    misspelt = write_csv(tmp_path / "misspelt.csv", [{"trajectroy": "walk", "prompt": "x"}], ["trajectroy", "prompt"])
    problems = read_metadata(misspelt)[1]
    assert any("did you mean 'trajectory'" in p.reason for p in problems)


def test_check_names_each_bad_trajectory_with_its_row_and_fix(tmp_path):
    write_frames(tmp_path / "good", [(32, 32)] * 4)
    write_frames(tmp_path / "short", [(32, 32)] * 2)
    write_frames(tmp_path / "resized", [(32, 32), (32, 32), (48, 32)])
    write_frames(tmp_path / "truncated", [(32, 32)] * 3)
    data = (tmp_path / "truncated" / "1.png").read_bytes()
    (tmp_path / "truncated" / "1.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    names = ["good", "short", "resized", "truncated", "empty", "broken.mp4"]
    csv_path = write_csv(tmp_path / "metadata.csv", [{"trajectory": n, "prompt": "x"} for n in names],
                         ["trajectory", "prompt"])
    problems = check_dataset(csv_path, max_pixels=4096)
    fatal = {p.row: p for p in problems if p.fatal}
    assert sorted(fatal) == [3, 4, 5, 6, 7] and all(p.column == "trajectory" for p in fatal.values())
    assert "2 frame(s); a trajectory needs at least 3" in fatal[3].reason and "input_image/edited_image" in fatal[3].fix
    assert "frames change size (2.png is 48x32, 0.png is 32x32)" in fatal[4].reason and "one size" in fatal[4].fix
    assert fatal[5].reason.startswith("truncated/1.png") and "Re-export" in fatal[5].fix
    assert "holds no image files" in fatal[6].reason
    assert "not a readable video" in fatal[7].reason and "frame" in fatal[7].fix
    assert check_dataset(csv_path, max_pixels=4096) == problems  # remembered verdicts say the same


def test_video_trajectory_is_resampled_from_its_frames(tmp_path):
    frames = [np.full((32, 48, 3), v, np.uint8) for v in np.linspace(0, 250, 12).astype(np.uint8)]
    imageio.mimwrite(tmp_path / "fade.mp4", frames, fps=8, macro_block_size=16)
    decoded = [np.asarray(f) for f in imageio.mimread(tmp_path / "fade.mp4")]
    loaded, problems = load_trajectory(tmp_path / "fade.mp4", 2, "trajectory")
    assert not problems and len(loaded) == REASONING_FRAMES and loaded[0].size == (48, 32)
    for image, source in zip(loaded, resample_indices(len(decoded))):
        assert np.array_equal(np.asarray(image), decoded[source])


def test_dataset_item_is_the_resampled_cropped_clip(tmp_path):
    sizes = [(80, 48)] * 5
    frames = write_frames(tmp_path / "walk", sizes)
    csv_path = write_csv(tmp_path / "metadata.csv", [{"trajectory": "walk", "prompt": "Walk."}], ["trajectory", "prompt"])
    dataset = EditPairDataset(csv_path, max_pixels=4096, trajectory_max_pixels=1024)
    item = dataset[0]
    target = dataset.sizes[0]
    assert target[0] * target[1] <= 1024 and item["kind"] == "trajectory"
    assert item["video"].shape == (3, REASONING_FRAMES, target[1], target[0])
    plan = plan_crop(sizes[0], target)
    for i, source in enumerate(resample_indices(len(frames))):
        assert torch.equal(item["video"][:, i], to_tensor(plan.apply(Image.fromarray(frames[source]))))


@pytest.fixture(scope="module")
def pipe(tiny_diffusers):
    return ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)


@pytest.fixture(scope="module")
def trajectory_item(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one-trajectory")
    return EditPairDataset(make_mixed(folder, 0, 1), 32, 32, trajectory_max_pixels=1024)[0]


def test_dit_inputs_of_a_trajectory_match_diffusers(tiny_diffusers, pipe, trajectory_item):
    """Latents of 8 frames, y = [mask on latent 0, VAE(input + 28 blank frames)], positions 0..7:
    diffusers' ChronoEditTransformer3DModel gives the same output on these inputs."""
    inputs = encode_clip(pipe, trajectory_item["video"], trajectory_item["prompt"])
    x0, y = inputs["input_latents"], inputs["y"]
    assert x0.shape[:3] == (1, 16, 8) and y.shape[:3] == (1, 20, 8) and x0.shape[3:] == (4, 4)
    assert torch.equal(y[:, :4, 0], torch.ones_like(y[:, :4, 0])) and not y[:, :4, 1:].any()
    # the "black" frames are zeros of the [-1, 1] pixel range, as at inference in DiffSynth and diffusers
    blank = torch.cat([trajectory_item["video"][:, :1], torch.zeros(3, REASONING_FRAMES - 1, 32, 32)], dim=1)
    condition = pipe.components.vae.encode([blank], device="cpu")
    assert (y[:, 4:] - condition).abs().max().item() <= 1e-5

    reference = ChronoEditTransformer3DModel.from_pretrained(tiny_diffusers / "transformer", torch_dtype=torch.float32).eval()
    noisy = 0.5 * x0 + 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    with torch.no_grad():
        expected = reference(torch.cat([noisy, y], 1), t, inputs["context"], inputs["clip_feature"], return_dict=False)[0]
        ours = chronoedit_model_fn(pipe.dit, noisy, t, skip_len=pipe.components.temporal_skip_len,
                                   context=inputs["context"], clip_feature=inputs["clip_feature"], y=y)
    scale = expected.abs().max().item()
    assert scale > 0.1 and (ours - expected).abs().max().item() <= PARITY_RTOL * scale


def test_trajectory_loss_is_the_objective_by_hand(tiny_diffusers, pipe, trajectory_item):
    inputs = encode_clip(pipe, trajectory_item["video"], trajectory_item["prompt"])
    fresh = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32, encoders=False)
    module = LoraTrainingModule(fresh, 4, 4.0, ["q", "k"])  # LoRA up weights start at zero: the base's loss
    torch.manual_seed(3)
    loss = module(inputs)
    torch.manual_seed(3)  # the module's draws: a timestep index, then the noise
    index = torch.randint(0, 1000, (1,)).item()
    x0 = inputs["input_latents"]
    noise = torch.randn_like(x0)
    scheduler = module.scheduler
    sigma, t = scheduler.sigmas[index].item(), scheduler.timesteps[index].reshape(1)
    with torch.no_grad():
        velocity = chronoedit_model_fn(pipe.dit, (1 - sigma) * x0 + sigma * noise, t,
                                       context=inputs["context"], clip_feature=inputs["clip_feature"], y=inputs["y"])
    by_hand = ((velocity - (noise - x0)) ** 2).mean() * scheduler.linear_timesteps_weights[index]
    assert x0.shape[2] == 8 and 0 < sigma < 1
    assert abs(loss.item() - by_hand.item()) <= 1e-5 * by_hand.item()


def test_overfitting_one_trajectory_lowers_its_loss_and_changes_the_reasoning_frames(tiny_diffusers, tmp_path):
    dataset = make_mixed(tmp_path / "one", 0, 1)
    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    item = EditPairDataset(dataset, 32, 32, trajectory_max_pixels=1024)[0]
    before = validation_loss(pipe, [item])
    result = train(tiny_config(tiny_diffusers, dataset, tmp_path / "run", max_steps=150, save_every=1000, rank=16,
                               alpha=16, max_grad_norm=0, cache=True, trajectory_max_pixels=1024))
    from chronoedit_lora.video import tensor_to_pil

    source = tensor_to_pil(item["video"][:, 0])
    settings = dict(steps=3, cfg=1.0, height=32, width=32, temporal_reasoning_steps=3, progress=False)
    base = pipe(source, item["prompt"], **settings).video
    fuse_lora(pipe.dit, load_lora(result.lora)[0])
    after = validation_loss(pipe, [item])
    trained = pipe(source, item["prompt"], **settings).video
    # Measured on this tiny random base: 1.54 -> 0.89 (1.73x); no learning stays ~1.0x.
    assert after < before / 1.4, (before, after)
    assert base.shape[2] == REASONING_FRAMES
    assert (trained[:, :, 1:-4] - base[:, :, 1:-4]).abs().max() > 1e-2  # the reasoning frames moved


def test_batches_are_one_kind_and_the_share_holds(tmp_path):
    dataset = make_mixed(tmp_path / "mixed", 6, 3)
    natural = tiny_config(None, dataset, tmp_path / "run", batch_size=2, repeat=2, trajectory_max_pixels=1024)
    data = TrainingData(natural)
    kinds = data.dataset.kinds
    for epoch in range(3):
        batches = data.epoch_batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(kinds)))  # as the rows come
        assert all(len({kinds[i] for i in b}) == 1 for b in batches)
    for share in (0.25, 0.5, 0.8):
        data = TrainingData(tiny_config(None, dataset, tmp_path / "run", batch_size=2, repeat=2,
                                        trajectory_max_pixels=1024, trajectory_share=share))
        for epoch in range(3):
            batches = data.epoch_batches(epoch)
            assert len(batches) == len(TrainingData(natural).epoch_batches(epoch))
            assert all(len({kinds[i] for i in b}) == 1 for b in batches)
            trajectory_batches = sum(kinds[b[0]] == "trajectory" for b in batches)
            assert trajectory_batches == round(share * len(batches)), (share, epoch)
            assert batches == data.epoch_batches(epoch)  # deterministic, so resumable
    with pytest.raises(Exception, match="no trajectory rows"):
        TrainingData(tiny_config(None, make_mixed(tmp_path / "pairs", 2, 0), tmp_path / "run", trajectory_share=0.5))


def test_mixed_training_resumes_exactly_and_samples_the_reasoning_frames(tiny_diffusers, tmp_path):
    dataset = make_mixed(tmp_path / "mixed", 3, 2)
    common = dict(save_every=3, seed=4, trajectory_max_pixels=1024, trajectory_share=0.5, cache=True,
                  cache_dir=tmp_path / "cache")
    straight = train(tiny_config(tiny_diffusers, dataset, tmp_path / "straight", max_steps=6, sample_every=6,
                                 sample_steps=2, sample_count=2, **common))
    train(tiny_config(tiny_diffusers, dataset, tmp_path / "split", max_steps=3, **common))
    resumed = train(tiny_config(tiny_diffusers, dataset, tmp_path / "split", max_steps=6, resume=True, **common))
    a, b = load_lora(straight.lora)[0], load_lora(resumed.lora)[0]
    assert max((a[k].up - b[k].up).abs().max().item() for k in a) <= RESUME_ATOL
    samples = [r["samples"] for r in csv.DictReader((tmp_path / "straight" / "logs" / "metrics.csv").open())]
    assert any(int(s) >= 3 for row in samples for s in row.split()), samples  # trajectory items (3, 4) trained
    grid = np.asarray(Image.open(tmp_path / "straight" / "samples" / "step-000006.png").convert("L"))
    assert grid.shape[1] == 256 * 9  # input | edit | target | 6 reasoning frames
    cell = lambda row, column: grid[28 + 256 * row: 28 + 256 * (row + 1), 256 * column: 256 * (column + 1)]  # noqa: E731
    assert (cell(0, 4) == 255).all() and (cell(1, 4) != 255).any()  # pair row: no strip; trajectory row: frames


def test_cached_trajectories_are_reused_and_train_like_uncached(tiny_diffusers, tmp_path):
    dataset = make_mixed(tmp_path / "mixed", 1, 2)
    common = dict(max_steps=3, save_every=100, seed=2, trajectory_max_pixels=1024)
    plain = train(tiny_config(tiny_diffusers, dataset, tmp_path / "plain", **common))
    config = tiny_config(tiny_diffusers, dataset, tmp_path / "cached", cache=True, **common)
    assert cache_conditioning(config) == 3 and cache_conditioning(config) == 0
    from safetensors.torch import load_file

    latent_frames = sorted(load_file(str(p))["input_latents"].shape[2] for p in (tmp_path / "cached" / "cache").rglob("*.safetensors"))
    assert latent_frames == [2, 8, 8]
    cached = train(config)
    assert not cached.loaded_encoders
    a, b = load_lora(plain.lora)[0], load_lora(cached.lora)[0]
    assert max((a[k].up - b[k].up).abs().max().item() for k in a) <= 1e-6
    frame = next((tmp_path / "mixed" / "trajectories").rglob("04.png"))
    Image.open(frame).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(frame)
    assert cache_conditioning(config) == 1  # one frame of one trajectory changed: only its entry


def test_prepare_finds_trajectory_videos_and_frame_folders(tmp_path, capsys):
    from chronoedit_lora.cli import main

    source = tmp_path / "source"
    for name in ("before", "after"):
        (source / name).mkdir(parents=True)
        shutil.copy(EXAMPLE / name / "000.png", source / name / "000.png")
    shutil.copytree(EXAMPLE / "trajectories" / "000", source / "trajectories" / "sketching")
    (source / "trajectories" / "sketching" / "prompt.txt").write_text("Draw it in pencil, stroke by stroke.\n")
    frames = [np.full((32, 32, 3), v, np.uint8) for v in range(0, 240, 20)]
    imageio.mimwrite(source / "trajectories" / "fade.mp4", frames, fps=8, macro_block_size=16)
    assert main(["dataset", "prepare", str(source), "--prompt", "Sketch it."]) == 0
    assert "1 pairs (before/ + after/), 2 trajectories" in capsys.readouterr().out
    rows = list(csv.DictReader((source / "metadata.csv").open()))
    assert list(rows[0]) == ["input_image", "edited_image", "trajectory", "prompt"]
    assert [(r["trajectory"], r["prompt"]) for r in rows[1:]] == [
        ("trajectories/fade.mp4", "Sketch it."), ("trajectories/sketching", "Draw it in pencil, stroke by stroke.")]
    assert not has_fatal(check_dataset(source / "metadata.csv", max_pixels=4096))


@pytest.mark.parametrize("side", [32, 96])  # one batched VAE pass, two passes
@pytest.mark.parametrize("frames", [5, REASONING_FRAMES])
def test_training_conditioning_equals_the_edit_pipelines(pipe, frames, side):
    """Whether encode_clip batches the target and condition clips through the VAE or not, its y
    equals the one DiffSynth's VAE unit builds for an edit of that clip length, and its latents
    the VAE's own."""
    assert 32 * 32 <= BATCHED_VAE_MAX_PIXELS < 96 * 96
    levels = torch.randint(0, 256, (3, frames, side, side), generator=torch.Generator().manual_seed(frames))
    video = levels / 127.5 - 1  # 8-bit images, as the dataset gives them
    inputs = encode_clip(pipe, video, "Make it a sketch.")
    from chronoedit_lora.video import tensor_to_pil

    y = pipe.condition_latents(tensor_to_pil(video[:, 0]), frames)
    latents = pipe.components.vae.encode([video], device="cpu")
    assert inputs["y"].shape == y.shape and inputs["input_latents"].shape == latents.shape
    assert (inputs["y"] - y).abs().max().item() <= 1e-5 and (inputs["input_latents"] - latents).abs().max().item() <= 1e-5
