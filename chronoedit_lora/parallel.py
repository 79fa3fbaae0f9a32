"""Sequence parallelism for one large edit across GPUs: DiffSynth's USP (xfuser Ulysses attention).

CUDA/NCCL-only and thin by design: we check what it needs and hand over to DiffSynth. It cannot
run on our CPU-only CI; what is tested here is the refusal when its requirements are missing.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .errors import ChronoEditError


def missing_for_sequence_parallel() -> list[str]:
    """What this machine lacks for ``--sequence-parallel`` (empty if nothing)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA GPUs")
    if not (torch.distributed.is_available() and torch.distributed.is_nccl_available()):
        missing.append("NCCL (torch.distributed)")
    missing += [f"the {name} package (pip install xfuser)" for name in ("xfuser", "yunchang") if importlib.util.find_spec(name) is None]
    if int(os.environ.get("WORLD_SIZE", 1)) < 2:
        missing.append("several processes (launch with torchrun --nproc_per_node N)")
    return missing


def start_sequence_parallel() -> torch.device:
    """Initialise DiffSynth's USP process groups; returns this rank's CUDA device."""
    missing = missing_for_sequence_parallel()
    if missing:
        raise ChronoEditError("--sequence-parallel needs " + ", ".join(missing) + ".")
    from diffsynth.utils.xfuser import initialize_usp

    initialize_usp("cuda")
    return torch.device("cuda", torch.distributed.get_rank())
