"""What every trainable module shares: ChronoEdit's DiT wrapped so that ``forward`` is the loss."""

from __future__ import annotations

import torch

from ...models.rope import chronoedit_model_fn
from ...pipeline import ChronoEditPipeline
from .loss import DEFAULT_SHIFT, flow_matching_loss, training_schedule


class DiTTrainingModule(torch.nn.Module):
    """Wraps the DiT so DDP/FSDP/DeepSpeed see one module whose ``forward`` returns the loss.

    Only the DiT is a submodule (DDP must not see, or broadcast, the frozen encoders), and the
    pipeline is left as it is: the edit pipeline that samples during training is the edit command's.
    Subclasses choose what trains (:meth:`named_trained`).
    """

    def __init__(self, pipe: ChronoEditPipeline, shift: float = DEFAULT_SHIFT, gradient_checkpointing: bool = True,
                 activation_offload: bool = False):
        super().__init__()
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

    def forward(self, inputs: dict[str, torch.Tensor], noise_seed: int | None = None) -> torch.Tensor:
        """DiffSynth's Wan SFT loss (see :mod:`.objective`) for one batch of DiT inputs. ``noise_seed``
        draws the batch's timestep and noise from a generator of their own (the trainer derives it
        from the batch's pairs, so they do not depend on which process trains it); None: the global RNG."""
        conditioning = dict(inputs)
        x0 = conditioning.pop("input_latents")
        generator = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
        # uniform over the 1000 shifted timesteps
        index = torch.randint(0, len(self.scheduler.timesteps), (1,), generator=generator)
        timestep = self.scheduler.timesteps[index].to(dtype=x0.dtype, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        self.placement.use("dit")  # after the encoders' stages (uncached), the DiT back on the compute device

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # with ChronoEdit's temporal RoPE
            return chronoedit_model_fn(self.dit, latents, t, skip_len=self.skip_len, rope=self.rope,
                                       **conditioning, **self.checkpointing)

        return flow_matching_loss(self.scheduler, predict, x0, noise, timestep)
