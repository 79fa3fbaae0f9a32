"""chronoedit-lora: LoRA fine-tuning and inference for ChronoEdit-14B on DiffSynth-Studio 2.x."""

__version__ = "0.1.0"
