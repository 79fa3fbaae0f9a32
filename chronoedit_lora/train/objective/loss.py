"""The training objective, written out, with every recipe option in one place.

By default it is DiffSynth's Wan SFT flow-matching loss, built from DiffSynth's own scheduler
methods so the numbers stay DiffSynth's: for clean latents x0, noise eps and a timestep t with
noise level sigma(t) on the shifted schedule, x_t = (1 - sigma) x0 + sigma eps, the DiT predicts
the velocity, the target is eps - x0, and the MSE is weighted by DiffSynth's timestep weight (a
bump centred at t = 500, normalised); t is drawn uniformly from the 1000-step schedule.

The options (:class:`LossRecipe`, from the training settings): how t is drawn
(``timestep_sampling``: uniform over the shifted schedule, or a logit-normal / sigmoid noise
level, within ``timestep_range``), whether the timestep weight applies (``loss_weighting``), and a
per-latent weight (``change_weight`` on the latent cells the edit changed, from the pair's
:func:`~..loop.inputs.change_map`; ``input_frame_weight`` on the input frame's latents), which
makes the MSE a weighted mean. :func:`validation_loss` evaluates the plain objective, unweighted,
on a fixed grid with fixed noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffsynth.diffusion.flow_match import FlowMatchScheduler

from ...models.rope import chronoedit_model_fn
from ...pipeline import ChronoEditPipeline
from ..loop.inputs import encode_clip

if TYPE_CHECKING:
    from ..loop.config import TrainConfig

TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0
# Noise levels of the validation grid; each is evaluated at the nearest timestep of the schedule.
VALIDATION_SIGMAS = (0.2, 0.4, 0.6, 0.8)
# (noisy latents, timestep) -> predicted velocity
Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "sigmoid")
LOSS_WEIGHTINGS = ("diffsynth", "none")


@dataclass(frozen=True)
class LossRecipe:
    """The loss options of a run (the training settings of the same names); the defaults are
    DiffSynth's recipe."""

    timestep_sampling: str = "uniform"
    timestep_mean: float = 0.0  # logit_normal: mean of logit(sigma)
    timestep_std: float = 1.0  # logit_normal: standard deviation of logit(sigma)
    timestep_scale: float = 1.0  # sigmoid: sigma = sigmoid(scale * N(0, 1))
    timestep_range: tuple[float, float] = (0.0, float(TRAIN_TIMESTEPS))
    loss_weighting: str = "diffsynth"
    change_weight: float = 1.0
    input_frame_weight: float = 1.0
    preservation_weight: float = 1.0

    @classmethod
    def of(cls, config: TrainConfig) -> LossRecipe:
        """The recipe of a :class:`~..loop.config.TrainConfig`."""
        low, high = config.timestep_range
        return cls(config.timestep_sampling, config.timestep_mean, config.timestep_std, config.timestep_scale,
                   (float(low), float(high)), config.loss_weighting, config.change_weight, config.input_frame_weight,
                   config.preservation_weight)

    def logit_normal(self) -> tuple[float, float]:
        """(mean, std) of logit(sigma) for the continuous samplings (sigmoid is logit-normal with mean 0)."""
        if self.timestep_sampling == "sigmoid":
            return 0.0, self.timestep_scale
        return self.timestep_mean, self.timestep_std


def grid_indices(scheduler: FlowMatchScheduler, timestep_range: tuple[float, float]) -> torch.Tensor:
    """Indices of the schedule's timesteps inside ``timestep_range`` (inclusive)."""
    low, high = timestep_range
    return torch.nonzero((scheduler.timesteps >= low) & (scheduler.timesteps <= high)).flatten()


