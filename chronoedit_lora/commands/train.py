"""Train a ChronoEdit LoRA on a CSV of edit pairs (run under `accelerate launch` for several GPUs)."""

from __future__ import annotations

import argparse

from ..errors import ChronoEditError
from ..train.config import TrainConfig, load_config

# Plain flags for the common settings; every other config key works as `--key value` too.
COMMON_FLAGS = ("model", "dataset", "output", "max_steps", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file of settings (see configs/)")
    helps = TrainConfig.field_help()
    for key in COMMON_FLAGS:
        parser.add_argument(f"--{key}", help=helps.get(key))
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    parser.epilog = "Any other setting can be given as --key value: " + ", ".join(
        sorted(k for k in helps if k not in COMMON_FLAGS + ("resume",)))


def overrides_from(args: argparse.Namespace, extra: list[str]) -> dict[str, str]:
    """``--key value`` pairs from the known flags and the leftover arguments."""
    overrides = {k: str(getattr(args, k)) for k in COMMON_FLAGS if getattr(args, k) is not None}
    if args.resume:
        overrides["resume"] = "true"
    if len(extra) % 2:
        raise ChronoEditError(f"settings must come as --key value pairs, got: {' '.join(extra)}")
    for key, value in zip(extra[::2], extra[1::2]):
        if not key.startswith("--"):
            raise ChronoEditError(f"expected --key before {key!r}")
        overrides[key[2:].replace("-", "_")] = value
    return overrides


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    config = load_config(args.config, overrides_from(args, extra or []))
    from ..train.trainer import train

    train(config)
    return 0
