"""Judge LoRAs on held-out pairs: the base model and every checkpoint of a run (or LoRA files),
scored by the held-out loss at fixed timestep quantiles, fixed-seed edits against their targets
(PSNR, SSIM; LPIPS, CLIP, DINOv2 and a VLM judge from local folders), with a best-checkpoint pick.

Writes metrics.csv, metrics.png, grid.png (and judge.csv) into RUN/eval or --output, as one set:
what an earlier evaluation wrote there and this one does not is removed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ChronoEditError
from ..data.buckets import DEFAULT_MAX_PIXELS
from ..files import check_writable
from ..offload import MODES as OFFLOAD_MODES
from ..sampling import SCHEDULERS
from ..settings import check_range
from .edit import DEFAULTS, PRESETS, check_sampling, sampling_settings, step_cache_options
from .model_args import COMPONENTS, add_model_arguments, model_options



def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--run", dest="run_folder", metavar="RUN", help="a training run's --output folder: its lora-stepNNNNNN.safetensors and lora.safetensors")
    what.add_argument("--lora", action="append", default=[], metavar="FILE",
                      help="a LoRA file instead of --run (repeatable; labelled by its file name)")
    what.add_argument("--base-lora", action="append", default=[], metavar="PATH[:SCALE]",
                      help="a LoRA fused into the DiT under every evaluated checkpoint, base included (repeatable), "
                           "e.g. the 8-step distill LoRA the evaluated LoRAs were trained on (with --preset distill)")
    what.add_argument("--dataset", required=True, help="CSV of held-out pairs (or trajectories) in the dataset format")
    what.add_argument("--count", type=int, help="evaluate the CSV's first COUNT rows only (default: all)")
    what.add_argument("--output", help="folder for metrics.csv, metrics.png, grid.png (default: RUN/eval)")
    what.add_argument("--height", type=int, help="fixed size of the held-out pairs (with --width), as in training")
    what.add_argument("--width", type=int, help="fixed width (with --height)")
    what.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                      help="pixel budget of the aspect buckets without --height/--width")
    what.add_argument("--allow-outside", action="store_true", help="allow dataset paths outside the CSV's folder")
    edits = parser.add_argument_group("edits")
    edits.add_argument("--loss-only", action="store_true", help="the held-out loss only: no edits, no image metrics")
    add_sampling_arguments(edits)
    edits.add_argument("--offload", choices=OFFLOAD_MODES, default="auto", help="as for edit (no effect on a CPU)")
    edits.add_argument("--step-cache", metavar="METHOD[:LEVEL]",
                       help="edit with this step cache (as for edit) and also uncached: the cache_psnr, cache_ssim "
                            "and cache_saved columns compare the two")
    edits.add_argument("--cache-calibration", metavar="JSON", help="the step cache's calibration (as for edit)")
    scorers = parser.add_argument_group("metric models (local folders; nothing is downloaded)")
    scorers.add_argument("--lpips", metavar="DIR", help="LPIPS: alex.pth (from the lpips package) and torchvision's "
                                                        "alexnet-owt-7be5be79.pth")
    scorers.add_argument("--clip", metavar="DIR", help="a transformers CLIPModel folder: image similarity, text direction")
    scorers.add_argument("--dino", metavar="DIR", help="a transformers Dinov2Model folder: DINOv2 similarity")
    scorers.add_argument("--judge", metavar="DIR", help="a local vision-language model folder (Qwen2.5-VL, Qwen3-VL): "
                                                        "VIEScore-style 0-10 scores with reasons")


def add_sampling_arguments(group: argparse._ActionsContainer) -> None:
    """The held-out edits' sampling flags (``eval`` and ``calibrate-cache``)."""
    group.add_argument("--preset", choices=sorted(PRESETS), help="distill: 8 steps, cfg 1.0, shift 2.0 (explicit flags win)")
    group.add_argument("--steps", type=int, help=f"denoising steps (default {DEFAULTS['steps']})")
    group.add_argument("--cfg", type=float, help=f"classifier-free guidance scale (default {DEFAULTS['cfg']})")
    group.add_argument("--shift", type=float, help="flow shift (default: the model folder's scheduler config, else 5.0)")
    group.add_argument("--scheduler", choices=SCHEDULERS, help="sampler (default: the model folder's)")
    group.add_argument("--negative-prompt", default="", help="negative prompt (used when cfg > 1)")
    group.add_argument("--seed", type=int, default=0, help="seed of every edit's initial noise (and of eval's loss noise)")


