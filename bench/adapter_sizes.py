"""Parameters and file size of each adapter type on ChronoEdit-14B's real layer shapes, computed, not guessed.

    python bench/adapter_sizes.py [--rank 32] [--json out.json]

Builds the 14B DiT (DiffSynth's ``WanModel`` with ChronoEdit-14B's kwargs) on the meta device, injects
each adapter with the trainer's own peft configuration (:func:`chronoedit_lora.train.objective.adapter_config.peft_config`,
default targets q,k,v,o,ffn.0,ffn.2 in the 40 blocks) and counts its parameters. The kit saves
adapters in float32 (the header and alpha scalars add a few kB); bf16 halves it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# (label, TrainConfig overrides): the types, and LoKr's shapes at the two ends of its settings
VARIANTS = (
    ("lora", {"adapter": "lora"}),
    ("dora", {"adapter": "dora"}),
    ("loha", {"adapter": "loha"}),
    ("lokr", {"adapter": "lokr"}),
    ("lokr, lokr_decompose_both", {"adapter": "lokr", "lokr_decompose_both": "true"}),
    ("lokr, lokr_factor 4", {"adapter": "lokr", "lokr_factor": "4"}),
)


def adapter_parameters(kwargs: dict, overrides: dict[str, str]) -> int:
    """Parameters of the adapter the trainer would inject for ``overrides`` into a DiT of ``kwargs``."""
    from diffsynth.models.wan_video_dit import WanModel
    from peft import inject_adapter_in_model

    from chronoedit_lora.lora.weights import is_adapter_parameter
    from chronoedit_lora.train.objective.adapter_config import peft_config
    from chronoedit_lora.train.loop.config import load_config

    config = peft_config(load_config(None, overrides))  # checked on the CPU: the recipe's checks build tensors
    with torch.device("meta"):
        dit = WanModel(**kwargs)
        inject_adapter_in_model(config, dit)
    return sum(p.numel() for name, p in dit.named_parameters() if is_adapter_parameter(name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from chronoedit_lora.models.dit import CHRONOEDIT_14B_KWARGS

    rows = {label: adapter_parameters(CHRONOEDIT_14B_KWARGS, {**overrides, "rank": str(args.rank), "alpha": str(args.rank)})
            for label, overrides in VARIANTS}
    print(f"ChronoEdit-14B, rank {args.rank}, targets q,k,v,o,ffn.0,ffn.2 (400 layers)")
    print(f"{'adapter':28} {'parameters':>12} {'file fp32':>10} {'bf16':>9} {'vs LoRA':>8}")
    for label, params in rows.items():
        print(f"{label:28} {params / 1e6:>10.2f} M {params * 4 / 2**20:>7.1f} MiB {params * 2 / 2**20:>5.1f} MiB "
              f"{params / rows['lora']:>8.3f}")
    if args.json:
        args.json.write_text(json.dumps({"rank": args.rank, "parameters": rows}, indent=2))


if __name__ == "__main__":
    main()
