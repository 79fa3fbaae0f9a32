"""Write a tiny random ChronoEdit checkpoint in the real on-disk layout (for demos and tests)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ChronoEditError
from ..settings import check_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="folder to write")
    parser.add_argument("--layout", choices=["diffusers", "wan", "comfyui"], default="diffusers",
                        help="ChronoEdit-14B-Diffusers folders, Wan2.1 files (single DiT file + .pth encoders), or "
                             "ComfyUI's models/ folder (diffusion_models, text_encoders, clip_vision, vae)")
    parser.add_argument("--precision", choices=["fp16", "fp8_scaled"], default="fp16",
                        help="--layout comfyui only: the DiT and umT5 in fp16, or in ComfyUI's scaled fp8")
    parser.add_argument("--seed", type=int, default=0, help="weights are a deterministic function of the seed")
    parser.add_argument("--size", choices=["tiny", "mid"], default="tiny",
                        help="tiny (36 MB, tests and demo) or mid (Wan2.1-1.3B-shaped DiT, about 4 GB, benchmarks)")


def run(args: argparse.Namespace) -> int:
    check_seed("--seed", args.seed)
    if args.precision != "fp16" and args.layout != "comfyui":
        raise ChronoEditError(f"--precision {args.precision} applies to --layout comfyui only.")
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise ChronoEditError(f"{output} exists and is not empty; choose a new folder.")
    from diffusers.utils import logging as diffusers_logging

    from ..tiny import write_tiny_checkpoint

    diffusers_logging.set_verbosity_error()
    write_tiny_checkpoint(output, args.layout, args.seed, args.size, args.precision)
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    print(f"{args.size} ChronoEdit checkpoint ({args.layout} layout, seed {args.seed}, {size / 2**20:.1f} MiB): {output}")
    return 0
