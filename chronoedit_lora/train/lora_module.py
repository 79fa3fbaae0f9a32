"""The trainable module: ChronoEdit's DiT with peft adapter layers (LoRA, DoRA, LoHa or LoKr), whose
``forward`` is the loss."""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.config import PeftConfig

from ..lora.weights import is_adapter_parameter
from ..models.rope import chronoedit_model_fn
from ..pipeline import ChronoEditPipeline
from .objective import DEFAULT_SHIFT, flow_matching_loss, training_schedule


class LoraTrainingModule(torch.nn.Module):
    """Wraps the DiT so DDP/DeepSpeed see one module whose ``forward`` returns the loss.

    Only the DiT is a submodule (DDP must not see, or broadcast, the frozen encoders), and the
    pipeline is left as it is: the edit pipeline that samples during training is the edit command's.
    """

    def __init__(self, pipe: ChronoEditPipeline, rank: int, alpha: float, targets: list[str],
                 shift: float = DEFAULT_SHIFT, gradient_checkpointing: bool = True, activation_offload: bool = False,
                 adapter: PeftConfig | None = None):
        """``adapter``: peft's configuration of another type (see :mod:`.adapter_config`); None: a
        LoRA of ``rank``, ``alpha`` on ``targets``."""
        super().__init__()
        self.dit = pipe.dit
        self.dit.requires_grad_(False)
        inject_adapter_in_model(adapter or LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), self.dit)
        for param in self.lora_parameters():
            param.data = param.data.float()
        self.dit.train()
        self.skip_len, self.rope = pipe.components.temporal_skip_len, pipe.rope
        self.scheduler = training_schedule(shift)
        self.checkpointing = {"use_gradient_checkpointing": gradient_checkpointing,
                              "use_gradient_checkpointing_offload": activation_offload}

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's parameters, whatever its type."""
        return [p for n, p in self.dit.named_parameters() if is_adapter_parameter(n)]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """DiffSynth's Wan SFT loss (see :mod:`.objective`) for one batch of DiT inputs."""
        conditioning = dict(inputs)
        x0 = conditioning.pop("input_latents")
        index = torch.randint(0, len(self.scheduler.timesteps), (1,))  # uniform over the 1000 shifted timesteps
        timestep = self.scheduler.timesteps[index].to(dtype=x0.dtype, device=x0.device)
        noise = torch.randn_like(x0)

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # with ChronoEdit's temporal RoPE
            return chronoedit_model_fn(self.dit, latents, t, skip_len=self.skip_len, rope=self.rope,
                                       **conditioning, **self.checkpointing)

        return flow_matching_loss(self.scheduler, predict, x0, noise, timestep)
