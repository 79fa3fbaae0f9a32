"""Arguments shared by every command that loads ChronoEdit: where the weights are, device, dtype."""

from __future__ import annotations

import argparse

import torch

from ..models.loading import DTYPES
from ..settings import check_device

COMPONENTS = ("dit", "text_encoder", "image_encoder", "vae", "tokenizer")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="ChronoEdit-14B-Diffusers folder, a folder of Wan2.1 files, ComfyUI's models/ "
                       "folder, or a folder of weight files (safetensors, scaled fp8, GGUF, .pth)")
    for name in COMPONENTS:
        flag = name.replace("_", "-")
        group.add_argument(f"--{flag}", dest=name, help=f"override: path of the {name.replace('_', ' ')}")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    group.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="weight and compute dtype")
    group.add_argument("--fp8-base", action="store_true",
                       help="store the DiT blocks' linear weights in float8 (half the memory of bf16; LoRAs "
                            "are then applied unfused)")
    group.add_argument("--compile", action="store_true",
                       help="compile each DiT block with torch.compile (one block's compile time, then faster steps)")
    group.add_argument("--sequence-parallel", action="store_true",
                       help="split one edit across GPUs (DiffSynth USP; torchrun, CUDA, NCCL and xfuser needed)")
    group.add_argument("--rope", default="skip", choices=["skip", "legacy"],
                       help="temporal positions of 2-frame clips: ChronoEdit's [0, 7] (skip) or "
                            "[0, 1] (legacy, what the original DiffSynth scripts used)")


def model_options(args: argparse.Namespace) -> dict:
    """``from_pretrained`` keyword arguments from parsed model arguments."""
    device = str(check_device(args.device))
    return {
        "model_dir": args.model,
        "device": device,
        "dtype": DTYPES[args.dtype],
        "rope": args.rope,
        "sequence_parallel": getattr(args, "sequence_parallel", False),
        "fp8_base": args.fp8_base,
        "compile": args.compile,
        **{name: getattr(args, name) for name in COMPONENTS},
    }
