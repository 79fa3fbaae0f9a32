"""Inspect and convert LoRA files (`lora info`, `lora convert`)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from ..errors import ChronoEditError
from ..lora import FORMATS, load_lora, parse_lora_spec, save_lora


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    info = sub.add_parser("info", help="format, rank, alpha, targets and metadata of a LoRA file")
    info.add_argument("file")
    convert = sub.add_parser("convert", help="rewrite a LoRA in another key format (same weight delta)")
    convert.add_argument("input")
    convert.add_argument("output")
    convert.add_argument("--to", required=True, choices=FORMATS,
                         help="comfyui = the kit's default (loads in ComfyUI and diffusers); diffusers = PEFT names")
    merge = sub.add_parser("merge", help="bake LoRAs into the DiT and write a model folder in the layout it was read from")
    merge.add_argument("--model", help="ChronoEdit model folder (diffusers or Wan layout)")
    merge.add_argument("--dit", help="DiT path (instead of, or overriding, --model)")
    merge.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]")
    merge.add_argument("--output", required=True, help="new folder; other components are linked, not copied")


def run(args: argparse.Namespace) -> int:
    if args.lora_command == "info":
        return _info(Path(args.file))
    if args.lora_command == "merge":
        return _merge(args)
    source, target = Path(args.input), Path(args.output)
    if target.resolve() == source.resolve():
        raise ChronoEditError("output must differ from input.")
    weights, metadata = load_lora(source)
    kept = {k: v for k, v in metadata.items() if k not in ("detected_format", "lora_adapter_metadata")}
    save_lora(weights, target, kept, fmt=args.to)
    print(f"{source} ({metadata['detected_format']}) -> {target} ({args.to}), {len(weights)} layers")
    return 0


def _info(path: Path) -> int:
    weights, metadata = load_lora(path)
    ranks = Counter(w.rank for w in weights.values())
    alphas = Counter(w.alpha for w in weights.values())
    targets = Counter(name.split(".", 2)[2] for name in weights if name.startswith("blocks."))
    blocks = {name.split(".")[1] for name in weights if name.startswith("blocks.")}
    params = sum(w.down.numel() + w.up.numel() for w in weights.values())
    print(f"file: {path}")
    print(f"format: {metadata['detected_format']}")
    print(f"layers: {len(weights)} in {len(blocks)} blocks, {params / 1e6:.2f}M parameters")
    print(f"rank: {', '.join(f'{r} ({n})' for r, n in sorted(ranks.items()))}")
    print(f"alpha: {', '.join(f'{a:g} ({n})' for a, n in sorted(alphas.items()))}")
    print(f"targets: {', '.join(sorted(targets))}")
    shown = sorted(k for k in metadata if k not in ("detected_format", "config"))
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
