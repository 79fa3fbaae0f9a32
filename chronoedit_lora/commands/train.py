"""Train a ChronoEdit LoRA on a CSV of edit pairs (run under `accelerate launch` for several GPUs)."""

from __future__ import annotations

import argparse

from ..errors import ChronoEditError
from ..train.loop.config import TrainConfig, load_config

# Plain flags for the common settings; every other config key works as `--key value` too.
COMMON_FLAGS = ("model", "dataset", "output", "max_steps", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file of settings (see configs/)")
    helps = TrainConfig.field_help()
    for key in COMMON_FLAGS:
        parser.add_argument(f"--{key}", help=helps.get(key))
    parser.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                        help="continue the run in --output from its newest checkpoint, or from CHECKPOINT")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --output that holds another run (its files are removed first)")
    parser.epilog = "Any other setting can be given as --key value: " + ", ".join(
        sorted(k for k in helps if k not in COMMON_FLAGS + ("resume", "overwrite")))


def overrides_from(args: argparse.Namespace, extra: list[str]) -> dict[str, str]:
    """``--key value`` pairs from the known flags and the leftover arguments."""
    overrides = {k: str(getattr(args, k)) for k in COMMON_FLAGS if getattr(args, k) is not None}
    if args.resume is not None:
        overrides["resume"] = "true"
        if args.resume is not True:
            overrides["resume_from"] = args.resume
    if args.overwrite:
        overrides["overwrite"] = "true"
    if len(extra) % 2:
        raise ChronoEditError(f"settings must come as --key value pairs, got: {' '.join(extra)}")
    for key, value in zip(extra[::2], extra[1::2]):
        if not key.startswith("--"):
            raise ChronoEditError(f"expected --key before {key!r}")
        overrides[key[2:].replace("-", "_")] = value
    return overrides


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    config = load_config(args.config, overrides_from(args, extra or []))
    from ..train.loop.trainer import train

    result = train(config)
    return 128 + result.interrupted_by if result.interrupted_by else 0  # 130 after SIGINT, 143 after SIGTERM
