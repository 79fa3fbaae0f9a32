"""Launcher for `torchrun --nproc_per_node N scripts/infer.py --batch edits.csv ...` (same as `chronoedit-lora edit`)."""

import sys

from chronoedit_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["edit", *sys.argv[1:]]))
