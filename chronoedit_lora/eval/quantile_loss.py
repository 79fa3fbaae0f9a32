"""The held-out flow-matching loss at fixed quantiles of training's timestep distribution, with
fixed noise: cheap (no sampling) and comparable between checkpoints.

Training draws the timestep uniformly from the 1000 of the shifted schedule
(:func:`~chronoedit_lora.train.objective.loss.training_schedule`); quantile q is the timestep at
position q of them sorted (q = 0.1: low noise, 0.9: high noise). The loss is the unweighted MSE of
the velocity, as the fixed-grid validation loss; the overall loss is the mean over quantiles and pairs.
"""

from __future__ import annotations

import torch
from diffsynth.diffusion.flow_match import FlowMatchScheduler

from ..pipeline import ChronoEditPipeline
from ..train.objective.loss import fixed_noise_losses, training_schedule
from .held_out import HeldOutPair
from .metrics import LOSS, QUANTILES, quantile_column


def quantile_timesteps(scheduler: FlowMatchScheduler, quantiles: tuple[float, ...] = QUANTILES) -> list[torch.Tensor]:
    """The training schedule's timestep at each quantile."""
    ordered = scheduler.timesteps.sort().values
    return [ordered[round(q * (len(ordered) - 1))] for q in quantiles]


@torch.no_grad()
def quantile_losses(pipe: ChronoEditPipeline, pairs: list[HeldOutPair],
                    quantiles: tuple[float, ...] = QUANTILES) -> dict[str, list[float]]:
    """Per pair, with the DiT as it is now: ``{loss_qNN: [loss at that quantile], ..., loss: [mean
    over the quantiles]}`` (each pair holds one noise tensor per quantile, see
    :func:`.held_out.encode_pairs`)."""
    scheduler = training_schedule()
    timesteps = quantile_timesteps(scheduler, quantiles)
    per_pair = [fixed_noise_losses(pipe, scheduler, pair.inputs, pair.noises, timesteps) for pair in pairs]
    columns = {quantile_column(q): [losses[i] for losses in per_pair] for i, q in enumerate(quantiles)}
    columns[LOSS] = [sum(losses) / len(losses) for losses in per_pair]
    return columns
