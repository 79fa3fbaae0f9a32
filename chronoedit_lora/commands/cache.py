"""Precompute the conditioning cache of a training config (latents, y, CLIP, umT5 per pair)."""

from __future__ import annotations

import argparse

from ..train.loop.config import load_config
from .train import add_arguments as add_train_arguments
from .train import overrides_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    from ..train.loop.trainer import cache_conditioning

    cache_conditioning(load_config(args.config, overrides_from(args, extra or [])))
    return 0
