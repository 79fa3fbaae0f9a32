#!/usr/bin/env bash
# The README demo, on CPU in about a minute:
#   1. a tiny random ChronoEdit checkpoint in the real ChronoEdit-14B-Diffusers layout,
#   2. a LoRA trained on data/example_dataset (pencil sketches) with configs/tiny_cpu.toml,
#   3. an edit of one example image with that LoRA;
# then it prints how to open the web app (`chronoedit-lora ui`) on that model and LoRA.
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
echo
echo "Try it in the browser (the tiny model loads once; the demo's LoRA is under --runs):"
echo "  chronoedit-lora ui --model $out/tiny-model --runs $out --datasets data --device cpu --dtype float32"
echo "then open http://127.0.0.1:7860 (Edit: LoRA 1 = runs/lora/lora.safetensors, steps 4, 64x64)."
