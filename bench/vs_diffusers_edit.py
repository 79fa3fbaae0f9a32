"""The kit's ``chronoedit-lora edit`` vs diffusers' ``ChronoEditPipeline`` on the same checkpoint folder,
each edit a whole process, the two alternating.

    python bench/vs_diffusers_edit.py [--size tiny|mid] [--model DIR] [--repeats 3] [--threads 1] [--json out.json]
    python bench/vs_diffusers_edit.py --caches [--step-caches first-block:fast,tea:fast] [...]
    python bench/vs_diffusers_edit.py --step-cache first-block:fast [...]   (needs cache-dit==1.5.3)

Both sides edit the same input image (already at the edit size, so neither resizes it) with the
same instruction, an empty negative prompt, the folder's scheduler (UniPC, as both load it), the
same steps, cfg, seed and size, in float32 on the CPU. The kit runs its CLI
(``chronoedit_lora.cli.main(["edit", ...])``); diffusers runs ``ChronoEditPipeline.from_pretrained``
and one call, and saves the last frame as the CLI does. Every child has its thread count fixed
(``--threads``, default 1: CPU work, not two processes' contention) and reports, besides what the
parent measures (whole-process wall, CPU and system time, peak RSS), the seconds spent loading
the pipeline and in the edit call. The largest difference between the two edited PNGs is printed
as a check that both did the same work (they agree to a level or so, tests/test_pipeline.py).

``--size`` picks the checkpoint the script writes into a temporary folder (``mid``: ``make-tiny
--size mid``, 128x128, 8 steps, cfg 5; ``tiny``: 32x32, 2 steps), unless ``--model`` names one.
Prints medians, ranges, the ratio of the medians and the paired ratios (each repeat's own
kit/diffusers ratio); never asserts a time.

``--caches`` adds kit sides to the same alternation: ``kit uncached`` (``--no-context-cache``; the
plain ``kit`` side has the context cache, the default) and ``kit SPEC`` for each ``--step-caches``
value (``--step-cache SPEC``; mag needs a calibration file, so it is left to ``edit_latency.py
--caches``). Each kit side's edit call is then given against diffusers' and against the uncached kit
(paired), with the largest PNG difference from the uncached kit's edit.

``--step-cache SPEC`` adds the peer a user would pick: ``kit SPEC`` (the kit's edit with ``--step-cache
SPEC``) and ``cache-dit SPEC``, diffusers' ``ChronoEditPipeline`` with cache-dit's DBCache set to
compute the same steps: each repeat's ``kit SPEC`` run reports which denoising steps ran the whole
block stack, and DBCache gets them as its ``steps_computation_mask`` with the ``static`` policy (the
other steps reuse the cached residual, as the kit's do), ``Fn_compute_blocks=1`` (cache-dit's least:
its first block always runs, like the kit's first-block cache; the kit's mag and tea run none on a
skipped step) and ``Bn_compute_blocks=0``. Both children count, by forward hooks, the DiT calls
and the passes of the first and of the last block (each guidance branch counted: the kit's batch-2
call is two), and both counts are printed. Printed: the paired kit/cache-dit ratios and each side's
difference (largest PNG level, PSNR) from its own uncached edit (``kit``, whose context cache is
exact, and ``diffusers``). ``--cache-calibration`` is passed to the kit for ``mag``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_diffsynth import PEAK_MARKER, paired_ratios, run_child, summarise  # noqa: E402  (bench/ is not a package)

SIDES = ("kit", "diffusers")
CALLS_MARKER = "DIT_CALLS"
SETTINGS = {"tiny": {"side": 32, "steps": 2, "cfg": 5.0}, "mid": {"side": 128, "steps": 8, "cfg": 5.0}}
PROMPT = "The user wants to turn the photo into a watercolor painting, keeping the composition."
SEED = 0
TIMES_MARKER = "EDIT_TIMES"
METRICS = ("wall_s", "cpu_s", "sys_s", "peak_rss_mb", "load_s", "edit_s", "other_s")

# Shared by both children: time loading and the edit call, then print them and the peak RSS.
TIMING = """
import json, resource, sys, time
import torch
torch.set_num_threads({threads})
times = {{}}

def timed(name, fn, consume=False):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
            return list(result) if consume else result  # consume: a generator (the kit's edit_many), run it here
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
    return run

# DiT calls and block passes, each guidance branch counted (a batch of 2 is two); the steps that ran the last block
calls = {{"dit_passes": 0, "first_block_passes": 0, "stack_passes": 0}}
computed_steps, step = [], [-1]