def draw_timestep(scheduler: FlowMatchScheduler, recipe: LossRecipe,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One training timestep and its noise level sigma (float32, shape (1,)), drawn from ``generator``.

    uniform: an index of the shifted schedule, uniformly among those inside ``timestep_range``
    (the whole range: DiffSynth's draw, the same random numbers). logit_normal / sigmoid: sigma
    itself, logit(sigma) ~ N(mean, std) truncated to ``timestep_range`` / 1000 (inverse-CDF
    sampling, so one uniform number per draw), and t = 1000 sigma, off the grid: ``shift`` does
    not apply.
    """
    if recipe.timestep_sampling == "uniform":
        if recipe.timestep_range == (0.0, float(TRAIN_TIMESTEPS)):
            index = torch.randint(0, len(scheduler.timesteps), (1,), generator=generator)
        else:
            allowed = grid_indices(scheduler, recipe.timestep_range)
            index = allowed[torch.randint(0, len(allowed), (1,), generator=generator)]
        return scheduler.timesteps[index], scheduler.sigmas[index]
    mean, std = recipe.logit_normal()
    low, high = (_normal_cdf((_logit(edge / TRAIN_TIMESTEPS) - mean) / std) for edge in recipe.timestep_range)
    u = low + (high - low) * torch.rand((1,), generator=generator, dtype=torch.float64)
    sigma = torch.sigmoid(mean + std * torch.special.ndtri(u)).clamp(recipe.timestep_range[0] / TRAIN_TIMESTEPS,
                                                                      recipe.timestep_range[1] / TRAIN_TIMESTEPS)
    return (sigma * TRAIN_TIMESTEPS).float(), sigma.float()


def _logit(p: float) -> float:
    return math.log(p / (1 - p)) if 0 < p < 1 else (-math.inf if p <= 0 else math.inf)


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def latent_weights(change: torch.Tensor | None, recipe: LossRecipe, shape: torch.Size) -> torch.Tensor | None:
    """The per-latent weight (B, 1, F, h, w): ``change_weight`` where the edit changed the latents
    (``change`` in [0, 1], soft at the edges: 1 + (change_weight - 1) change), times
    ``input_frame_weight`` on latent frame 0; None when both are 1 (the plain MSE)."""
    if recipe.change_weight == 1 and recipe.input_frame_weight == 1:
        return None
    weights = torch.ones((shape[0], 1, *shape[2:]))
    if recipe.change_weight != 1:
        weights = weights + (recipe.change_weight - 1) * change.float().cpu()
    weights[:, :, 0] *= recipe.input_frame_weight
    return weights


def training_schedule(shift: float = DEFAULT_SHIFT) -> FlowMatchScheduler:
    """DiffSynth's Wan schedule of 1000 training timesteps, with its training weights."""
    scheduler = FlowMatchScheduler("Wan")
    scheduler.set_timesteps(TRAIN_TIMESTEPS, training=True, shift=shift)
    return scheduler


def noised(scheduler: FlowMatchScheduler, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor,
           sigma: torch.Tensor | None = None) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise, sigma the schedule's at ``timestep`` (None) or the one given."""
    if sigma is None:
        return scheduler.add_noise(x0, noise, timestep)
    sigma = sigma.to(x0.device, x0.dtype).reshape(())
    return (1 - sigma) * x0 + sigma * noise


def preservation_loss(predict: Predictor, adapters_off: Callable[[], AbstractContextManager], noisy: torch.Tensor,
                      timestep: torch.Tensor) -> torch.Tensor:
    """The MSE between the adapted DiT's prediction and the frozen base's (``adapters_off``, no
    gradient) on the same noisy latents at the same timestep: 0 while the adapter changes nothing."""
    with torch.no_grad(), adapters_off():
        base = predict(noisy, timestep).float()
    return torch.nn.functional.mse_loss(predict(noisy, timestep).float(), base)


def flow_matching_loss(scheduler: FlowMatchScheduler, predict: Predictor, x0: torch.Tensor, noise: torch.Tensor,
                       timestep: torch.Tensor, weighted: bool = True, sigma: torch.Tensor | None = None,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """The flow-matching MSE at one timestep (times DiffSynth's timestep weight if ``weighted``).

    ``sigma``: the noise level of an off-grid ``timestep`` (None: the schedule's, at the nearest
    timestep); ``weights``: per-latent weights broadcast over the channels (:func:`latent_weights`),
    which make the MSE the weighted mean sum(w (v - target)^2) / sum(w).
    """
    target = scheduler.training_target(x0, noise, timestep)  # noise - x0
    prediction = predict(noised(scheduler, x0, noise, timestep, sigma), timestep).float()
    if weights is None:
        loss = torch.nn.functional.mse_loss(prediction, target.float())
    else:
        squared = (prediction - target.float()).square()
        weights = weights.to(squared.device).expand_as(squared)
        loss = (weights * squared).sum() / weights.sum()
    return loss * scheduler.training_weight(timestep) if weighted else loss


@torch.no_grad()
def fixed_noise_losses(pipe: ChronoEditPipeline, scheduler: FlowMatchScheduler, inputs: dict[str, torch.Tensor],
                       noises: list[torch.Tensor], timesteps: list[torch.Tensor]) -> list[float]:
    """The unweighted loss of one encoded clip (:func:`~.inputs.encode_clip`) at each timestep with its noise."""
    x0 = inputs["input_latents"].float()  # noised and compared in float32, run in the DiT's dtype
    conditioning = {key: value for key, value in inputs.items() if key != "input_latents"}
    pipe.placement.use("dit")  # with offloading, the DiT's weights onto the compute device

    def predict(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return chronoedit_model_fn(pipe.dit, latents.to(pipe.dtype), timestep, rope=pipe.rope,
                                   skip_len=pipe.components.temporal_skip_len, **conditioning)

    return [flow_matching_loss(scheduler, predict, x0, noise.to(x0.device), timestep.reshape(1).to(x0.device, pipe.dtype),
                               weighted=False).item() for noise, timestep in zip(noises, timesteps)]


@torch.no_grad()
def validation_loss(pipe: ChronoEditPipeline, items: list[dict], sigmas: tuple[float, ...] = VALIDATION_SIGMAS,
                    seed: int = 0) -> float:
    """Mean unweighted loss over ``items`` x ``sigmas`` with fixed noise: comparable between runs,
    unlike single training losses (random timesteps)."""
    scheduler = training_schedule()
    timesteps = [scheduler.timesteps[torch.argmin((scheduler.sigmas - sigma).abs())] for sigma in sigmas]
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for item in items:
        inputs = encode_clip(pipe, item["video"], item["prompt"])
        noises = [torch.randn(inputs["input_latents"].shape, generator=generator) for _ in timesteps]
        losses += fixed_noise_losses(pipe, scheduler, inputs, noises, timesteps)
    return sum(losses) / len(losses)
