"""The trainable module: ChronoEdit's DiT with peft LoRA layers and DiffSynth's flow-matching loss."""

from __future__ import annotations

from functools import partial

import torch
from diffsynth.diffusion.loss import FlowMatchSFTLoss
from peft import LoraConfig, inject_adapter_in_model

from ..models.rope import chronoedit_model_fn
from ..pipeline import ChronoEditPipeline

TRAIN_TIMESTEPS = 1000


class LoraTrainingModule(torch.nn.Module):
    """Wraps the DiT so DDP/DeepSpeed see one module whose ``forward`` returns the loss.

    The loss is DiffSynth's Wan SFT loss (uniform timestep over 1000 shifted training steps,
    x_t = (1 - sigma) x0 + sigma eps, target eps - x0, MSE times DiffSynth's timestep weight), with
    ChronoEdit's temporal-skip RoPE in the model function.
    """

    def __init__(self, pipe: ChronoEditPipeline, rank: int, alpha: float, targets: list[str], shift: float = 5.0,
                 gradient_checkpointing: bool = True, activation_offload: bool = False):
        super().__init__()
        self.dit = pipe.dit
        self.dit.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), self.dit)
        for param in self.lora_parameters():
            param.data = param.data.float()
        self.dit.train()
        # Not a registered submodule: DDP must not see (and broadcast) the frozen encoders it holds.
        object.__setattr__(self, "core", pipe.core)
        self.core.model_fn = partial(chronoedit_model_fn, skip_len=pipe.components.temporal_skip_len, rope=pipe.rope)
        self.core.scheduler.set_timesteps(TRAIN_TIMESTEPS, training=True, shift=shift)
        self.checkpointing = {"use_gradient_checkpointing": gradient_checkpointing,
                              "use_gradient_checkpointing_offload": activation_offload}

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.dit.named_parameters() if "lora_" in n]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """peft-named LoRA tensors (``blocks.0.self_attn.q.lora_A.default.weight``)."""
        return {n: p.detach() for n, p in self.dit.named_parameters() if "lora_" in n}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return FlowMatchSFTLoss(self.core, **inputs, **self.checkpointing)