def count_blocks(blocks):
    def add(key):
        def hook(module, inputs, output):
            calls[key] += (output if isinstance(output, torch.Tensor) else output[0]).shape[0]
            if key == "stack_passes" and step[0] not in computed_steps:
                computed_steps.append(step[0])
        return hook
    blocks[0].register_forward_hook(add("first_block_passes"))
    blocks[-1].register_forward_hook(add("stack_passes"))
"""
DONE = (f"\nprint('{CALLS_MARKER}', json.dumps(dict(calls, computed_steps=computed_steps)))"
        f"\nprint('{TIMES_MARKER}', json.dumps(times))"
        f"\nprint('{PEAK_MARKER}', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
KIT_CHILD = TIMING + """
from chronoedit_lora import pipeline
from chronoedit_lora.cli import main
load, guided, predict = (getattr(pipeline.ChronoEditPipeline, name)
                         for name in ("from_pretrained", "guided_velocity", "predict_velocity"))

def loaded(*args, **kwargs):
    pipe = load(*args, **kwargs)
    count_blocks(pipe.dit.blocks)
    return pipe

def stepped(self, *args, **kwargs):  # one call per denoising step
    step[0] += 1
    return guided(self, *args, **kwargs)

def predicted(self, latents, *args, **kwargs):  # one DiT call
    calls["dit_passes"] += latents.shape[0]
    return predict(self, latents, *args, **kwargs)

pipeline.ChronoEditPipeline.guided_velocity, pipeline.ChronoEditPipeline.predict_velocity = stepped, predicted
pipeline.ChronoEditPipeline.from_pretrained = timed("load_s", loaded)
pipeline.ChronoEditPipeline.edit_many = timed("edit_s", pipeline.ChronoEditPipeline.edit_many, consume=True)
main({args!r})""" + DONE
DIFFUSERS_CHILD = TIMING + """
from diffusers import ChronoEditPipeline
from PIL import Image
model, image, output, side, steps, cfg, seed, prompt, mask = {args!r}
pipe = timed("load_s", ChronoEditPipeline.from_pretrained)(model, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
count_blocks(pipe.transformer.blocks)

def counted(module, args, kwargs):  # one DiT call; the guidance branches are separate calls, cond first
    calls["dit_passes"] += kwargs["hidden_states"].shape[0]
    step[0] = (calls["dit_passes"] - 1) // (2 if cfg > 1 else 1)

pipe.transformer.register_forward_pre_hook(counted, with_kwargs=True)
if mask is not None:  # cache-dit's DBCache computing the whole block stack at exactly the steps the mask marks
    import cache_dit
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=steps, steps_computation_mask=mask,
        steps_computation_policy="static"))
frames = timed("edit_s", pipe)(image=Image.open(image).convert("RGB"), prompt=prompt, negative_prompt="",
                               height=side, width=side, num_frames=5, num_inference_steps=steps,
                               guidance_scale=cfg, generator=torch.Generator().manual_seed(seed),
                               output_type="pil").frames[0]
