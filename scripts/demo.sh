#!/usr/bin/env bash
# The README demo, on CPU in about a minute:
#   1. a tiny random ChronoEdit checkpoint in the real ChronoEdit-14B-Diffusers layout,
#   2. a LoRA trained on data/example_dataset (pencil sketches) with configs/tiny_cpu.toml,
#   3. an edit of one example image with that LoRA.
# The weights are random: this shows the plumbing end to end, not image quality.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/demo
rm -rf "$out"
chronoedit-lora make-tiny "$out/tiny-model"
chronoedit-lora train --config configs/tiny_cpu.toml --model "$out/tiny-model" --output "$out/lora"
chronoedit-lora edit --model "$out/tiny-model" --lora "$out/lora/lora.safetensors" \
  --image data/example_dataset/before/000.png \
  --prompt "The user wants to transform the image into a pencil sketch." \
  --output "$out/edit.png" --video "$out/edit.mp4" \
  --steps 4 --height 64 --width 64 --dtype float32 --device cpu
