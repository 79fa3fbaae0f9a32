"""What every trainable module shares: ChronoEdit's DiT wrapped so that ``forward`` is the loss."""

from __future__ import annotations

import contextlib

import torch

from ...models.rope import chronoedit_model_fn
from ...pipeline import ChronoEditPipeline
from .loss import (DEFAULT_SHIFT, LossRecipe, draw_timestep, flow_matching_loss, latent_weights, noised,
                   preservation_loss, training_schedule)


class DiTTrainingModule(torch.nn.Module):
    """Wraps the DiT so DDP/FSDP/DeepSpeed see one module whose ``forward`` returns the loss.

    Only the DiT is a submodule (DDP must not see, or broadcast, the frozen encoders), and the
    pipeline is left as it is: the edit pipeline that samples during training is the edit command's.
    Subclasses choose what trains (:meth:`named_trained`).
    """

    def __init__(self, pipe: ChronoEditPipeline, shift: float = DEFAULT_SHIFT, gradient_checkpointing: bool = True,
                 activation_offload: bool = False, recipe: LossRecipe = LossRecipe()):
        super().__init__()
        self.recipe = recipe
        self.last_preservation: torch.Tensor | None = None  # the last forward's preservation term (detached)
        self.dit = pipe.dit
        self.dit.requires_grad_(False)
        self.skip_len, self.rope = pipe.components.temporal_skip_len, pipe.rope
        self.placement = pipe.placement  # where the DiT's weights are (block_swap: streamed, see offload.py)
        self.scheduler = training_schedule(shift)
        self.checkpointing = {"use_gradient_checkpointing": gradient_checkpointing,
                              "use_gradient_checkpointing_offload": activation_offload}

    def named_trained(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters by their name in the DiT (``blocks.0.self_attn.q.weight``)."""
        return {name: p for name, p in self.dit.named_parameters() if p.requires_grad}

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.named_trained().values())

    def forward(self, inputs: dict[str, torch.Tensor], noise_seed: int | None = None,
                preserve: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The loss of :mod:`.loss` (DiffSynth's Wan SFT loss unless the recipe says otherwise) for one
        batch of DiT inputs (with the pairs' ``change`` maps). ``noise_seed`` draws the batch's
        timestep and noise from a generator of their own (the trainer derives it from the batch's
        pairs, so they do not depend on which process trains it); None: the global RNG.
        ``preserve``: a preservation pair's inputs, whose :func:`.loss.preservation_loss` at the same
        timestep (its noise drawn next from the same generator) is added, times ``preservation_weight``."""
        conditioning = dict(inputs)
        x0 = conditioning.pop("input_latents")
        change = conditioning.pop("change", None)
        generator = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
        timestep, sigma = draw_timestep(self.scheduler, self.recipe, generator)
        timestep = timestep.to(dtype=x0.dtype, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        self.placement.use("dit")  # after the encoders' stages (uncached), the DiT back on the compute device
        sigma = None if self.recipe.timestep_sampling == "uniform" else sigma
        loss = flow_matching_loss(self.scheduler, self._predictor(conditioning), x0, noise, timestep,
                                  weighted=self.recipe.loss_weighting == "diffsynth", sigma=sigma,
                                  weights=latent_weights(change, self.recipe, x0.shape))
        if preserve is None:
            return loss
        kept = {key: value for key, value in preserve.items() if key not in ("input_latents", "change")}
        kept_x0 = preserve["input_latents"]
        kept_noise = torch.randn(kept_x0.shape, generator=generator, dtype=kept_x0.dtype).to(kept_x0.device)
        term = preservation_loss(self._predictor(kept), self.adapters_disabled,
                                 noised(self.scheduler, kept_x0, kept_noise, timestep, sigma), timestep)
        self.last_preservation = term.detach()
        return loss + self.recipe.preservation_weight * term

    def _predictor(self, conditioning: dict[str, torch.Tensor]):
        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # with ChronoEdit's temporal RoPE
            return chronoedit_model_fn(self.dit, latents, t, skip_len=self.skip_len, rope=self.rope,
                                       **conditioning, **self.checkpointing)
        return predict

    def adapters_disabled(self) -> contextlib.AbstractContextManager:
        """The base DiT, adapters off (only an adapter module has them; config validation refuses
        preservation for a full fine-tune)."""
        raise NotImplementedError(f"{type(self).__name__} has no adapter to turn off")
