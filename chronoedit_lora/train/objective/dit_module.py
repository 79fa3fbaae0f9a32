"""What every trainable module shares: ChronoEdit's DiT wrapped so that ``forward`` is the loss."""

from __future__ import annotations

import torch

from ...models.rope import chronoedit_model_fn
from ...pipeline import ChronoEditPipeline
from .loss import DEFAULT_SHIFT, LossRecipe, draw_timestep, flow_matching_loss, latent_weights, training_schedule


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
        self.dit = pipe.dit
        self.dit.requires_grad_(False)
        self.skip_len, self.rope = pipe.components.temporal_skip_len, pipe.rope
        self.scheduler = training_schedule(shift)
        self.checkpointing = {"use_gradient_checkpointing": gradient_checkpointing,
                              "use_gradient_checkpointing_offload": activation_offload}

    def named_trained(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters by their name in the DiT (``blocks.0.self_attn.q.weight``)."""
        return {name: p for name, p in self.dit.named_parameters() if p.requires_grad}

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.named_trained().values())

    def forward(self, inputs: dict[str, torch.Tensor], noise_seed: int | None = None) -> torch.Tensor:
        """The loss of :mod:`.loss` (DiffSynth's Wan SFT loss unless the recipe says otherwise) for one
        batch of DiT inputs (with the pairs' ``change`` maps). ``noise_seed`` draws the batch's
        timestep and noise from a generator of their own (the trainer derives it from the batch's
        pairs, so they do not depend on which process trains it); None: the global RNG."""
        conditioning = dict(inputs)
        x0 = conditioning.pop("input_latents")
        change = conditioning.pop("change", None)
        generator = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
        timestep, sigma = draw_timestep(self.scheduler, self.recipe, generator)
        timestep = timestep.to(dtype=x0.dtype, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # with ChronoEdit's temporal RoPE
            return chronoedit_model_fn(self.dit, latents, t, skip_len=self.skip_len, rope=self.rope,
                                       **conditioning, **self.checkpointing)

        return flow_matching_loss(self.scheduler, predict, x0, noise, timestep,
                                  weighted=self.recipe.loss_weighting == "diffsynth",
                                  sigma=None if self.recipe.timestep_sampling == "uniform" else sigma,
                                  weights=latent_weights(change, self.recipe, x0.shape))
