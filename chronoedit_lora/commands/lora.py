"""Inspect, convert, merge and extract LoRA files (`lora info`, `lora convert`, `lora merge`, `lora extract`).

info prints an adapter file's format, type (LoRA, DoRA, LoHa, LoKr), rank, alpha, targets and
metadata (and warns about NaN/inf layers); convert rewrites it in another key format (refusing one
that cannot hold its type); merge bakes adapters into the DiT as a new model folder; extract makes a
LoRA of a fine-tune's weight changes (truncated SVD per linear layer).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from ..errors import ChronoEditError, listing
from ..files import check_writable
from ..lora import FORMATS, check_finite, load_lora, non_finite_layers, parse_lora_spec, save_lora
from ..lora.formats import written_alphas
from ..lora.io import DETECTED_FORMAT
from ..lora.names import is_dit_layer
from ..lora.peft_metadata import METADATA_KEY
from ..lora.weights import LoraWeights
from ..models.loading import DTYPES
from ..settings import check_device, check_range

# header entries stating the LoRA's alpha (the kit's, kohya/musubi's): rewritten for a converted file
ALPHA_KEYS = ("alpha", "ss_network_alpha")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    info = sub.add_parser("info", help="format, type, rank, alpha, targets and metadata of a LoRA (or DoRA/LoHa/LoKr) file")
    info.add_argument("file")
    convert = sub.add_parser("convert", help="rewrite an adapter file in another key format (same weight delta)")
    convert.add_argument("input")
    convert.add_argument("output")
    convert.add_argument("--to", required=True, choices=FORMATS,
                         help="comfyui = the kit's default (ComfyUI loads every type, diffusers its LoRAs); "
                         "diffusers = PEFT names (LoRA, DoRA); diffsynth: LoRA only")
    convert.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    merge = sub.add_parser("merge", help="bake LoRAs into the DiT and write a model folder in the layout it was read from")
    merge.add_argument("--model", help="ChronoEdit model folder (diffusers or Wan layout)")
    merge.add_argument("--dit", help="DiT path (instead of, or overriding, --model)")
    merge.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]")
    merge.add_argument("--output", required=True, help="new folder; other components are linked, not copied")
    extract = sub.add_parser("extract", help="a rank-R LoRA of a fine-tune's weight changes (truncated SVD per layer)")
    extract.add_argument("output", help="LoRA file to write (.safetensors, the kit's comfyui format)")
    extract.add_argument("--base", required=True, help="the model that was fine-tuned (model folder or DiT path)")
    extract.add_argument("--tuned", required=True,
                         help="the fine-tuned model (folder or DiT path), or a full fine-tune's run/checkpoint folder")
    extract.add_argument("--rank", type=int, required=True, help="LoRA rank (the best rank-R approximation per layer)")
    extract.add_argument("--targets",
                         help="comma-separated layer name suffixes (e.g. q,k,v,o,ffn.0,ffn.2); default: every linear layer")
    extract.add_argument("--ema", action="store_true", help="with a run: use the EMA of its weights")
    extract.add_argument("--device", default="cpu", help="where the SVDs run (cuda is much faster for 14B)")
    extract.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the LoRA factors")


def run(args: argparse.Namespace) -> int:
    if args.lora_command == "info":
        return _info(Path(args.file))
    if args.lora_command == "merge":
        return _merge(args)
    if args.lora_command == "extract":
        return _extract(args)
    return _convert(Path(args.input), Path(args.output), args.to, args.overwrite)


def converted_metadata(metadata: dict[str, str], weights: LoraWeights, fmt: str, source: Path) -> dict[str, str]:
    """The header of ``source`` (as :func:`load_lora` read it) rewritten for its conversion to ``fmt``.

    ``format`` names ``fmt``; alpha entries give the alpha the new file carries (dropped if its layers
    differ: the per-layer values are in the file); the PEFT config is left to the new format;
    ``converted_from`` records the original. Everything else (base model, rank, training config) stays.
    """
    alphas = set(written_alphas(weights, fmt).values())
    kept = {k: v for k, v in metadata.items() if k not in (DETECTED_FORMAT, METADATA_KEY, *ALPHA_KEYS)}
    if len(alphas) == 1:
        alpha = str(alphas.pop())
        kept.update({k: alpha for k in ALPHA_KEYS if k in metadata})
    return {**kept, "format": fmt, "converted_from": f"{source.name} ({metadata[DETECTED_FORMAT]})"}


def _convert(source: Path, target: Path, fmt: str, overwrite: bool) -> int:
    if target.resolve() == source.resolve():
        raise ChronoEditError("output must differ from input.")
    if target.is_dir():
        raise ChronoEditError(f"{target} is a folder; give the output file's name.")
    if target.exists() and not overwrite:
        raise ChronoEditError(f"{target} exists; pass --overwrite to replace it, or choose another output.")
    check_writable(target, (".safetensors",), "output")
    weights, metadata = load_lora(source)
    check_finite(weights, str(source))
    save_lora(weights, target, converted_metadata(metadata, weights, fmt, source), fmt=fmt)
    print(f"{source} ({metadata[DETECTED_FORMAT]}) -> {target} ({fmt}), {len(weights)} layers")
    return 0


def _info(path: Path) -> int:
    weights, metadata = load_lora(path)
    if not any(is_dit_layer(name) for name in weights):
        raise ChronoEditError(f"{path} is not a ChronoEdit/Wan LoRA: none of its {len(weights)} layer(s) is a layer of the "
                              f"DiT (e.g. {next(iter(weights), 'none')}); it is an adapter for another model.")
    kinds = Counter(w.kind for w in weights.values())
    ranks = Counter(w.rank for w in weights.values() if w.rank is not None)
    whole = sum(w.rank is None for w in weights.values())  # LoKr layers with both factors whole
    alphas = Counter(w.alpha for w in weights.values())
    targets = Counter(name.split(".", 2)[2] for name in weights if name.startswith("blocks."))
    blocks = {name.split(".")[1] for name in weights if name.startswith("blocks.")}
    params = sum(w.parameter_count for w in weights.values())
    print(f"file: {path}")
    print(f"format: {metadata[DETECTED_FORMAT]}")  # from the key names; a header "format" entry is only shown below
    print(f"layers: {len(weights)} in {len(blocks)} blocks, {params / 1e6:.2f}M parameters")
    bad = non_finite_layers(weights)
    if bad:
        print(f"WARNING: {listing('layer(s) with NaN or inf weights', bad)}; "
              "this LoRA is damaged and edit, merge and convert refuse it.")
    print(f"type: {', '.join(f'{k} ({n})' for k, n in sorted(kinds.items()))}")
    print(f"rank: {', '.join([f'{r} ({n})' for r, n in sorted(ranks.items())] + ([f'none, whole factors ({whole})'] if whole else []))}")
    print(f"alpha: {', '.join(f'{a:g} ({n})' for a, n in sorted(alphas.items()))}")
    print(f"targets: {', '.join(sorted(targets))}")
    shown = sorted(k for k in metadata if k not in (DETECTED_FORMAT, "config"))
    if shown:
        print("metadata:")
    for key in shown:
        print(f"  {key}: {metadata[key]}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ..lora.merge import merge_model

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise ChronoEditError(f"{output} exists and is not empty; choose a new folder.")
    loras = [parse_lora_spec(value) for value in args.lora]
    target, written = merge_model(Path(args.model) if args.model else None, args.dit, loras, output)
    print(f"merged {len(loras)} LoRA(s) into {len(written)} file(s): {target}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from ..lora.extract import DiTWeights, extract
    from ..models.dit import linear_layers
    from ..models.components import find_dit
    from ..models.dit import inspect_dit
    from ..train.state.export import full_run_reader, is_run

    output = Path(args.output)
    check_range("--rank", args.rank, 1)
    device = check_device(args.device)
    if output.exists():
        raise ChronoEditError(f"{output} exists; choose another file name.")
    check_writable(output, (".safetensors",))
    base_dit = inspect_dit(find_dit(args.base))
    base = DiTWeights(base_dit)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    layers = linear_layers(base_dit, targets)
    tuned = Path(args.tuned)
    if is_run(tuned):
        read_tuned, trained = full_run_reader(tuned, base_dit, base.read, args.ema)
        layers = [layer for layer in layers if f"{layer}.weight" in trained]
    else:
        if args.ema:
            raise ChronoEditError("--ema needs --tuned to be a training run (its EMA is in its checkpoints).")
        tuned_dit = inspect_dit(find_dit(tuned))
        if tuned_dit.kwargs != base_dit.kwargs:
            raise ChronoEditError(f"--tuned {tuned} is not the same architecture as --base {args.base} "
                                  f"({tuned_dit.kwargs} vs {base_dit.kwargs}).")
        read_tuned = DiTWeights(tuned_dit).read
    if not layers:
        raise ChronoEditError(f"no linear layer{' matches --targets' if targets else ''} was trained in {tuned}.")
    weights, kept = extract(base, read_tuned, layers, args.rank, device, DTYPES[args.dtype])
    if not weights:
        raise ChronoEditError(f"{tuned} does not differ from {args.base} in any of its {len(layers)} linear layers.")
    share = sum(kept.values()) / len(kept)
    save_lora(weights, output, {"format": "comfyui", "base_model": "ChronoEdit", "model_path": str(args.base),
                                "rank": str(max(w.rank for w in weights.values())),
                                "targets": ",".join(targets or ["all linear"]),
                                "extracted_from": str(tuned) + (" (EMA)" if args.ema else ""),
                                "kept_change_share": f"{share:.6f}"})
    print(f"extracted a rank-{args.rank} LoRA of {len(weights)} changed layers: {output} (it keeps {share:.1%} of the "
          "weight change's squared norm, averaged over layers)")
    return 0