def _check_settings(args: argparse.Namespace, settings: dict) -> None:
    check_sampling(args, settings)
    check_range("--max-pixels", args.max_pixels, 16 * 16)
    if args.count is not None:
        check_range("--count", args.count, 1)
    if args.sequence_parallel:
        raise ChronoEditError("eval runs in one process; drop --sequence-parallel (use --offload on a small GPU).")
    if args.step_cache and args.loss_only:
        raise ChronoEditError("--loss-only makes no edits, so --step-cache has nothing to cache; drop one of them.")


def held_out_items(args: argparse.Namespace) -> list[dict]:
    """The held-out rows as training clips, every file checked first."""
    from ..data import EditPairDataset, check_dataset, format_report, has_fatal

    problems = check_dataset(args.dataset, args.height, args.width, args.max_pixels, args.allow_outside)
    if has_fatal(problems):
        raise ChronoEditError(f"--dataset {args.dataset} cannot be used:\n{format_report(problems)}")
    dataset = EditPairDataset(args.dataset, args.height, args.width, args.max_pixels, allow_outside=args.allow_outside)
    return [dataset[i] for i in range(min(args.count or len(dataset), len(dataset)))]


def _check_loras(args: argparse.Namespace, checkpoints: list) -> list[tuple[Path, float]]:
    """Every LoRA (and --base-lora) is readable, finite and fits the DiT (from its headers), before the
    model loads; returns the --base-lora files and scales."""
    from ..lora import check_lora_file, parse_lora_spec
    from ..models.components import discover_components
    from ..models.dit import inspect_dit, meta_dit

    skeleton = meta_dit(inspect_dit(discover_components(args.model, **{c: getattr(args, c) for c in COMPONENTS}).dit))
    for checkpoint in checkpoints:
        if checkpoint.path is not None:
            check_lora_file(checkpoint.path, skeleton, str(checkpoint.path))
    base = [parse_lora_spec(spec, "--base-lora") for spec in args.base_lora]
    for path, _ in base:
        check_lora_file(path, skeleton, f"--base-lora {path}")
    return base


def _check_output(output: Path) -> None:
    """The evaluation's folder is no part of a training run's own files (its logs, checkpoints,
    samples): metrics.csv there would replace training's own."""
    from ..train.state.export import is_run
    from ..train.state.run_folder import RUN_FILES

    resolved = output.resolve()
    for folder in (resolved, *resolved.parents):
        part = resolved.relative_to(folder).parts[:1]
        if part and part[0] in RUN_FILES and part[0] != "eval" and is_run(folder):
            raise ChronoEditError(f"--output {output} is inside the training run {folder}'s own files ({part[0]}); "
                                  f"evaluate into {folder / 'eval'} (the default with --run) or a folder of its own.")


def _warn_training_rows(args: argparse.Namespace, checkpoints: list) -> None:
    """Say which held-out rows are training rows of the run (the same files, however the CSVs spell them)."""
    from ..data.metadata import read_metadata
    from ..eval.checkpoints import training_csv

    trained_on = training_csv(checkpoints) if args.run_folder else None
    if trained_on is None or not trained_on.is_file():
        return
    def files(pair) -> tuple:
        return pair.input_image.resolve(), pair.edited_image.resolve(), pair.input_frame, pair.edited_frame

    training = {files(pair) for pair in read_metadata(trained_on, allow_outside=True)[0]}
    held_out = read_metadata(args.dataset, allow_outside=args.allow_outside)[0][:args.count]
    shared = [pair.row for pair in held_out if files(pair) in training]
    if shared:
        print(f"warning: {len(shared)} of the {len(held_out)} held-out rows of {args.dataset} are training rows of "
              f"{args.run_folder} (the same files, from {trained_on}): row(s) {', '.join(map(str, shared[:10]))}; "
              "their metrics measure what the LoRA memorised, not how it generalises.")


