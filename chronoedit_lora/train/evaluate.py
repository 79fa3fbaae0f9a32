"""A deterministic validation loss: the flow-matching objective at fixed timesteps and fixed noise.

The training loss draws a random timestep each step, which makes single values noisy; this
measures the same objective (unweighted) on a fixed grid, so runs can be compared.
"""

from __future__ import annotations

import torch

from ..models.rope import chronoedit_model_fn
from ..pipeline import ChronoEditPipeline
from .inputs import encode_pair

DEFAULT_SIGMAS = (0.2, 0.4, 0.6, 0.8)


@torch.no_grad()
def validation_loss(pipe: ChronoEditPipeline, items: list[dict], sigmas: tuple[float, ...] = DEFAULT_SIGMAS, seed: int = 0) -> float:
    """Mean MSE between predicted and true velocity over ``items`` x ``sigmas`` (fixed noise)."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for item in items:
        inputs = encode_pair(pipe, item["video"], item["prompt"])
        x0 = inputs.pop("input_latents").float()
        for sigma in sigmas:
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            latents = (1 - sigma) * x0 + sigma * noise
            timestep = torch.tensor([sigma * 1000.0], device=x0.device, dtype=pipe.dtype)
            pred = chronoedit_model_fn(pipe.dit, latents.to(pipe.dtype), timestep,
                                       skip_len=pipe.components.temporal_skip_len, rope=pipe.rope, **inputs)
            losses.append(torch.mean((pred.float() - (noise - x0)) ** 2).item())
    return sum(losses) / len(losses)
