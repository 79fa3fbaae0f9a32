"""Checks of user settings (training config keys, edit flags), run before any model loads.

Each error names the key or flag, the allowed range or choices, and suggests the closest name.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence

import torch

from .errors import ChronoEditError
from .lora.names import WAN_TO_DIFFUSERS
from .video import SIZE_MULTIPLE

# More denoising steps than this buy nothing (the official recipe uses 50) and a typo such as
# 100000000 would build a schedule of that length before the first step.
MAX_STEPS = 1000
# Seeds: an edit's noise generator takes any unsigned 64-bit number; training seeds numpy too
# (accelerate's set_seed), which takes 32 bits, and each process adds its index.
MAX_SEED = 2**64 - 1
MAX_TRAIN_SEED = 2**32 - 1
# Flow shifts in use are 1 to 17; far beyond, the shifted sigmas round to 1 (or to NaN).
MAX_SHIFT = 100.0
# Training schedules have 1000 timesteps; a typo such as 1e12 would allocate terabytes.
MAX_TRAIN_TIMESTEPS = 100_000


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ChronoEditError(f"{name} {value!r} is not one of {', '.join(map(repr, choices))}{did_you_mean(value, choices)}.")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True) -> None:
    """``low <= value <= high`` (``low < value`` if not ``low_inclusive``); None: unbounded. NaN and
    infinities are refused whatever the bounds (they pass every comparison, then poison the numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ChronoEditError(f"{name} must be a finite number, got {value!r}.")
    too_low = low is not None and (value < low or (value == low and not low_inclusive))
    if too_low or (high is not None and value > high):
        bounds = (f"{'>=' if low_inclusive else '>'} {low:g}" if low is not None else "") + \
                 (" and " if low is not None and high is not None else "") + (f"<= {high:g}" if high is not None else "")
        raise ChronoEditError(f"{name} must be {bounds}, got {value!r}.")


def check_shift(name: str, value: float) -> None:
    """A flow shift, from a flag, a training config or a scheduler config: the same rule for each."""
    check_range(name, value, 0, MAX_SHIFT, low_inclusive=False)


def check_seed(name: str, value: int, high: int = MAX_SEED) -> None:
    """A seed: a whole number from 0 to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChronoEditError(f"{name} must be a whole number, got {value!r}.")
    check_range(name, value, 0, high)


def check_size(height: int | None, width: int | None, prefix: str = "--") -> None:
    """Both or neither; each a positive multiple of 16."""
    if (height is None) != (width is None):
        raise ChronoEditError(f"give both {prefix}height and {prefix}width, or neither.")
    for name, side in (("height", height), ("width", width)):
        if side is not None and (side < SIZE_MULTIPLE or side % SIZE_MULTIPLE):
            lower = max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE)
            raise ChronoEditError(f"{prefix}{name} {side} must be a positive multiple of {SIZE_MULTIPLE} "
                                  f"(e.g. {lower} or {lower + SIZE_MULTIPLE}).")


def check_device(device: str) -> torch.device:
    """A device string torch understands, and present on this machine."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ChronoEditError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N).") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ChronoEditError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ChronoEditError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    elif parsed.type != "cpu":
        raise ChronoEditError(f"--device {device!r}: only cpu and cuda are supported.")
    return parsed


def check_targets(targets: Sequence[str], linear_names: Iterable[str]) -> None:
    """Every LoRA target (a layer-name suffix, as peft matches it) must name at least one linear layer
    of the DiT; a diffusers name gets the Wan name it stands for."""
    names = list(linear_names)
    suffixes = {".".join(name.split(".")[i:]) for name in names for i in range(len(name.split(".")))}
    problems = []
    for target in targets:
        if any(name == target or name.endswith("." + target) for name in names):
            continue
        wan = sorted({w for w, d in WAN_TO_DIFFUSERS.items() if d == target or d.endswith("." + target)})
        hint = (f" (that is a diffusers name; the kit uses Wan names: {', '.join(map(repr, wan))})" if wan
                else did_you_mean(target, sorted(s for s in suffixes if not s[0].isdigit())))
        problems.append(f"{target!r}{hint}")
    if problems:
        raise ChronoEditError(f"targets: {', '.join(problems)} match no linear layer of the DiT. Targets are name "
                              "suffixes of its layers, e.g. q, k, v, o, ffn.0, ffn.2, self_attn.q, cross_attn.k.")
