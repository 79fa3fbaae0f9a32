"""The original ChronoEdit release's `python scripts/run_inference_diffusers.py --input IMG --prompt TEXT --output out.mp4 --model-path DIR`:
prints the equivalent chronoedit-lora command and runs it (see chronoedit_lora/compat/diffusers_inference.py)."""

import sys

from chronoedit_lora.compat.diffusers_inference import main

if __name__ == "__main__":
    sys.exit(main())
