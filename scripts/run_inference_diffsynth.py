"""The original ChronoEdit release's `python scripts/run_inference_diffsynth.py, or torchrun --nproc_per_node N scripts/run_inference_diffsynth.py`:
prints the equivalent chronoedit-lora command and runs it (see chronoedit_lora/compat/diffsynth_inference.py)."""

import sys

from chronoedit_lora.compat.diffsynth_inference import main

if __name__ == "__main__":
    sys.exit(main())
