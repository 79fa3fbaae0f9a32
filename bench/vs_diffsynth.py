"""The kit's LoRA training vs DiffSynth's own training path (the installed ``diffsynth`` package),
on the same checkpoint, pairs, resolution, rank, LoRA targets, dtype and step count.

    python bench/vs_diffsynth.py [--size tiny|mid] [--steps N] [--repeats 3] [--threads 1] [--json out.json]
    python bench/vs_diffsynth.py --profile DIR [...]   # also: one cProfile'd run per side and mode

Method. Every training run is its own child process, kit and DiffSynth runs alternating, so machine
load affects both columns alike. For each run the parent records whole-process wall time, CPU time
(``RUSAGE_CHILDREN`` user + system, delta around the child) and the child's own peak RSS; s/step is
the median over the steps after the first (warm-up). ``--threads`` (default 1) sets OMP/MKL and
``torch.set_num_threads`` in the children, so figures are CPU work, not two processes' contention.
Two modes:

* uncached: the encoders (umT5, CLIP, VAE) run every step. Kit: ``chronoedit-lora train --cache
  false``. DiffSynth: its normal ``sft`` training.
* cached: kit: ``--cache true`` with a cache filled beforehand (not timed) and copied in; its DiT is
  loaded without the encoders. DiffSynth: its split training; ``sft:data_process``
  (``launch_data_process_task``) writes the processed pipeline inputs of the 12 pairs once (not
  timed), then ``sft:train`` trains from those ``.pth`` files through DiffSynth's ``UnifiedDataset``
  (``metadata_path=None``), with a pipeline holding only the DiT, as the kit's cached run does.

The DiffSynth side is built as DiffSynth-Studio's Wan example does
(``examples/wanvideo/model_training/train.py``): a ``WanTrainingModule`` subclass of
``DiffusionTrainingModule`` that splits the pipeline units for the task, patches peft LoRA on the
DiT (``switch_pipe_to_training_mode``), runs the pipeline units on the raw sample and takes
``FlowMatchSFTLoss``; ``launch_training_task`` (AdamW, ConstantLR, accelerate) is the loop, with a
``ModelLogger`` subclass that only adds a per-step timestamp. Settings come from the package's own
argument parser (``add_general_config``), so its defaults (weight decay 0.01, 0 data workers) hold.

What differs, and why it does not change the work per step:

* Loading. DiffSynth cannot load the kit's diffusers-layout tiny checkpoint through its file
  registry (the diffusers text_encoder/, image_encoder/ and vae/ folders are not registered, and
  its CLIP and VAE classes have hard-coded widths the tiny models do not have), so its
  ``WanVideoPipeline`` is the one the kit builds: ``ChronoEditPipeline.from_pretrained(...).core``,
  which is a DiffSynth ``WanVideoPipeline`` holding the same models. Both sides therefore share
  the loading code; the start-up difference is what each does after loading.
* RoPE. The kit applies ChronoEdit's temporal-skip RoPE (positions [0, 7] for the 2 latent
  frames); DiffSynth stock ``model_fn_wan_video`` uses [0, 1]. Same FLOPs.
* Data. DiffSynth's module is fed the kit's pairs as DiffSynth's dataset would deliver them: the
  kit's ``EditPairDataset`` clip (3, 5, H, W) [src, tgt x4], converted to 5 PIL frames (lossless:
  the clip came from 8-bit images), ``prompt``, and ``input_image`` = frame 0 (the example's
  ``--extra_inputs input_image``). DiffSynth's units then encode them as the kit does.
* Gradient checkpointing. The stock example forces it on; here both sides use the kit config's
  setting (off in ``configs/tiny_cpu.toml``), so both run the same forward+backward.
* Extras the kit does and the stock loop does not: gradient clipping (``max_grad_norm`` 1.0) and a
  finite-gradient check per step (one gradient-norm computation serves both), TensorBoard scalars,
  a checkpoint (optimizer + RNG state) at the last step, a loss plot and a model card at the end.
  They are part of its figures.
* Step time: the same interval on both sides, from the end of one optimizer step to the end of
  the next (the whole loop: waiting for data, the step, logging). Kit: the differences of its
  ``metrics.csv`` ``time`` column. DiffSynth: consecutive ``on_step_end`` calls.

Prints the medians, min-max, the kit/DiffSynth ratio of the medians and the paired ratios (the median
and range of each repeat's own kit/DiffSynth ratio); never asserts a time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import CONFIG, SIDE, model_and_cache, train_args  # noqa: E402  (bench/ is not a package)

DEFAULT_STEPS = {"tiny": 24, "mid": 5}
MODES = ("uncached", "cached")
SIDES = ("kit", "diffsynth")
PEAK_MARKER = "PEAK_RSS_KB"
KIT_COMPILED = "kit compiled"  # with --compile: the kit with compiled DiT blocks, paired with the same DiffSynth run
METRICS = ("s_per_step", "first_step_s", "wall_s", "cpu_s", "peak_rss_mb", "non_step_s")

# The kit's run: its own CLI, in a child with the thread count fixed.
KIT_CHILD = (
    "import resource, sys, torch; torch.set_num_threads({threads}); "
    "from chronoedit_lora.cli import main; main({args!r}); "
    f"print('{PEAK_MARKER}', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


# -- the DiffSynth side (runs in the child) -----------------------------------------------------

def diffsynth_child(task: str, model: str, output: str, steps: int, side: int, threads: int, processed: str | None) -> None:
    """One DiffSynth run: ``sft`` (uncached), ``sft:data_process`` (fill) or ``sft:train`` (cached)."""
    import accelerate
    import torch
    from diffsynth.core import UnifiedDataset
    from diffsynth.diffusion import (DiffusionTrainingModule, FlowMatchSFTLoss, ModelLogger, add_general_config,
                                     launch_data_process_task, launch_training_task)

    from chronoedit_lora.data import EditPairDataset
    from chronoedit_lora.pipeline import ChronoEditPipeline
    from chronoedit_lora.train.loop.config import load_config
    from chronoedit_lora.video import tensor_to_pil

    torch.set_num_threads(threads)
    config = load_config(CONFIG, {"model": model})
    torch.manual_seed(config.seed)

    class WanTrainingModule(DiffusionTrainingModule):
        """DiffSynth's Wan example module, given a built pipeline instead of model paths."""

        def __init__(self, pipe: Any, task: str, lora_target_modules: str, lora_rank: int,
                     use_gradient_checkpointing: bool, extra_inputs: list[str]):
            super().__init__()
            self.pipe = self.split_pipeline_units(task, pipe, None, "dit")
            self.switch_pipe_to_training_mode(self.pipe, None, "dit", lora_target_modules, lora_rank, task=task)
            self.use_gradient_checkpointing = use_gradient_checkpointing
            self.extra_inputs = extra_inputs
            self.task = task

        def get_pipeline_inputs(self, data: dict) -> tuple[dict, dict, dict]:
            inputs_shared = {
                "input_video": data["video"], "height": data["video"][0].size[1], "width": data["video"][0].size[0],
                "num_frames": len(data["video"]), "cfg_scale": 1, "tiled": False, "rand_device": self.pipe.device,
                "use_gradient_checkpointing": self.use_gradient_checkpointing,
                "use_gradient_checkpointing_offload": False, "cfg_merge": False, "vace_scale": 1,
                "max_timestep_boundary": 1.0, "min_timestep_boundary": 0.0,
            }
            for name in self.extra_inputs:  # the example's "input_image" is the clip's first frame
                inputs_shared[name] = data["video"][0] if name == "input_image" else data[name]
            return inputs_shared, {"prompt": data["prompt"]}, {}

        def forward(self, data: dict, inputs: tuple | None = None) -> Any:
            if inputs is None:
                inputs = self.get_pipeline_inputs(data)
            inputs = self.transfer_data_to_device(inputs, self.pipe.device, self.pipe.torch_dtype)
            for unit in self.pipe.units:
                inputs = self.pipe.unit_runner(unit, self.pipe, *inputs)
            if self.task.endswith(":data_process"):
                return inputs
            shared, posi, _ = inputs
            return FlowMatchSFTLoss(self.pipe, **shared, **posi)

    class TimedLogger(ModelLogger):
        """DiffSynth's logger plus a timestamp per step, written as the kit's metrics.csv columns."""

        def __init__(self, output_path: str):
            super().__init__(output_path, remove_prefix_in_ckpt="pipe.dit.")
            self.times = [time.time()]  # the loop's start, then every step's end

        def on_step_end(self, accelerator: Any, model: Any, save_steps: int | None = None, **kwargs: Any) -> None:
            super().on_step_end(accelerator, model, save_steps, **kwargs)
            self.times.append(time.time())

    class KitPairs(torch.utils.data.Dataset):
        """The kit's training clips as DiffSynth's video dataset delivers them (PIL frames + prompt)."""

        load_from_cache = False

        def __init__(self, length: int):
            self.pairs = EditPairDataset(ROOT / config.dataset, side, side, config.max_pixels)
            self.length = length

        def __len__(self) -> int:
            return self.length

        def __getitem__(self, index: int) -> dict:
            item = self.pairs[index % len(self.pairs)]
            video = item["video"]
            return {"video": [tensor_to_pil(video[:, f]) for f in range(video.shape[1])], "prompt": item["prompt"]}

    args = add_general_config(argparse.ArgumentParser()).parse_args([
        "--dataset_base_path", processed or str(ROOT / config.dataset), "--output_path", output,
        "--learning_rate", str(config.learning_rate), "--lora_base_model", "dit",
        "--lora_target_modules", ",".join(config.targets), "--lora_rank", str(config.rank),
        "--extra_inputs", "input_image", "--task", task, "--save_steps", str(10**9),
    ])
    dtype = getattr(torch, config.dtype)
    pipe = ChronoEditPipeline.from_pretrained(model, dtype=dtype, encoders=task != "sft:train").core
    module = WanTrainingModule(pipe, task, args.lora_target_modules, args.lora_rank,
                               config.gradient_checkpointing, args.extra_inputs.split(","))
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    logger = TimedLogger(output)
    if task == "sft:data_process":
        launch_data_process_task(accelerator, KitPairs(len(EditPairDataset(ROOT / config.dataset, side, side))),
                                 module, logger, args=args)
        return
    dataset = UnifiedDataset(base_path=processed, metadata_path=None, max_data_items=steps) if processed else KitPairs(steps)
    launch_training_task(accelerator, dataset, module, logger, args=args)
    metrics = Path(output) / "logs" / "metrics.csv"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    with metrics.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "seconds", "time"])
        ends = logger.times
        writer.writerows((step, ends[step] - ends[step - 1], ends[step]) for step in range(1, len(ends)))
    print(PEAK_MARKER, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# -- the parent ------------------------------------------------------------------------------

def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               DIFFSYNTH_SKIP_DOWNLOAD="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def run_child(command: list[str], threads: int) -> dict:
    """Run one child; its wall time, CPU time (user + system, and system alone), peak RSS (the
    child's own) and ``stdout``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=child_env(threads))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{result.stderr[-3000:]}")
    system = after.ru_stime - before.ru_stime
    peak = [line for line in result.stdout.splitlines() if line.startswith(PEAK_MARKER)]
    return {"wall_s": wall, "cpu_s": after.ru_utime - before.ru_utime + system, "sys_s": system,
            "peak_rss_mb": int(peak[-1].split()[1]) / 1024 if peak else float("nan"), "stdout": result.stdout}


def kit_command(model: Path, output: Path, cached: bool, steps: int, side: int, threads: int,
                compile: bool = False) -> list[str]:
    args = ["train", *train_args(model, output, side), "--max_steps", str(steps), "--save_every", "100000",
            "--cache", str(cached).lower(), "--compile", str(compile).lower()]
    return [sys.executable, "-c", KIT_CHILD.format(threads=threads, args=args)]


def diffsynth_command(task: str, model: Path, output: Path, steps: int, side: int, threads: int,
                      processed: Path | None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", task, "--model", str(model), "--output",
               str(output), "--steps", str(steps), "--side", str(side), "--threads", str(threads)]
    return command + (["--processed", str(processed)] if processed else [])


def timed_run(command: list[str], output: Path, threads: int) -> dict:
    figures = run_child(command, threads)
    del figures["stdout"]
    rows = list(csv.DictReader((output / "logs" / "metrics.csv").open()))
    ends = [float(r["time"]) for r in rows]
    figures["s_per_step"] = statistics.median(b - a for a, b in zip(ends, ends[1:]))  # step end to step end
    figures["first_step_s"] = float(rows[0]["seconds"])  # with compiled blocks: the compilation too
    figures["non_step_s"] = figures["wall_s"] - sum(float(r["seconds"]) for r in rows)  # start-up, teardown, between steps
    figures["steps"] = len(rows)
    return figures


def summarise(runs: list[dict], keys: tuple[str, ...] = METRICS) -> dict:
    return {key: {"median": statistics.median(r[key] for r in runs), "min": min(r[key] for r in runs),
                  "max": max(r[key] for r in runs)} for key in keys}


def paired_ratios(kit: list[dict], other: list[dict], keys: tuple[str, ...] = METRICS) -> dict:
    """Each repeat's own kit/other ratio (its two runs ran back to back), then their median and
    range: steadier than the ratio of medians when the machine's speed drifts between repeats."""
    return summarise([{key: k[key] / o[key] for key in keys} for k, o in zip(kit, other)], keys)


def print_table(size: str, side: int, steps: int, repeats: int, threads: int, summary: dict) -> None:
    kits = [name for name in (SIDES[0], KIT_COMPILED) if name in next(iter(summary.values()))]
    print(f"\nkit vs DiffSynth LoRA training, {size} ({side}x{side}, CPU float32, {steps} steps, "
          f"{threads} thread(s), median [min-max] of {repeats}; paired: each repeat's own ratio)")
    labels = {"s_per_step": "s/step", "first_step_s": "first step s", "wall_s": "process wall s",
              "cpu_s": "process CPU s", "peak_rss_mb": "peak RSS MB", "non_step_s": "non-step wall s"}
    print(f"{'mode':<10}{'figure':<17}" + "".join(f"{name:>25}" for name in (*kits, "DiffSynth"))
          + "".join(f"{name + '/DS, paired':>34}" for name in kits))
    for mode in summary:
        for key, label in labels.items():
            cells = []
            for side_name in (*kits, "diffsynth"):
                s = summary[mode][side_name][key]
                cells.append(f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]" if key != "peak_rss_mb"
                             else f"{s['median']:.0f} [{s['min']:.0f}-{s['max']:.0f}]")
            for name in kits:
                ratio, paired = summary[mode][f"{name} ratio"][key], summary[mode][f"{name} paired"][key]
                cells.append(f"{ratio:.2f}x, {paired['median']:.2f}x [{paired['min']:.2f}-{paired['max']:.2f}]")
            print(f"{mode:<10}{label:<17}" + "".join(f"{cell:>25}" for cell in cells[:len(kits) + 1])
                  + "".join(f"{cell:>34}" for cell in cells[len(kits) + 1:]))


