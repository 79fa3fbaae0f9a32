"""Edit images with ChronoEdit: the input is frame 0, the edit is the last frame.

One edit (--image/--prompt/--output) or a batch (--batch edits.csv with columns
image,prompt,output[,seed]). Under torchrun each process takes its own share of the batch.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from ..batch import EditJob, plan_batch, read_batch
from ..errors import ChronoEditError
from ..data.images import open_image
from ..files import check_writable, save_image, save_video
from ..lora import parse_lora_spec
from ..offload import MODES as OFFLOAD_MODES
from ..models.vae import AUTO_TILING_PIXELS, VAE_TILINGS
from ..sampling import PRESETS, SCHEDULERS, check_schedule, default_shift, read_scheduler_config, resolve_scheduler
from ..step_cache import check_step_cache, describe, parse_step_cache, read_calibration
from ..settings import MAX_STEPS, check_device, check_range, check_seed, check_shift, check_size
from .model_args import add_model_arguments, model_options

# shift None: the model folder's scheduler config's flow shift, else 5.0 (see chronoedit_lora.sampling)
DEFAULTS = {"steps": 50, "cfg": 5.0, "shift": None}
GUIDANCE = ("batched", "separate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--image", help="input image")
    parser.add_argument("--prompt", help="edit instruction")
    parser.add_argument("--output", help="edited image (.png)")
    parser.add_argument("--batch", help="CSV of edits (columns image,prompt,output[,seed]; paths relative to it); "
                                        "existing outputs are skipped, so a stopped batch resumes")
    parser.add_argument("--allow-outside", action="store_true",
                        help="allow --batch image/output paths outside the CSV's folder (absolute, ../ or links out)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="distill: 8 steps, cfg 1.0, shift 2.0 (explicit flags win)")
    parser.add_argument("--negative-prompt", default="", help="negative prompt (used when cfg > 1)")
    parser.add_argument("--steps", type=int, help=f"denoising steps, 1 to {MAX_STEPS} (default {DEFAULTS['steps']})")
    parser.add_argument("--cfg", type=float, help=f"classifier-free guidance scale (default {DEFAULTS['cfg']})")
    parser.add_argument("--shift", type=float, help="flow shift of either scheduler (default: the model folder's "
                                                     "scheduler config, else 5.0)")
    parser.add_argument("--scheduler", choices=SCHEDULERS,
                        help="sampler (default: the model folder's scheduler/scheduler_config.json, UniPC for "
                             "ChronoEdit-14B-Diffusers as the official pipeline; euler without one, e.g. Wan files)")
    parser.add_argument("--guidance", choices=GUIDANCE, default="batched",
                        help="with cfg > 1: prompt and negative prompt in one DiT call of batch 2 (batched, "
                             "faster) or in two calls (separate, less activation memory)")
    parser.add_argument("--vae-tiling", choices=VAE_TILINGS, default="auto",
                        help=f"encode/decode in overlapping tiles (less VAE memory); auto: frames above "
                             f"{AUTO_TILING_PIXELS} pixels (1024x1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (a batch row's seed column wins)")
    parser.add_argument("--height", type=int, help="output height (multiple of 16); default: aspect-preserving, area ~720x1280")
    parser.add_argument("--width", type=int, help="output width (multiple of 16)")
    parser.add_argument("--temporal-reasoning-steps", type=int, default=0,
                        help="K > 0: denoise a 29-frame clip for the first K steps (K <= --steps), then only [input, edit]")
    parser.add_argument("--video", help="also write the clip (reasoning frames + edit) as .mp4 (single edits)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="LoRA to fuse into the DiT (repeatable), optional scale (default 1.0)")
    parser.add_argument("--prompt-enhancer", metavar="MODULE:CALLABLE",
                        help="rewrite each instruction into ChronoEdit's detailed form first: f(image, instruction) -> str "
                             "(e.g. chronoedit_lora.captioners.qwen_vl:enhance_prompt)")
    parser.add_argument("--offload", choices=OFFLOAD_MODES, default="auto",
                        help="where the weights live on a GPU: none (all on the GPU), model (each component only for "
                             "its stage), blocks (the DiT's blocks streamed through the GPU), auto (the least that "
                             "fits the free memory; it says what it chose). No effect on a CPU")
    parser.add_argument("--no-context-cache", dest="context_cache", action="store_false",
                        help="project the prompt's and image's cross-attention K/V again at every step instead of "
                             "once per edit (same result; saves its memory: 1.17 GiB at 14B with guidance)")
    parser.add_argument("--step-cache", metavar="METHOD[:LEVEL]",
                        help="skip denoising steps by reusing the DiT block stack's last residual: first-block, mag "
                             "(needs --cache-calibration) or tea, with slow (default), fast or a threshold, e.g. "
                             "mag:fast or first-block:0.08 (off by default; see docs/performance.md)")
    parser.add_argument("--cache-calibration", metavar="JSON",
                        help="the step cache's calibration, written by `chronoedit-lora calibrate-cache`")
    parser.add_argument("--unfused", action="store_true",
                        help="apply LoRAs as hooks instead of fusing them into the weights (base weights untouched)")


def sampling_settings(args: argparse.Namespace) -> dict:
    """steps/cfg/shift: explicit flag, else the preset's value, else the default."""
    preset = PRESETS.get(args.preset, {})
    return {key: getattr(args, key) if getattr(args, key) is not None else preset.get(key, default)
            for key, default in DEFAULTS.items()}


