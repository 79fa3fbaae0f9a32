"""The adapter a run trains, as peft's own configuration (LoRA, DoRA, LoHa, LoKr), checked without a model."""

from __future__ import annotations

from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.config import PeftConfig

from ...errors import ChronoEditError
from ...lora.weights import ADAPTER_NAMES, ADAPTER_TYPES
from ...settings import check_choice
from ..loop.config import TrainConfig

LOKR_SETTINGS = {"lokr_factor": -1, "lokr_decompose_both": False}  # with their defaults


def peft_config(config: TrainConfig) -> PeftConfig:
    """peft's configuration of ``config``'s adapter (no dropout: every step sees the whole adapter)."""
    common = {"r": config.rank, "target_modules": list(config.targets)}
    if config.adapter in ("lora", "dora"):
        return LoraConfig(**common, lora_alpha=config.alpha, use_dora=config.adapter == "dora")
    if config.adapter == "loha":
        return LoHaConfig(**common, alpha=config.alpha)
    return LoKrConfig(**common, alpha=config.alpha, decompose_factor=config.lokr_factor,
                      decompose_both=config.lokr_decompose_both)


def check_adapter(config: TrainConfig) -> None:
    """The adapter settings, checked as peft would check them, before any model loads."""
    check_choice("adapter", config.adapter, ADAPTER_TYPES)
    if not config.targets:
        raise ChronoEditError("targets is empty: name the DiT layers to adapt, e.g. q,k,v,o,ffn.0,ffn.2.")
    if config.adapter != "lokr":
        changed = [key for key, default in LOKR_SETTINGS.items() if getattr(config, key) != default]
        if changed:
            raise ChronoEditError(f"{', '.join(changed)} set, but they shape a LoKr only and adapter is "
                                  f"{config.adapter!r}: set adapter = \"lokr\" or leave them out.")
    if config.lokr_factor == 0 or config.lokr_factor < -1:
        raise ChronoEditError(f"lokr_factor must be -1 (as square as possible) or a positive number, "
                              f"got {config.lokr_factor}.")
    try:
        peft_config(config)
    except (TypeError, ValueError) as exc:
        raise ChronoEditError(f"the {ADAPTER_NAMES[config.adapter]} settings are refused by peft: {exc}") from None
