"""Find and validate a component's weight files: a diffusers/transformers folder (one file or
shards + index JSON), an index JSON, a shard list, or one file (.safetensors, or .pth for Wan's
encoders); read their keys and shapes without loading tensors."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import CheckpointError
from .safetensors_header import read_header

INDEX_SUFFIX = ".safetensors.index.json"
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<total>\d{5})\.safetensors$")


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def resolve_weight_files(source: str | Path | Sequence[str | Path], what: str = "DiT") -> list[Path]:
    """Return the complete, ordered list of files holding one model's weights.

    ``source`` is a folder (with an index JSON, shards, or exactly one weights file), an index
    JSON, a single file, or a list of shard files. Missing or extra shards raise
    :class:`CheckpointError` naming them; ``what`` names the component in messages.
    """
    if not isinstance(source, (str, Path)):
        files = [Path(p) for p in source]
        if len(files) == 1:
            return resolve_weight_files(files[0], what)
        return _check_shard_list(files)
    path = Path(source)
    if path.is_dir():
        return _resolve_folder(path, what)
    if path.name.endswith(INDEX_SUFFIX):
        return _resolve_index(path)
    if not path.is_file():
        raise CheckpointError(f"{what} weights not found: {path} does not exist.")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: not a weights file for the {what} (expected {', '.join(WEIGHT_SUFFIXES)}).")
    if _SHARD_RE.match(path.name):
        raise CheckpointError(
            f"{path} is one shard of a sharded checkpoint; pass its folder or its index JSON instead."
        )
    return [path]


def _resolve_folder(folder: Path, what: str) -> list[Path]:
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return _resolve_index(indexes[0])
    if len(indexes) > 1:
        raise CheckpointError(
            f"{folder} holds several index files ({', '.join(p.name for p in indexes)}); "
            "pass the one to use."
        )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"No {what} weights in {folder}: expected *.safetensors (and an index JSON).")
    if len(files) == 1:
        return files
    return _check_shard_list(files)


def _resolve_index(index_path: Path) -> list[Path]:
    if not index_path.is_file():
        raise CheckpointError(f"DiT index not found: {index_path}.")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc!r}).") from None
    folder = index_path.parent
    listed = sorted(set(weight_map.values()))
    missing = [name for name in listed if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path.name} lists shards that are missing from {folder}: {', '.join(missing)}. "
            "Download them (all shards are needed)."
        )
    stem = index_path.name[: -len(INDEX_SUFFIX)]
    strays = sorted(
        p.name for p in folder.glob(f"{stem}-*-of-*.safetensors") if p.name not in set(listed)
    )
    if strays:
        raise CheckpointError(
            f"{folder} holds shards not listed in {index_path.name}: {', '.join(strays)}. "
            "They may come from another download; remove them or fix the index."
        )
    return [folder / name for name in listed]


def _check_shard_list(files: list[Path]) -> list[Path]:
    matches = [_SHARD_RE.match(p.name) for p in files]
    if not all(matches):
        odd = [p.name for p, m in zip(files, matches) if not m]
        raise CheckpointError(
            f"Several weight files were given but {', '.join(odd)} are not named like shards "
            "(NAME-00001-of-00003.safetensors); pass one file, a shard folder or an index JSON."
        )
    totals = {int(m["total"]) for m in matches}
    stems = {m["stem"] for m in matches}
    if len(totals) != 1 or len(stems) != 1:
        raise CheckpointError(
            "The shards given belong to different checkpoints: "
            + ", ".join(p.name for p in files)
        )
    total, stem = totals.pop(), stems.pop()
    folder = files[0].parent
    expected = {f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)}
    names = {p.name for p in files}
    missing = sorted(expected - names)
    absent = sorted(p.name for p in files if not p.is_file())
    if missing or absent:
        raise CheckpointError(
            f"Incomplete checkpoint in {folder}: missing {', '.join(missing + absent)}."
        )
    return sorted(files, key=lambda p: p.name)


def read_shapes(files: Sequence[Path]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Keys -> shapes (and safetensors metadata) of weight files, without loading tensor data.

    ``.pth`` files are memory-mapped with ``torch.load(weights_only=True)``: safe, and only the
    pickled structure is read.
    """
    shapes: dict[str, list[int]] = {}
    metadata: dict[str, str] = {}
    for path in files:
        if path.suffix == ".safetensors":
            file_shapes, file_meta = read_header(path)
            shapes.update(file_shapes)
            metadata.update(file_meta)
        else:
            shapes.update({k: list(v.shape) for k, v in load_pth(path).items() if isinstance(v, torch.Tensor)})
    return shapes, metadata


def load_pth(path: Path) -> dict:
    """A ``.pth`` state dict, memory-mapped, unwrapped from a single ``state_dict``/``module``/``model_state`` key."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(f"{path}: cannot read as a PyTorch weights file ({exc.__class__.__name__}: {exc}).") from None
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "module", "model_state"):
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict.")
    return state
