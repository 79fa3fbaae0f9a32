"""Export a training run (a full fine-tune, or a LoRA baked in) as a model: diffusers folder or one file.

    chronoedit-lora export RUN [--ema] --to diffusers|comfyui|wan OUT

RUN is a run folder (its newest checkpoint) or one checkpoint folder. diffusers writes a complete
model folder (the transformer's shards and index rewritten, the other components linked from the
base); comfyui and wan write one .safetensors DiT in original Wan names (comfyui with
``model.diffusion_model.`` keys).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ChronoEditError
from ..files import check_writable
from ..models.loading import DTYPES

EXPORT_FORMATS = ("diffusers", "comfyui", "wan")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_folder", metavar="RUN", help="training run folder (newest checkpoint) or a checkpoint folder")
    parser.add_argument("output", help="new folder (diffusers) or .safetensors file (comfyui, wan)")
    parser.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="model layout to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA of the trained weights (ema_decay/ema_power runs)")
    parser.add_argument("--model", help="the base model folder, if not the run's own `model` (moved, or another copy)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="store every weight in this dtype (default: the base's)")


def run(args: argparse.Namespace) -> int:
    from ..train.state.export import export_run

    output = Path(args.output)
    if args.to == "diffusers":
        if output.exists() and any(output.iterdir()):
            raise ChronoEditError(f"{output} exists and is not empty; choose a new folder.")
    else:
        if output.exists():
            raise ChronoEditError(f"{output} exists; choose another file name.")
        check_writable(output, (".safetensors",))
    export_run(Path(args.run_folder), args.to, output, args.ema, Path(args.model) if args.model else None,
               DTYPES[args.dtype] if args.dtype else None)
    print(f"exported {args.run_folder}{' (EMA)' if args.ema else ''} as {args.to}: {output}")
    return 0
