"""The original ChronoEdit release's `accelerate launch scripts/train_diffsynth.py --dataset_base_path ...` (DiffSynth 1.x flags):
prints the equivalent chronoedit-lora command and runs it (see chronoedit_lora/compat/diffsynth_train.py)."""

import sys

from chronoedit_lora.compat.diffsynth_train import main

if __name__ == "__main__":
    sys.exit(main())
