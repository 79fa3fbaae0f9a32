"""Full fine-tuning: the DiT's own weights train, those whose names match the ``trainable`` patterns.

Trained weights are float32 master weights (the rest of the DiT stays in ``dtype``); under FSDP
they, their gradients and AdamW's two moments are sharded per block like the frozen base, and
``mixed_precision = "bf16"`` computes in bf16 from the float32 shards (FSDP2's
``MixedPrecisionPolicy``: parameters all-gathered in bf16, gradients reduce-scattered as
accelerate's policy sets, applied to the float32 shards).
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from ...errors import ChronoEditError
from ...pipeline import ChronoEditPipeline
from ..loop.config import TrainConfig
from .dit_module import DiTTrainingModule
from .loss import DEFAULT_SHIFT, LossRecipe


def matching(patterns: list[str], names: Iterable[str]) -> list[str]:
    """The parameter names that match any of the fnmatch ``patterns``."""
    return [name for name in names if any(fnmatchcase(name, pattern) for pattern in patterns)]


def check_trainable(patterns: list[str], names: list[str]) -> None:
    """Refuse patterns that match no DiT parameter (a typo would train nothing), naming them."""
    unmatched = [pattern for pattern in patterns if not matching([pattern], names)]
    if unmatched:
        raise ChronoEditError(f"trainable: {', '.join(map(repr, unmatched))} match(es) no DiT parameter; names look "
                              f"like {', '.join(names[:2])} (fnmatch patterns over DiffSynth/Wan names, e.g. "
                              "blocks.* or blocks.*.self_attn.*).")


class FullTrainingModule(DiTTrainingModule):
    """The DiT with the parameters matching ``trainable`` trained in float32, everything else frozen."""

    def __init__(self, pipe: ChronoEditPipeline, trainable: list[str], shift: float = DEFAULT_SHIFT,
                 gradient_checkpointing: bool = True, activation_offload: bool = False, recipe: LossRecipe = LossRecipe()):
        super().__init__(pipe, shift, gradient_checkpointing, activation_offload, recipe)
        params = dict(self.dit.named_parameters())
        check_trainable(trainable, list(params))
        for name in matching(trainable, params):
            params[name].data = params[name].data.float()
            params[name].requires_grad_(True)
        self.dit.train()


def training_module(pipe: ChronoEditPipeline, config: TrainConfig) -> DiTTrainingModule:
    """The module ``config.finetune`` asks for: a LoRA on the frozen DiT, or the DiT's own weights."""
    checkpointing = (config.gradient_checkpointing, config.activation_offload)
    recipe = LossRecipe.of(config)
    if config.finetune == "full":
        return FullTrainingModule(pipe, config.trainable, config.shift, *checkpointing, recipe=recipe)
    from .adapter_config import peft_config
    from .lora_module import LoraTrainingModule

    return LoraTrainingModule(pipe, config.rank, config.alpha, config.targets, config.shift, *checkpointing,
                              adapter=peft_config(config), recipe=recipe)
