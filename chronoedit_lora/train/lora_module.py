"""The LoRA trainable module: ChronoEdit's DiT with peft LoRA layers, whose ``forward`` is the loss."""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model

from ..pipeline import ChronoEditPipeline
from .dit_module import DiTTrainingModule
from .objective import DEFAULT_SHIFT


class LoraTrainingModule(DiTTrainingModule):
    """The frozen DiT with peft LoRA layers on ``targets``; only the LoRA factors train (float32)."""

    def __init__(self, pipe: ChronoEditPipeline, rank: int, alpha: float, targets: list[str],
                 shift: float = DEFAULT_SHIFT, gradient_checkpointing: bool = True, activation_offload: bool = False):
        super().__init__(pipe, shift, gradient_checkpointing, activation_offload)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), self.dit)
        for param in self.lora_parameters():
            param.data = param.data.float()
        self.dit.train()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.dit.named_parameters() if "lora_" in n]
