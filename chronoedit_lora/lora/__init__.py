"""LoRA weights: the canonical in-memory form, the kit's shareable file format, fusing."""

from .apply import LoraMismatchError, check_lora_matches, fuse_lora
from .weights import LoraModule, LoraWeights, from_peft_parameters, load_lora, save_lora, to_file_state

__all__ = ["LoraMismatchError", "LoraModule", "LoraWeights", "check_lora_matches", "from_peft_parameters",
           "fuse_lora", "load_lora", "save_lora", "to_file_state"]
