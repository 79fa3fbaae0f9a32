"""``python scripts/run_inference_diffsynth.py`` (and ``torchrun --nproc_per_node N ...``) -> ``chronoedit-lora edit``.

The original takes no flags: it edits ``assets/images/input.jpg`` with a fixed prompt at 720x1280
(50 steps, cfg 5, seed 0, DiffSynth's Euler sampler at shift 5) into ``output.mp4``, loading the
DiT shards from ``checkpoints/ChronoEdit-14B-Diffusers/transformer/`` and the Wan2.1 encoders from
DiffSynth's ``./models/Wan-AI/Wan2.1-I2V-14B-720P/``. Run as written, this does the same (the last
frame also goes to ``output.png``); each value the original hard-codes can be changed with a flag
named after its argument there. Encoders missing from ``./models`` are taken from the diffusers
folder when it has them. Under torchrun the ranks split the one edit (``--sequence-parallel``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import ChronoEditError
from ..models.components import DIFFUSERS_FOLDERS, WAN_FILES
from ..video import EDIT_FRAMES, REASONING_FRAMES
from .common import KitCommand, diffsynth_files, diffsynth_tokenizer, original_parser, refuse, run_translated

PROG = "run_inference_diffsynth.py"
CHRONOEDIT = "checkpoints/ChronoEdit-14B-Diffusers"
WAN_I2V = "Wan-AI/Wan2.1-I2V-14B-720P"


def build_parser() -> argparse.ArgumentParser:
    parser = original_parser(PROG, "The original DiffSynth inference script's edit (runs chronoedit-lora edit); "
                                   "every flag defaults to the value the original hard-codes.")
    parser.add_argument("--model", default=CHRONOEDIT, help="ChronoEdit-14B-Diffusers folder (its transformer/)")
    parser.add_argument("--input_image", default="assets/images/input.jpg")
    parser.add_argument("--prompt", default="Add a person wearing red jacket.")
    parser.add_argument("--negative_prompt", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_frames", type=int, default=EDIT_FRAMES, choices=[EDIT_FRAMES, REASONING_FRAMES])
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--cfg_scale", type=float, default=5.0)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--enable_temporal_reasoning", action="store_true")
    parser.add_argument("--num_temporal_reasoning_steps", type=int, default=0)
    parser.add_argument("--lora", help="LoRA to fuse (the original's commented-out pipe.load_lora line)")
    parser.add_argument("--alpha", type=float, default=1.0, help="its scale")
    parser.add_argument("--output", default="output.mp4", help="the clip; the last frame goes beside it as .png")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return parser


def _components(model: Path) -> list[str]:
    """``--tokenizer/--text-encoder/...`` for what the original loads from ``./models``, or nothing for a
    component the diffusers folder has instead."""
    flags = []
    for key in ("text_encoder", "image_encoder", "vae", "tokenizer"):
        try:
            path = diffsynth_tokenizer([WAN_I2V]) if key == "tokenizer" else \
                diffsynth_files(WAN_I2V, WAN_FILES[key][0], "the model config")[0]
        except ChronoEditError:
            if (model / DIFFUSERS_FOLDERS[key]).is_dir():
                continue
            raise
        flags += [f"--{key.replace('_', '-')}", path]
    return flags


def _reasoning_steps(args: argparse.Namespace) -> int:
    """The kit's --temporal-reasoning-steps: 29 frames are denoised until step K (all steps unless cut)."""
    if args.num_frames == EDIT_FRAMES:
        return 0
    if args.enable_temporal_reasoning and args.num_temporal_reasoning_steps > 0:
        return min(args.num_temporal_reasoning_steps, args.num_inference_steps)
    return args.num_inference_steps


def translate(argv: list[str]) -> KitCommand:
    """The ``chronoedit-lora edit`` command for the original script (and its flags)."""
    args = build_parser().parse_args(argv)
    model = Path(args.model)
    if not (model / DIFFUSERS_FOLDERS["dit"]).is_dir():
        raise ChronoEditError(f"{model / DIFFUSERS_FOLDERS['dit']} not found (nothing is downloaded): download "
                              f"the model, e.g. `hf download nvidia/ChronoEdit-14B-Diffusers --local-dir {CHRONOEDIT}`.")
    output = Path(args.output)
    if output.suffix.lower() != ".mp4":
        raise refuse(f"--output {output}", "the clip is written as .mp4 (and the last frame beside it as .png).")
    kit = ["edit", "--model", str(model), *_components(model), "--image", args.input_image, "--prompt", args.prompt,
           "--output", str(output.with_suffix(".png")), "--video", str(output), "--device", args.device,
           "--height", str(args.height), "--width", str(args.width), "--steps", str(args.num_inference_steps),
           "--cfg", str(args.cfg_scale), "--seed", str(args.seed), "--scheduler", "euler", "--shift", "5.0",
           "--vae-tiling", "off", "--temporal-reasoning-steps", str(_reasoning_steps(args))]
    if args.negative_prompt:
        kit += ["--negative-prompt", args.negative_prompt]
    if args.lora:
        kit += ["--lora", f"{args.lora}:{args.alpha}"]
    notes = ["ChronoEdit's temporal positions [0, 7] are used (the original DiffSynth port used [0, 1]: add --rope "
             "legacy to the kit command for those)"]
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        kit.append("--sequence-parallel")
        return KitCommand(kit, notes=notes, launcher=f"torchrun --nproc_per_node {world} scripts/infer.py")
    return KitCommand(kit, notes=notes)


def main(argv: list[str] | None = None) -> int:
    return run_translated(PROG, translate, argv)