def check_sampling(args: argparse.Namespace, settings: dict) -> None:
    """The size, sampler and noise flags (those ``eval`` shares), before any model loads."""
    check_size(args.height, args.width)
    check_range("--steps", settings["steps"], 1, MAX_STEPS)
    check_range("--cfg", settings["cfg"], 0)  # 1 = no guidance; below 1 it blends towards the negative prompt
    if settings["shift"] is not None:
        check_shift("--shift", settings["shift"])
    check_seed("--seed", args.seed)
    config = read_scheduler_config(args.model)
    check_schedule(resolve_scheduler(args.scheduler, config), settings["steps"],
                   default_shift(config) if settings["shift"] is None else settings["shift"], config)
    check_device(args.device)


def step_cache_options(args: argparse.Namespace, settings: dict) -> dict:
    """``--step-cache`` and ``--cache-calibration`` as ``edit_many`` arguments, checked (the file read;
    ``eval`` has no --temporal-reasoning-steps: its trajectory rows are edited uncached)."""
    spec = parse_step_cache(args.step_cache)
    calibration = read_calibration(args.cache_calibration) if args.cache_calibration else None
    check_step_cache(spec, settings["steps"], getattr(args, "temporal_reasoning_steps", 0), calibration,
                     sequence_parallel=args.sequence_parallel)
    return {"step_cache": spec, "cache_calibration": calibration}


def check_edit_settings(args: argparse.Namespace, settings: dict) -> None:
    """Every flag that can be checked before loading a model."""
    check_sampling(args, settings)
    check_range("--temporal-reasoning-steps", args.temporal_reasoning_steps, 0, settings["steps"])
    step_cache_options(args, settings)


def edit_options(args: argparse.Namespace, settings: dict) -> dict:
    """``edit_many`` keyword arguments from the edit flags and :func:`sampling_settings` (the CLI's
    edits and the web app's go through this one mapping)."""
    return {"height": args.height, "width": args.width, "temporal_reasoning_steps": args.temporal_reasoning_steps,
            "scheduler": args.scheduler, "batched_guidance": args.guidance == "batched",
            "vae_tiling": args.vae_tiling, "context_cache": args.context_cache,
            **step_cache_options(args, settings), **settings}


def _jobs(args: argparse.Namespace) -> list[EditJob]:
    if args.batch:
        if args.image or args.prompt or args.output or args.video:
            raise ChronoEditError("--batch replaces --image/--prompt/--output/--video; give one or the other.")
        return read_batch(args.batch, args.seed, args.allow_outside)
    missing = [flag for flag in ("image", "prompt", "output") if getattr(args, flag) is None]
    if missing:
        raise ChronoEditError(f"missing --{', --'.join(missing)} (or use --batch CSV).")
    return [EditJob(Path(args.image), args.prompt, check_writable(args.output, (".png",)), args.seed, None)]


def run(args: argparse.Namespace) -> int:
    settings = sampling_settings(args)
    check_edit_settings(args, settings)
    loras = [parse_lora_spec(v) for v in args.lora]
    jobs = _jobs(args)
    video = check_writable(args.video, (".mp4",), "--video") if args.video else None
    # with --sequence-parallel every rank works on every edit together (rank 0 writes)
    plan = plan_batch(jobs, skip_existing=bool(args.batch), split=not args.sequence_parallel)
    todo, rank, world = plan.todo, plan.rank, plan.world
    images = {job.image: open_image(job.image) for job in todo}  # every input checked before loading models
    if args.prompt_enhancer:
        from ..plugins import load_callable

        enhance = load_callable(args.prompt_enhancer, "--prompt-enhancer")
        todo = [replace(job, prompt=enhance(images[job.image], job.prompt,
                                            about=f"row {job.row} ({job.image})" if job.row else str(job.image)))
                for job in todo]
        enhance.release()  # e.g. the enhancer's VLM leaves the GPU before ChronoEdit loads
        for job in todo[:3]:
            print(f"enhanced prompt: {job.prompt}")
    if args.batch and rank == 0:
        print(f"{args.batch}: {len(jobs)} edits, {plan.done} already done, {len(jobs) - plan.done} to do"
              + (f" across {world} processes" if world > 1 else ""))

    from ..models.context_cache import guidance_branches  # heavy imports only once the inputs are known good
    from ..pipeline import ChronoEditPipeline, EditRequest

    options = model_options(args)
    if world > 1 and str(options["device"]).startswith("cuda"):
        options["device"] = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    edit_kwargs = edit_options(args, settings)
    if edit_kwargs["step_cache"] is not None and rank == 0:
        print(describe(edit_kwargs["step_cache"], edit_kwargs["cache_calibration"]))
    pipe = ChronoEditPipeline.from_pretrained(**options, offload=args.offload,
                                              context_branches=guidance_branches(settings["cfg"], args.context_cache))
    from ..models.quantized import is_quantized

    for path, scale in loras:  # quantized weights (fp8_base, a GGUF or fp8 file) cannot absorb a LoRA
        pipe.load_lora(path, scale, fuse=not (args.unfused or is_quantized(pipe.dit)))
    requests = [EditRequest(images[job.image], job.prompt, args.negative_prompt, job.seed) for job in todo]
    results = pipe.edit_many(requests, progress=len(todo) == 1, **edit_kwargs)
    started = time.perf_counter()
    for job, result in zip(tqdm(todo, desc=f"edits (rank {rank})" if world > 1 else "edits", disable=len(todo) < 2),
                           results):
        if args.sequence_parallel and rank > 0:
            continue
        save_image(result.image, job.output)
        if len(todo) == 1:
            print(f"edited image: {job.output} ({result.image.width}x{result.image.height}, "
                  f"{time.perf_counter() - started:.1f} s)")
        if video:
            save_video(result.frames, video)
            print(f"clip ({len(result.frames)} frames): {video}")
    pipe.placement.release()  # leave the GPU as it was found
    return 0