def profile(model: Path, cache: Path, processed: Path, tmp: Path, steps: int, side: int, threads: int,
            out_dir: Path, top: int = 25) -> dict:
    """One cProfile'd run of each side in each mode; prints the top ``top`` entries by cumulative time."""
    import pstats

    out_dir.mkdir(parents=True, exist_ok=True)
    found: dict = {}
    for mode in MODES:
        cached = mode == "cached"
        for side_name in SIDES:
            output = tmp / f"profile-{side_name}-{mode}"
            prof = out_dir / f"{side_name}-{mode}.prof"
            if side_name == "kit":
                if cached:
                    shutil.copytree(cache, output / "cache")
                command = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "chronoedit_lora.cli", "train",
                           *train_args(model, output, side), "--max_steps", str(steps), "--save_every", "100000",
                           "--cache", str(cached).lower()]
            else:
                command = diffsynth_command("sft:train" if cached else "sft", model, output, steps, side, threads,
                                            processed if cached else None)
                command[1:1] = ["-m", "cProfile", "-o", str(prof)]
            figures = run_child(command, threads)
            stats = pstats.Stats(str(prof))
            print(f"\n=== cProfile, {side_name}, {mode}, {steps} steps: wall {figures['wall_s']:.2f} s, "
                  f"profiled total {stats.total_tt:.2f} s ===")
            stats.sort_stats("cumulative").print_stats(top)
            found[f"{side_name}-{mode}"] = {"profile": str(prof), "wall_s": figures["wall_s"], "profiled_s": stats.total_tt}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIDE), default="tiny")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP/MKL threads in each child")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--profile", help="also profile one run of each side and mode (cProfile); .prof files go here")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which modes to run")
    parser.add_argument("--compile", action="store_true",
                        help="also run the kit with compiled DiT blocks in each mode, paired with the same DiffSynth run")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one DiffSynth task
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--processed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        diffsynth_child(args.child, args.model, args.output, args.steps, args.side, args.threads, args.processed)
        return
    steps, side = args.steps or DEFAULT_STEPS[args.size], SIDE[args.size]
    kits = ("kit", KIT_COMPILED) if args.compile else ("kit",)
    modes = [mode for mode in MODES if mode in args.modes]
    runs: dict[str, dict[str, list[dict]]] = {mode: {s: [] for s in (*kits, "diffsynth")} for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, cache = model_and_cache(tmp, args.size, side)
        processed = tmp / "diffsynth-processed"  # DiffSynth's split training, stage 1, not timed
        run_child(diffsynth_command("sft:data_process", model, processed, steps, side, args.threads, None), args.threads)
        for repeat in range(args.repeats):
            for mode in modes:
                for side_name in runs[mode]:
                    output = tmp / f"{side_name.replace(' ', '-')}-{mode}-{repeat}"
                    cached = mode == "cached"
                    if side_name in kits:
                        if cached:
                            shutil.copytree(cache, output / "cache")
                        command = kit_command(model, output, cached, steps, side, args.threads, side_name == KIT_COMPILED)
                    else:
                        command = diffsynth_command("sft:train" if cached else "sft", model, output, steps, side,
                                                    args.threads, processed if cached else None)
                    runs[mode][side_name].append(timed_run(command, output, args.threads))
                    print(f"repeat {repeat} {mode:<9}{side_name:<13}" + "  ".join(
                        f"{k}={runs[mode][side_name][-1][k]:.3f}" for k in METRICS), flush=True)
        profiles = profile(model, cache, processed, tmp, steps, side, args.threads, Path(args.profile)) if args.profile else None
    summary: dict = {}
    for mode in modes:
        summary[mode] = {s: summarise(runs[mode][s]) for s in runs[mode]}
        for name in kits:
            summary[mode][f"{name} ratio"] = {k: summary[mode][name][k]["median"] / summary[mode]["diffsynth"][k]["median"]
                                              for k in METRICS}
            summary[mode][f"{name} paired"] = paired_ratios(runs[mode][name], runs[mode]["diffsynth"])
    print_table(args.size, side, steps, args.repeats, args.threads, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "side": side, "steps": steps, "repeats": args.repeats,
                                               "threads": args.threads, "compile": args.compile, "runs": runs, "summary": summary,
                                               "profiles": profiles}, indent=2))


if __name__ == "__main__":
    main()
