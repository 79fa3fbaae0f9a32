"""Adapter weights (LoRA, DoRA, LoHa, LoKr): the canonical in-memory form, file formats, checking,
fusing and unfused hooks."""

from .apply import LoraMismatchError, UnfusedLora, beneath_peft, check_finite, check_lora_file, check_lora_matches, fuse_lora
from .formats import FORMATS, detect_format
from .io import load_lora, parse_lora_spec, save_lora
from .weights import (
    ADAPTER_TYPES, DoraModule, LohaModule, LokrModule, LoraModule, LoraWeights, from_peft_parameters, non_finite_layers,
)

__all__ = ["ADAPTER_TYPES", "DoraModule", "FORMATS", "LohaModule", "LokrModule", "LoraMismatchError", "UnfusedLora",
           "LoraModule", "LoraWeights", "beneath_peft", "check_finite", "check_lora_file", "check_lora_matches", "detect_format", "from_peft_parameters", "fuse_lora", "load_lora", "non_finite_layers", "parse_lora_spec",
           "save_lora"]
