"""Launcher for `accelerate launch scripts/train.py --config configs/NAME.toml [--key value ...]`."""

import sys

from chronoedit_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
