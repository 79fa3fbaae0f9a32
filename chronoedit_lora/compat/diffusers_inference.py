"""``python scripts/run_inference_diffusers.py`` with the original release's flags -> ``chronoedit-lora edit``.

The original writes the last frame as a PNG beside ``--output`` (or at ``--output-image``) and the
clip only in temporal-reasoning mode; here an ``.mp4`` ``--output`` always gets the clip.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..captioners.qwen_vl import MODEL_ENV
from .common import KitCommand, local_model, original_parser, refuse, run_translated

PROG = "run_inference_diffusers.py"
ENHANCER = "chronoedit_lora.captioners.qwen_vl:enhance_prompt"
ENHANCER_MODELS = ("Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")
REASONING_STEPS = 50  # the original's --num-temporal-reasoning-steps default


def build_parser() -> argparse.ArgumentParser:
    parser = original_parser(PROG, "ChronoEdit image editing with the original release's flags (runs chronoedit-lora edit).")
    parser.add_argument("--use-prompt-enhancer", action="store_true", help="rewrite the prompt with a local Qwen-VL model first")
    parser.add_argument("--prompt-enhancer-model", "--prompt_enhancer_model", default=ENHANCER_MODELS[0],
                        help=f"local folder or Hugging Face cache id, e.g. {' or '.join(ENHANCER_MODELS)}")
    parser.add_argument("--model-path", "--model-id", default="nvidia/ChronoEdit-14B-Diffusers",
                        help="ChronoEdit-14B-Diffusers folder (or a Hugging Face cache id)")
    parser.add_argument("--lora-path", nargs="+", default=[], help="LoRA file(s), all fused at --lora-scale")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("-i", "--input", required=True, help="input image")
    parser.add_argument("-o", "--output", default="output.mp4", help="the clip (.mp4); the last frame goes beside it as .png")
    parser.add_argument("--output-image", help="the last frame (default: --output with .png)")
    parser.add_argument("-p", "--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--flow-shift", type=float, default=5.0)
    parser.add_argument("--seed", type=int, help="noise seed (default: the kit's, 0; the original drew a random one)")
    parser.add_argument("--offload_model", action="store_true", help="each component on the GPU only for its stage")
    parser.add_argument("--disable-guardrails", action="store_true", help="accepted; the kit has no guardrails")
    parser.add_argument("--enable-temporal-reasoning", action="store_true")
    parser.add_argument("--num-temporal-reasoning-steps", type=int, default=REASONING_STEPS)
    parser.add_argument("-v", "--verbose", action="store_true", help="accepted; the kit always reports what it does")
    return parser


def translate(argv: list[str]) -> KitCommand:
    """The ``chronoedit-lora edit`` command for the original flags."""
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    image = args.output_image or str(output.with_suffix(".png"))
    kit = ["edit", "--model", local_model(args.model_path, "--model-path"), "--image", args.input,
           "--prompt", args.prompt, "--output", image, "--device", args.device,
           "--steps", str(args.num_inference_steps), "--cfg", str(args.guidance_scale),
           "--scheduler", "unipc", "--shift", str(args.flow_shift)]
    if output.suffix.lower() == ".mp4":
        kit += ["--video", str(output)]
    if args.negative_prompt:
        kit += ["--negative-prompt", args.negative_prompt]
    for flag, value in (("--height", args.height), ("--width", args.width), ("--seed", args.seed)):
        if value is not None:
            kit += [flag, str(value)]
    for path in args.lora_path:
        kit += ["--lora", f"{path}:{args.lora_scale}"]
    if args.offload_model:
        kit += ["--offload", "model"]
    if args.enable_temporal_reasoning:
        if args.num_temporal_reasoning_steps < 1:
            raise refuse("--num-temporal-reasoning-steps 0 with --enable-temporal-reasoning",
                         "the kit reasons for K >= 1 steps; give K >= 1, or drop --enable-temporal-reasoning.")
        # diffusers' pipeline denoises the 29-frame clip until step K, then the edit alone
        kit += ["--temporal-reasoning-steps", str(min(args.num_temporal_reasoning_steps, args.num_inference_steps))]
    env = {}
    if args.use_prompt_enhancer:
        env[MODEL_ENV] = local_model(args.prompt_enhancer_model, "--prompt-enhancer-model")
        kit += ["--prompt-enhancer", ENHANCER]
    notes = [] if args.seed is not None else ["no --seed: the kit's default seed 0 is used (the original drew a random one)"]
    return KitCommand(kit, env, notes)


def main(argv: list[str] | None = None) -> int:
    return run_translated(PROG, translate, argv)
