"""Edit an image with ChronoEdit: the input is frame 0, the edit is the last frame."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import ChronoEditError
from ..images import open_image
from ..outputs import check_writable, save_image, save_video
from .model_args import add_model_arguments, model_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="input image")
    parser.add_argument("--prompt", required=True, help="edit instruction")
    parser.add_argument("--output", required=True, help="edited image (.png)")
    parser.add_argument("--negative-prompt", default="", help="negative prompt (used when cfg > 1)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--shift", type=float, default=5.0, help="flow-matching sigma shift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, help="output height (multiple of 16); default: aspect-preserving, area ~720x1280")
    parser.add_argument("--width", type=int, help="output width (multiple of 16)")
    parser.add_argument("--temporal-reasoning-steps", type=int, default=0,
                        help="K > 0: denoise a 29-frame clip for the first K steps, then only [input, edit]")
    parser.add_argument("--video", help="also write the clip (reasoning frames + edit) as .mp4")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="LoRA to fuse into the DiT (repeatable), optional scale (default 1.0)")


def parse_lora_arg(value: str) -> tuple[Path, float]:
    """``PATH[:SCALE]`` -> (path, scale); the LoRA file must exist."""
    path, scale = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = value
    if not Path(path).is_file():
        raise ChronoEditError(f"--lora {path}: file not found.")
    return Path(path), scale


def run(args: argparse.Namespace) -> int:
    if (args.height is None) != (args.width is None):
        raise ChronoEditError("give both --height and --width, or neither.")
    if args.steps < 1 or args.temporal_reasoning_steps < 0:
        raise ChronoEditError("--steps must be >= 1 and --temporal-reasoning-steps >= 0.")
    loras = [parse_lora_arg(v) for v in args.lora]
    image = open_image(args.image)
    output = check_writable(args.output, (".png",))
    video = check_writable(args.video, (".mp4",)) if args.video else None

    from ..pipeline import ChronoEditPipeline  # heavy imports only once the inputs are known good

    started = time.perf_counter()
    pipe = ChronoEditPipeline.from_pretrained(**model_options(args))
    for path, scale in loras:
        pipe.load_lora(path, scale)
    result = pipe(
        image, args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg=args.cfg,
        shift=args.shift, seed=args.seed, height=args.height, width=args.width,
        temporal_reasoning_steps=args.temporal_reasoning_steps,
    )
    save_image(result.image, output)
    print(f"edited image: {output} ({result.image.width}x{result.image.height}, "
          f"{time.perf_counter() - started:.1f} s)")
    if video:
        save_video(result.frames, video)
        print(f"clip ({len(result.frames)} frames): {video}")
    return 0