def run(args: argparse.Namespace) -> int:
    from ..eval.checkpoints import find_checkpoints
    from ..eval.held_out import EditSettings
    from ..eval.runner import MetricFolders

    checkpoints = find_checkpoints(Path(args.run_folder) if args.run_folder else None, args.lora)
    if args.output is None and args.run_folder is None:
        raise ChronoEditError("--output is needed with --lora (with --run the default is RUN/eval).")
    output = Path(args.output) if args.output else Path(args.run_folder) / "eval"
    _check_output(output)
    check_writable(output / "metrics.csv", (".csv",))
    settings = sampling_settings(args)
    _check_settings(args, settings)
    cache_settings = step_cache_options(args, settings)
    folders = MetricFolders(*(Path(v) if v else None for v in (args.lpips, args.clip, args.dino, args.judge)))
    if args.loss_only and any((args.lpips, args.clip, args.dino, args.judge)):
        raise ChronoEditError("--loss-only makes no edits, so --lpips/--clip/--dino/--judge have nothing to score.")
    folders.check()
    items = held_out_items(args)
    _warn_training_rows(args, checkpoints)
    base_loras = _check_loras(args, checkpoints)

    from ..eval.figures import write_figures
    from ..eval.held_out import encode_pairs
    from ..eval.metrics import QUANTILES
    from ..eval.report import remove_earlier, summary, write_tables
    from ..eval.runner import evaluate_checkpoints, score_with_models
    from ..eval.image_metrics import ssim
    from ..models.quantized import is_quantized
    from ..pipeline import ChronoEditPipeline
    from ..train.state.model_card import add_evaluation

    print(f"evaluating {len(checkpoints)} checkpoints ({', '.join(c.label for c in checkpoints)}) "
          f"on {len(items)} held-out pairs from {args.dataset}")
    pipe = ChronoEditPipeline.from_pretrained(**model_options(args), offload=args.offload)
    for path, scale in base_loras:  # under every checkpoint: hooks on quantized (fp8, GGUF) weights, else fused
        pipe.load_lora(path, scale, fuse=not is_quantized(pipe.dit))
    pairs = encode_pairs(pipe, items, len(QUANTILES), args.seed)
    edit_settings = None if args.loss_only else EditSettings(
        steps=settings["steps"], cfg=settings["cfg"], shift=settings["shift"], scheduler=args.scheduler, seed=args.seed,
        negative_prompt=args.negative_prompt, **cache_settings)
    evaluation = evaluate_checkpoints(pipe, checkpoints, pairs, edit_settings)
    pipe.placement.release()
    del pipe  # the metric models and the judge load one at a time after the DiT is gone
    score_with_models(evaluation, folders, args.device)

    table = evaluation.table()
    tables = write_tables(output, checkpoints, table, [p.row for p in pairs], evaluation.judgements)
    written = write_figures(output, checkpoints, table, pairs, evaluation.edits)
    remove_earlier(output, tables + written)
    reference = None if args.loss_only else sum(ssim(p.target, p.source) for p in pairs) / len(pairs)
    print(summary(checkpoints, table, reference))
    print(f"wrote {output / 'metrics.csv'}, " + ", ".join(str(p) for p in written))
    if args.run_folder and add_evaluation(Path(args.run_folder), output / "metrics.csv"):
        print(f"model card {Path(args.run_folder) / 'README.md'}: evaluation table added")
    return 0
