#!/usr/bin/env bash
# The README demo: a tiny random ChronoEdit checkpoint in the real diffusers layout, then an edit
# with it on CPU. It shows the plumbing end to end, not image quality (the weights are random).
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/demo
rm -rf "$out"
chronoedit-lora make-tiny "$out/tiny-model"
chronoedit-lora edit --model "$out/tiny-model" \
  --image data/example_input.png \
  --prompt "The user wants to transform the image into a pencil sketch." \
  --output "$out/edit.png" --video "$out/edit.mp4" \
  --steps 4 --height 64 --width 64 --dtype float32 --device cpu
