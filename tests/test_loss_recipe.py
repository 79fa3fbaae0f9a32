"""The loss recipe's options (chronoedit_lora/train/objective/loss.py): timestep draws against their
target distributions, the per-latent weights against a hand-computed weighted MSE, the change map,
and the settings' refusals."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.models.rope import chronoedit_model_fn
from chronoedit_lora.train.loop.config import DEFAULT_TARGETS, load_config
from chronoedit_lora.train.loop.inputs import CHANGE_THRESHOLD, change_map, training_inputs
from chronoedit_lora.train.objective.loss import (LossRecipe, draw_timestep, flow_matching_loss, latent_weights,
                                                  training_schedule)

DRAWS = 20_000
KS_P = 0.01  # the threshold: a sampler that draws from its target passes 99% of the time per seed


def _draws(recipe: LossRecipe, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    scheduler, generator = training_schedule(), torch.Generator().manual_seed(seed)
    timesteps, sigmas = zip(*(draw_timestep(scheduler, recipe, generator) for _ in range(DRAWS)))
    return torch.cat(timesteps).double(), torch.cat(sigmas).double()


@pytest.mark.parametrize("timestep_range", [(0.0, 1000.0), (200.0, 700.0)])
def test_uniform_draws_every_timestep_of_the_range_equally(timestep_range):
    scheduler = training_schedule()
    timesteps, sigmas = _draws(LossRecipe(timestep_range=timestep_range))
    low, high = timestep_range
    assert timesteps.min() >= low and timesteps.max() <= high
    grid = scheduler.timesteps.double()
    allowed = torch.nonzero((grid >= low) & (grid <= high)).flatten()
    index = torch.tensor([torch.argmin((grid - t).abs()).item() for t in timesteps])
    assert torch.equal(grid[index], timesteps)  # on the shifted grid, with the grid's own sigma
    assert torch.equal(scheduler.sigmas.double()[index], sigmas)
    first, count = allowed[0].item(), len(allowed)
    position = (index - first + 0.5) / count  # the discrete uniform over the allowed indices, on (0, 1)
    assert stats.kstest(position.numpy(), "uniform").pvalue > KS_P
    assert stats.kstest(position.numpy() ** 1.05, "uniform").pvalue < KS_P  # the test can tell a skewed draw


@pytest.mark.parametrize("recipe, mean, std", [
    (LossRecipe(timestep_sampling="logit_normal", timestep_mean=0.5, timestep_std=1.2), 0.5, 1.2),
    (LossRecipe(timestep_sampling="logit_normal", timestep_mean=-0.3, timestep_std=0.8, timestep_range=(100.0, 900.0)),
     -0.3, 0.8),
    (LossRecipe(timestep_sampling="sigmoid", timestep_scale=1.5), 0.0, 1.5),
    (LossRecipe(timestep_sampling="sigmoid", timestep_scale=1.0, timestep_range=(300.0, 1000.0)), 0.0, 1.0),
])
def test_logit_normal_and_sigmoid_draws_match_their_distribution(recipe, mean, std):
    timesteps, sigmas = _draws(recipe)
    low, high = recipe.timestep_range
    assert timesteps.min() >= low and timesteps.max() <= high
    assert torch.allclose(timesteps, 1000 * sigmas, rtol=1e-6)  # t = 1000 sigma, float32
    logits = torch.logit(sigmas).numpy()
    a, b = ((math.log(edge / (1000 - edge)) if 0 < edge < 1000 else math.copysign(math.inf, edge - 500)) for edge in
            (low, high))
    target = stats.truncnorm((a - mean) / std, (b - mean) / std, loc=mean, scale=std)
    assert stats.kstest(logits, target.cdf).pvalue > KS_P
    off = mean + 0.1 * std
    shifted = stats.truncnorm((a - off) / std, (b - off) / std, loc=off, scale=std)
    assert stats.kstest(logits, shifted.cdf).pvalue < KS_P  # a mean 0.1 std off is detected


def test_draws_are_a_function_of_the_seed():
    recipe = LossRecipe(timestep_sampling="logit_normal")
    scheduler = training_schedule()
    first, again, other = (draw_timestep(scheduler, recipe, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])


def _square_clip(frames: int, size: int, start: int) -> torch.Tensor:
    """A grey clip whose frames from ``start`` on hold a white 16x16 square at pixels 8..23 (cells 1-2)."""
    video = torch.zeros(3, frames, size, size)
    video[:, start:, 8:24, 8:24] = 1.0
    return video


def test_the_change_map_marks_the_edited_cells_and_blurs_their_edge():
    change = change_map(_square_clip(5, 48, 1))[0, 0]  # a pair: [src, tgt x 4] -> 2 latent frames of 6x6 cells
    assert change.shape == (2, 6, 6)
    assert change[0].abs().max() == 0  # the input frame never differs from itself
    assert torch.equal(change[1, 1:3, 1:3], torch.ones(2, 2))  # the square's cells (and their 3x3 boxes)
    assert change[1, 5, 5] == 0 and change[1, 0, 5] == 0  # far from it
    assert change[1, 0, 0] == pytest.approx(1 / 4)  # a corner cell: 1 of its 4 in-image neighbours changed
    assert change[1, 3, 1] == pytest.approx(2 / 9)
    faint = _square_clip(5, 48, 1) * (CHANGE_THRESHOLD * 2 * 0.9)  # below the threshold: no change
    assert change_map(faint).abs().max() == 0


def test_a_trajectory_gets_its_change_map_frame_by_frame():
    change = change_map(_square_clip(29, 32, 10))[0, 0]  # 8 latents: frame 0, then frames 1-4, 5-8, 9-12, ...
    assert change.shape == (8, 4, 4)
    assert [change[k, 1, 1].item() for k in range(8)] == [0, 0, 0, 1, 1, 1, 1, 1]


@pytest.fixture(scope="module")
def pair(tiny_diffusers):
    from chronoedit_lora.data import EditPairDataset
    from chronoedit_lora.pipeline import ChronoEditPipeline

    from .test_train import EXAMPLE

    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    item = EditPairDataset(EXAMPLE / "metadata.csv", 32, 32)[0]
    return pipe, training_inputs(pipe, item["video"], item["prompt"])


def test_the_weighted_loss_is_the_hand_computed_weighted_mse(pair):
    from chronoedit_lora.train.objective.lora_module import LoraTrainingModule

    pipe, inputs = pair
    recipe = LossRecipe(change_weight=4.0, input_frame_weight=0.25, loss_weighting="none")
    module = LoraTrainingModule(pipe, 8, 8.0, DEFAULT_TARGETS, gradient_checkpointing=False, recipe=recipe)
    change = inputs["change"]
    assert 0 < change.mean() < 1  # the example pair changes part of the image
    loss = module(inputs, noise_seed=11)
    # by hand: DiffSynth's draw from the same seed, then sum(w (v - target)^2) / sum(w) over every element
    generator = torch.Generator().manual_seed(11)
    scheduler = training_schedule()
    index = torch.randint(0, 1000, (1,), generator=generator)
    x0 = inputs["input_latents"]
    noise = torch.randn(x0.shape, generator=generator)
    sigma = scheduler.sigmas[index]
    conditioning = {k: v for k, v in inputs.items() if k not in ("input_latents", "change")}
    with torch.no_grad():
        velocity = chronoedit_model_fn(pipe.dit, (1 - sigma) * x0 + sigma * noise, scheduler.timesteps[index],
                                       skip_len=pipe.components.temporal_skip_len, rope=pipe.rope, **conditioning)
    squared = (velocity - (noise - x0)).square()  # (1, 16, 2, 4, 4)
    total, weight_sum = 0.0, 0.0
    for c in range(squared.shape[1]):
        for f in range(squared.shape[2]):
            for i in range(squared.shape[3]):
                for j in range(squared.shape[4]):
                    w = (1 + 3.0 * change[0, 0, f, i, j].item()) * (0.25 if f == 0 else 1.0)
                    total += w * squared[0, c, f, i, j].item()
                    weight_sum += w
    assert loss.item() == pytest.approx(total / weight_sum, rel=1e-5)  # float32 sums vs Python's float64
    plain = torch.nn.functional.mse_loss(velocity, noise - x0).item()
    assert abs(loss.item() - plain) > 1e-3 * plain  # the weights did change the loss


def test_with_input_frame_weight_0_no_gradient_flows_from_the_input_frame(pair):
    pipe, inputs = pair
    x0, scheduler = inputs["input_latents"], training_schedule()
    conditioning = {k: v for k, v in inputs.items() if k not in ("input_latents", "change")}
    predictions = []

    def predict(latents, t):
        out = chronoedit_model_fn(pipe.dit, latents.requires_grad_(True), t, skip_len=pipe.components.temporal_skip_len,
                                  rope=pipe.rope, **conditioning)
        out.retain_grad()
        predictions.append(out)
        return out

    timestep = scheduler.timesteps[400:401]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for weight in (0.0, 1.0):
        recipe = LossRecipe(input_frame_weight=weight, change_weight=2.0)
        flow_matching_loss(scheduler, predict, x0, noise, timestep,
                           weights=latent_weights(inputs["change"], recipe, x0.shape)).backward()
    (zero, one) = (p.grad for p in predictions)
    assert zero[:, :, 0].abs().max() == 0 and zero[:, :, 1].abs().max() > 0
    assert one[:, :, 0].abs().max() > 0


def test_defaults_use_the_plain_mse():
    assert latent_weights(None, LossRecipe(), torch.Size([1, 16, 2, 4, 4])) is None


@pytest.mark.parametrize("key, value, says", [
    ("timestep_sampling", "logitnormal", "did you mean 'logit_normal'"),
    ("loss_weighting", "min_snr", "not one of 'diffsynth', 'none'"),
    ("timestep_std", "nan", "timestep_std must be a finite number"),
    ("timestep_std", "0", "timestep_std must be > 0"),
    ("timestep_scale", "-1", "timestep_scale must be > 0"),
    ("timestep_mean", "inf", "timestep_mean must be a finite number"),
    ("timestep_range", "900,100", "timestep_range's high must be > 900"),
    ("timestep_range", "0,1200", "timestep_range's high must be > 0 and <= 1000"),
    ("timestep_range", "-5,500", "timestep_range's low must be >= 0"),
    ("timestep_range", "100", "timestep_range must be [low, high]"),
    ("timestep_range", "a,b", "cannot read"),
    ("change_weight", "-2", "change_weight must be >= 0"),
    ("change_weight", "nan", "change_weight must be a finite number"),
    ("input_frame_weight", "-0.5", "input_frame_weight must be >= 0"),
])
def test_bad_recipe_settings_are_refused_in_one_line(tmp_path, key, value, says):
    with pytest.raises(ChronoEditError) as error:
        load_config(None, {"model": str(tmp_path / "no-model"), "dataset": str(tmp_path / "none.csv"), key: value})
    assert says in str(error.value) and "\n" not in str(error.value)


def test_a_uniform_range_between_two_timesteps_of_the_grid_is_refused(tmp_path):
    grid = training_schedule(5.0).timesteps
    low, high = grid[1].item() + 0.01, grid[0].item() - 0.01  # between the two largest timesteps
    with pytest.raises(ChronoEditError, match="holds none of the shifted schedule's timesteps"):
        load_config(None, {"timestep_range": f"{low},{high}"})
