"""``model check DIR``: what ``--model DIR`` finds, component by component, and what is missing."""

from __future__ import annotations

import argparse
from pathlib import Path

from .model_args import COMPONENTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="each component found (file, format, dtype, parameters, size), what is "
                                         "missing and where it was looked for; exit 1 if anything is missing")
    check.add_argument("model", metavar="DIR", nargs="?", help="a diffusers, Wan, ComfyUI or loose-files model folder")
    for name in COMPONENTS:
        check.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"override: path of the {name.replace('_', ' ')}")


def run(args: argparse.Namespace) -> int:
    from ..models.components import COMPONENT_FLAGS, LooseFiles, survey
    from ..models.identify import identify

    found, missing, choices = survey(args.model, **{name: getattr(args, name) for name in COMPONENTS})
    for name in COMPONENTS:
        if name in found:
            print(f"{name:14} {found[name]}")
            print(" " * 15 + _details(name, found, identify))
        else:
            print(f"{name:14} MISSING: {missing[name]}")
    for choice in choices:
        print(f"choice: {choice}")
    if args.model is not None:
        for info in LooseFiles(Path(args.model)).others():
            print(f"not used: {info.path}: {info.looks_like}")
    flags = [f"--model {args.model}"] if args.model else []
    flags += [f"{COMPONENT_FLAGS[name]} {getattr(args, name)}" for name in COMPONENTS if getattr(args, name)]
    if missing:
        print(f"missing: {', '.join(missing)}; pass {' '.join(COMPONENT_FLAGS[n] + ' PATH' for n in missing)}")
        return 1
    print("load it with: " + " ".join(flags))
    return 0


def _details(name: str, found: dict[str, Path], identify) -> str:
    path = found[name]
    if path.is_dir():
        files = [f for f in path.rglob("*") if f.is_file()]
        return f"folder ({len(files)} files, {_size(sum(f.stat().st_size for f in files))})"
    if name == "tokenizer" and path == found.get("text_encoder"):
        return "the SentencePiece model embedded in the text encoder (spiece_model)"
    info = identify(path)
    return (f"{info.looks_like}; format {info.format}; {info.dtype}; {info.params / 1e6:,.2f} M parameters; "
            f"{_size(info.size)} on disk")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