frames[-1].save(output)""" + DONE


def kit_command(model: Path, image: Path, output: Path, settings: dict, threads: int, extra: tuple = ()) -> list[str]:
    args = ["edit", "--model", str(model), "--image", str(image), "--prompt", PROMPT, "--output", str(output),
            "--height", str(settings["side"]), "--width", str(settings["side"]), "--steps", str(settings["steps"]),
            "--cfg", str(settings["cfg"]), "--seed", str(SEED), "--scheduler", "unipc", "--dtype", "float32",
            "--device", "cpu", *extra]
    return [sys.executable, "-c", KIT_CHILD.format(threads=threads, args=args)]


def diffusers_command(model: Path, image: Path, output: Path, settings: dict, threads: int,
                      mask: list[int] | None = None) -> list[str]:
    """diffusers' ChronoEditPipeline; with ``mask``, under cache-dit's DBCache computing the steps it marks 1."""
    args = [str(model), str(image), str(output), settings["side"], settings["steps"], settings["cfg"], SEED, PROMPT,
            mask]
    return [sys.executable, "-c", DIFFUSERS_CHILD.format(threads=threads, args=args)]


def timed_edit(command: list[str], threads: int) -> dict:
    """One child's figures: the parent's measurements plus its load and edit seconds."""
    figures = run_child(command, threads)
    lines = figures.pop("stdout").splitlines()
    for marker in (TIMES_MARKER, CALLS_MARKER):
        figures.update(json.loads([line for line in lines if line.startswith(marker)][-1][len(marker):]))
    figures["other_s"] = figures["wall_s"] - figures["load_s"] - figures["edit_s"]  # imports, inputs, saving, exit
    return figures


def make_input(path: Path, side: int) -> Path:
    """A structured RGB image at the edit size (gradients and a square)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([x * 255 // side, y * 255 // side, ((x // 8 + y // 8) % 2) * 255], axis=-1).astype(np.uint8)
    rgb[side // 4: side // 2, side // 3: 2 * side // 3] = (250, 40, 40)
    Image.fromarray(rgb).save(path)
    return path


def png_difference(a: Path, b: Path) -> int:
    """The largest difference of two PNGs, in 8-bit levels."""
    import numpy as np
    from PIL import Image

    return int(np.abs(np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16)).max())


def print_table(size: str, settings: dict, repeats: int, threads: int, summary: dict, levels: int) -> None:
    print(f"\nkit edit vs diffusers ChronoEditPipeline, {size} ({settings['side']}x{settings['side']}, "
          f"{settings['steps']} steps, cfg {settings['cfg']}, UniPC, CPU float32, {threads} thread(s), median "
          f"[min-max] of {repeats}; paired: each repeat's own ratio)")
    labels = {"wall_s": "process wall s", "cpu_s": "process CPU s", "sys_s": "system CPU s",
              "peak_rss_mb": "peak RSS MB", "load_s": "load s", "edit_s": "edit call s", "other_s": "rest of wall s"}
    print(f"{'figure':<16}{'kit':>24}{'diffusers':>24}{'kit/diffusers':>15}{'paired':>22}")
    for key, label in labels.items():
        cells = [f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]" for s in (summary[side][key] for side in SIDES)]
        paired = summary["paired"][key]
        print(f"{label:<16}{cells[0]:>24}{cells[1]:>24}{summary['ratio'][key]:>14.2f}x"
              f"{paired['median']:>9.2f}x [{paired['min']:.2f}-{paired['max']:.2f}]")
    print(f"largest difference between the two edited PNGs: {levels} levels of 255")


def peer_figures(run: dict, output: Path, uncached: Path) -> dict:
    """One step-cached side: its DiT calls and block passes, and its edit against its own uncached edit."""
    from PIL import Image

    from chronoedit_lora.eval.image_metrics import psnr

    with Image.open(output) as edit, Image.open(uncached) as reference:
        quality = {"png_difference_levels": png_difference(output, uncached), "psnr_db": psnr(edit, reference)}
    return {key: run[key] for key in ("dit_passes", "first_block_passes", "stack_passes", "computed_steps")} | quality


def print_peer_table(figures: dict, summary: dict) -> None:
    kit_side, peer_side = (side for side in figures if side != "paired")
    print(f"\n{kit_side} vs {peer_side} (DBCache given the kit's computed steps; passes: each guidance branch counted)")
    print(f"{'side':<24}{'DiT passes':>11}{'first block':>12}{'whole stack':>12}{'edit call s':>12}"
          f"{'vs own uncached: PNG levels':>29}{'PSNR dB':>9}")
    for side in (kit_side, peer_side):
        row = figures[side]
        print(f"{side:<24}{row['dit_passes']:>11}{row['first_block_passes']:>12}{row['stack_passes']:>12}"
              f"{summary[side]['edit_s']['median']:>12.2f}{row['png_difference_levels']:>29}{row['psnr_db']:>9.1f}")
    paired = figures["paired"]
    print("paired kit/cache-dit: " + ", ".join(f"{label} {paired[key]['median']:.2f}x [{paired[key]['min']:.2f}-"
                                                 f"{paired[key]['max']:.2f}]" for key, label in
                                                 (("edit_s", "edit call"), ("wall_s", "process wall"))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SETTINGS), default="mid")
    parser.add_argument("--model", help="an existing checkpoint folder (diffusers layout) instead of writing one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP/MKL threads in each child")
    parser.add_argument("--steps", type=int, help="denoising steps instead of the size's (a step cache needs 3 or more)")
    parser.add_argument("--caches", action="store_true", help="also the uncached kit and the kit with step caches")
    parser.add_argument("--step-caches", default="first-block:fast,tea:fast", help="with --caches: --step-cache values")
    parser.add_argument("--step-cache", metavar="SPEC", help="also the kit with --step-cache SPEC and diffusers with "
                        "cache-dit's DBCache computing the same steps")
    parser.add_argument("--cache-calibration", help="with --step-cache mag: the kit's calibration file")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.step_cache and importlib.util.find_spec("cache_dit") is None:
        parser.error("--step-cache runs diffusers under cache-dit: pip install cache-dit==1.5.3 (the test extra pins it)")
    settings = {**SETTINGS[args.size], **({"steps": args.steps} if args.steps else {})}
    extras: dict[str, tuple | None] = {"kit": (), "diffusers": None}
    if args.caches:
        extras |= {"kit uncached": ("--no-context-cache",)}
        extras |= {f"kit {spec}": ("--step-cache", spec) for spec in args.step_caches.split(",")}
    if args.step_cache:  # the cache-dit side follows the kit side it copies the computed steps of
        calibration = ("--cache-calibration", args.cache_calibration) if args.cache_calibration else ()
        extras[f"kit {args.step_cache}"] = ("--step-cache", args.step_cache, *calibration)
        extras[f"cache-dit {args.step_cache}"] = None
    runs: dict[str, list[dict]] = {side: [] for side in extras}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tmp / args.size
        if not args.model:
            subprocess.run([sys.executable, "-m", "chronoedit_lora.cli", "make-tiny", str(model), "--size", args.size],
                           check=True, capture_output=True)
        image = make_input(tmp / "input.png", settings["side"])
        for repeat in range(args.repeats):
            for side, extra in extras.items():
                output = tmp / f"{side.replace(' ', '_')}-{repeat}.png"
                mask = None
                if side.startswith("cache-dit"):
                    computed = runs[f"kit {args.step_cache}"][-1]["computed_steps"]
                    mask = [int(i in computed) for i in range(settings["steps"])]
                command = diffusers_command(model, image, output, settings, args.threads, mask) if extra is None \
                    else kit_command(model, image, output, settings, args.threads, extra)
                runs[side].append(timed_edit(command, args.threads))
                print(f"repeat {repeat} {side:<10}" + "  ".join(f"{k}={runs[side][-1][k]:.2f}" for k in METRICS),
                      flush=True)
        levels = png_difference(tmp / "kit-0.png", tmp / "diffusers-0.png")
        cache_levels = {side: png_difference(tmp / f"{side.replace(' ', '_')}-0.png", tmp / "kit_uncached-0.png")
                        for side in extras if side.startswith("kit") and args.caches}
        if args.step_cache:
            peer = {side: peer_figures(runs[side][0], tmp / f"{side.replace(' ', '_')}-0.png", tmp / f"{own}-0.png")
                    for side, own in ((f"kit {args.step_cache}", "kit"), (f"cache-dit {args.step_cache}", "diffusers"))}
    summary: dict = {side: summarise(runs[side], METRICS) for side in extras}
    summary["ratio"] = {k: summary["kit"][k]["median"] / summary["diffusers"][k]["median"] for k in METRICS}
    summary["paired"] = paired_ratios(runs["kit"], runs["diffusers"], METRICS)
    print_table(args.size, settings, args.repeats, args.threads, summary, levels)
    if args.caches:
        summary["caches"] = {side: {"vs_diffusers": paired_ratios(runs[side], runs["diffusers"], METRICS),
                                    "vs_uncached": paired_ratios(runs[side], runs["kit uncached"], METRICS),
                                    "png_difference_levels": cache_levels[side]} for side in cache_levels}
        print(f"\n{'kit side':<26}{'edit call s':>12}{'/diffusers':>12}{'/uncached kit':>15}{'PNG diff':>10}")
        for side, figures in summary["caches"].items():
            print(f"{side:<26}{summary[side]['edit_s']['median']:>12.2f}{figures['vs_diffusers']['edit_s']['median']:>11.2f}x"
                  f"{figures['vs_uncached']['edit_s']['median']:>14.2f}x{figures['png_difference_levels']:>10}")
    if args.step_cache:
        kit_side, peer_side = peer
        summary["step_cache"] = {**peer, "paired": paired_ratios(runs[kit_side], runs[peer_side], METRICS)}
        print_peer_table(summary["step_cache"], summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "settings": settings, "repeats": args.repeats,
                                               "threads": args.threads, "runs": runs, "summary": summary,
                                               "png_difference_levels": levels}, indent=2))


if __name__ == "__main__":
    main()
