"""The training objective, written out: DiffSynth's Wan SFT flow-matching loss, built from
DiffSynth's own scheduler methods so the numbers stay DiffSynth's.

For clean latents x0, noise eps and a timestep t with noise level sigma(t) on the shifted schedule:
x_t = (1 - sigma) x0 + sigma eps, the DiT predicts the velocity, the target is eps - x0, and the
MSE is weighted by DiffSynth's timestep weight (a bump centred at t = 500, normalised). Training
draws t uniformly from the 1000-step schedule (:class:`~.lora_module.LoraTrainingModule`);
:func:`validation_loss` evaluates the same objective, unweighted, on a fixed grid with fixed noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffsynth.diffusion.flow_match import FlowMatchScheduler

from ...models.rope import chronoedit_model_fn
from ...pipeline import ChronoEditPipeline
from ..loop.inputs import encode_clip

TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0
# Noise levels of the validation grid; each is evaluated at the nearest timestep of the schedule.
VALIDATION_SIGMAS = (0.2, 0.4, 0.6, 0.8)
# (noisy latents, timestep) -> predicted velocity
Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def training_schedule(shift: float = DEFAULT_SHIFT) -> FlowMatchScheduler:
    """DiffSynth's Wan schedule of 1000 training timesteps, with its training weights."""
    scheduler = FlowMatchScheduler("Wan")
    scheduler.set_timesteps(TRAIN_TIMESTEPS, training=True, shift=shift)
    return scheduler


def flow_matching_loss(scheduler: FlowMatchScheduler, predict: Predictor, x0: torch.Tensor, noise: torch.Tensor,
                       timestep: torch.Tensor, weighted: bool = True) -> torch.Tensor:
    """The flow-matching MSE at one timestep (times DiffSynth's timestep weight if ``weighted``)."""
    noisy = scheduler.add_noise(x0, noise, timestep)  # (1 - sigma) x0 + sigma noise
    target = scheduler.training_target(x0, noise, timestep)  # noise - x0
    loss = torch.nn.functional.mse_loss(predict(noisy, timestep).float(), target.float())
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
