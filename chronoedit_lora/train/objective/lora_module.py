"""The adapter trainable module: ChronoEdit's DiT with peft adapter layers (LoRA, DoRA, LoHa or LoKr),
whose ``forward`` is the loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from ...lora.weights import is_adapter_parameter
from ...pipeline import ChronoEditPipeline
from .dit_module import DiTTrainingModule
from .loss import DEFAULT_SHIFT, LossRecipe


class LoraTrainingModule(DiTTrainingModule):
    """The frozen DiT with peft adapter layers on ``targets``; only the adapter's parameters train (float32)."""

    def __init__(self, pipe: ChronoEditPipeline, rank: int, alpha: float, targets: list[str],
                 shift: float = DEFAULT_SHIFT, gradient_checkpointing: bool = True, activation_offload: bool = False,
                 adapter: PeftConfig | None = None, recipe: LossRecipe = LossRecipe()):
        """``adapter``: peft's configuration of another type (see :mod:`.adapter_config`); None: a
        LoRA of ``rank``, ``alpha`` on ``targets``. ``recipe``: the loss options (:mod:`.loss`)."""
        super().__init__(pipe, shift, gradient_checkpointing, activation_offload, recipe)
        inject_adapter_in_model(adapter or LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), self.dit)
        # streamed base weights (block_swap) live in CPU RAM; the adapter stays on the compute device
        device = pipe.device if pipe.placement.mode != "none" else None
        for param in self.lora_parameters():
            param.data = param.data.to(device=device, dtype=torch.float32)
        self.dit.train()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's parameters, whatever its type."""
        return [p for n, p in self.dit.named_parameters() if is_adapter_parameter(n)]

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The frozen base: every adapter layer off, as peft's ``PeftModel.disable_adapter`` does it
        (which also stops their gradients), then on again."""
        layers = [m for m in self.dit.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
