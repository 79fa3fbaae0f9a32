"""Sharded training state of a full fine-tune with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards of the trained weights, the optimizer's state and the EMA (if any) into
``state/`` of the checkpoint being staged, as safetensors files whose headers record each shard's
offset in the whole tensor (DCP's Hugging Face storage: no pickle to read back). Loading asks DCP
for each tensor in this run's layout, and DCP reads the pieces that overlap each rank's shard from
whichever files hold them: a checkpoint resumes on any process count, and a single process without
a process group (``export``) reads whole tensors.

Keys: ``model.<name>``, ``ema.<name>`` and ``<key>.<name>`` for each tensor the optimizer keeps per
parameter (AdamW's ``exp_avg``, ``exp_avg_sq``; Prodigy's ``s``, ``p0`` too; Adafactor's
``exp_avg_sq_row``, ``exp_avg_sq_col``, ``RMS``) for every trained parameter (DiffSynth/Wan names,
``blocks.0.self_attn.q.weight``), and ``optimizer.step``. The optimizer's per-group numbers
(Prodigy's step size ``d``) are in the checkpoint's ``optimizer.pt``.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from ...errors import CheckpointError
from ...models.loading import read_entries
from ...user_files import read_json
from .ema import ExponentialMovingAverage

STATE = "state"
STEP = "optimizer.step"
# DCP warns on every single-process save/load (a 1-process run, `export`), which is the intent here
_SINGLE_PROCESS_WARNING = r"torch\.distributed is (disabled, )?unavailable or uninitialized"
_OWN = ("model", "ema")  # key prefixes that are not optimizer state


def _state(named: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
           ema: ExponentialMovingAverage | None) -> dict[str, torch.Tensor]:
    state = {f"model.{name}": p.detach() for name, p in named.items()}
    for name, p in named.items():  # every tensor the optimizer keeps per parameter, by its own key
        state.update({f"{key}.{name}": value for key, value in optimizer.state[p].items()
                      if key != "step" and torch.is_tensor(value)})
    if ema is not None:
        state.update({f"ema.{name}": tensor for name, tensor in ema.average.items()})
    step = optimizer.state[next(iter(named.values()))]["step"]  # AdamW's is a tensor; Prodigy's, Adafactor's a count
    state[STEP] = step if torch.is_tensor(step) else torch.tensor(float(step))
    return state


def save(checkpoint: Path, named: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
         ema: ExponentialMovingAverage | None) -> None:
    """Write this rank's shards into ``checkpoint/state`` (every rank must call it)."""
    writer = HuggingFaceStorageWriter(str(checkpoint / STATE), save_distributed=dist.is_initialized())
    with _quiet():
        dcp.save(_state(named, optimizer, ema), storage_writer=writer, no_dist=not dist.is_initialized())


def load(checkpoint: Path, named: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
         ema: ExponentialMovingAverage | None) -> None:
    """Fill the trained weights, the optimizer's state and the EMA from ``checkpoint/state``, each
    rank its shards, whatever process count wrote it (every rank must call it).

    An optimizer creates its state at its first step; here it is made first, to be filled, from
    the checkpoint's keys: shaped like its parameter (sharded like it), or whole (a flattened or
    factored statistic, a scalar), as the checkpoint's header records it.
    """
    adamw = isinstance(getattr(optimizer, "optimizer", optimizer), torch.optim.AdamW)  # accelerate wraps it
    for key, (shape, dtype) in saved_tensors(checkpoint).items():
        kind, _, name = key.partition(".")
        if kind not in _OWN and name in named:
            p = named[name]
            like_p = list(shape) == list(p.shape)
            optimizer.state[p][kind] = (torch.zeros_like(p, memory_format=torch.preserve_format) if like_p
                                        else torch.zeros(shape, dtype=dtype, device=p.device))
    for p in named.values():
        step_device = p.device if adamw and _fused(optimizer) else "cpu"
        optimizer.state[p]["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
    state = _state(named, optimizer, ema)
    with _quiet():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(checkpoint / STATE)), no_dist=not dist.is_initialized())
    for p in named.values():
        if adamw:
            optimizer.state[p]["step"].copy_(state[STEP])
        else:
            optimizer.state[p]["step"] = round(state[STEP].item())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        yield


def _fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.param_groups[0].get("fused"))


_RANK_SHARD = re.compile(r"shard-(\d+)-model-")  # a file one rank of several wrote (DCP's Hugging Face naming)
_INDEX = "model.safetensors.index.json"  # what a single process writes beside its files


def check_state(checkpoint: Path, processes: int) -> None:
    """Raise :class:`CheckpointError` naming the file unless ``checkpoint/state`` is complete: every
    shard holds all the data its header lists, and the shards are those of the ``processes`` ranks
    that progress.json says wrote them (one file per rank; a single process's files as its index lists)."""
    folder = checkpoint / STATE
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no sharded training state (*.safetensors).")
    for path in files:
        read_entries(path)  # the file's size covers every tensor its header lists
    ranks = {int(match.group(1)) for path in files if (match := _RANK_SHARD.match(path.name))}
    if ranks:
        missing = sorted(set(range(1, processes + 1)) - ranks)
        if missing or max(ranks) > processes:
            raise CheckpointError(f"{folder} holds the shards of rank(s) {sorted(ranks)}, but "
                                  f"{checkpoint / 'progress.json'} says {processes} process(es) wrote it; the "
                                  "checkpoint is incomplete or mixed: resume from another one.")
        return
    index = folder / _INDEX
    found = read_json(index) if index.is_file() else None
    weight_map = found.get("weight_map") if isinstance(found, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} is missing or damaged (no weight_map); the checkpoint is incomplete: "
                              "resume from another one.")
    absent = sorted({name for name in weight_map.values() if not (folder / str(name)).is_file()})
    if absent or processes != 1:
        what = f"lacks {', '.join(absent)}" if absent else "was written by one process"
        raise CheckpointError(f"{folder} {what}, but {checkpoint / 'progress.json'} says {processes} process(es) "
                              "wrote it; the checkpoint is incomplete or mixed: resume from another one.")


def saved_tensors(checkpoint: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    """Every tensor's whole shape and dtype, from the shard headers alone."""
    folder = checkpoint / STATE
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder} holds no sharded training state (*.safetensors).")
    metadata = HuggingFaceStorageReader(str(folder)).read_metadata()
    return {key: (list(entry.size), entry.properties.dtype) for key, entry in metadata.state_dict_metadata.items()}


def read_weights(checkpoint: Path, names: list[str], ema: bool = False) -> dict[str, torch.Tensor]:
    """Whole trained weights (or their EMA) by parameter name, in one process (no process group)."""
    prefix = "ema." if ema else "model."
    saved = saved_tensors(checkpoint)
    missing = [name for name in names if prefix + name not in saved]
    if missing:
        what = "EMA of the " if ema else ""
        raise CheckpointError(f"{checkpoint}: no {what}weights for {', '.join(missing[:3])}"
                              + (" (the run kept no EMA: train with ema_decay or ema_power)" if ema else "") + ".")
    state = {prefix + name: torch.empty(saved[prefix + name][0], dtype=saved[prefix + name][1]) for name in names}
    if state:
        with _quiet():
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(checkpoint / STATE)), no_dist=True)
    return {name: state[prefix + name] for name in names}


def trained_names(checkpoint: Path) -> list[str]:
    """The names of the parameters a full fine-tune trained, from its checkpoint."""
    return sorted(key[len("model."):] for key in saved_tensors(checkpoint) if key.startswith("model."))
