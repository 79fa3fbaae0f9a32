"""Find and validate the DiT weight files: a diffusers shard folder, its index JSON, a shard list,
or one original-format (Wan/ComfyUI) file."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import CheckpointError

INDEX_SUFFIX = ".safetensors.index.json"
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<total>\d{5})\.safetensors$")


def resolve_dit_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Return the complete, ordered list of safetensors files holding one DiT.

    ``source`` is a folder (with an index JSON, shards, or exactly one ``.safetensors`` file),
    an index JSON, a single ``.safetensors`` file, or a list of shard files. Missing or extra
    shards raise :class:`CheckpointError` naming them.
    """
    if not isinstance(source, (str, Path)):
        files = [Path(p) for p in source]
        if len(files) == 1:
            return resolve_dit_files(files[0])
        return _check_shard_list(files)
    path = Path(source)
    if path.is_dir():
        return _resolve_folder(path)
    if path.name.endswith(INDEX_SUFFIX):
        return _resolve_index(path)
    if not path.is_file():
        raise CheckpointError(f"DiT weights not found: {path} does not exist.")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: the DiT must be a .safetensors file (diffusers shards or one original-format "
            "file); convert other formats first."
        )
    if _SHARD_RE.match(path.name):
        raise CheckpointError(
            f"{path} is one shard of a sharded checkpoint; pass its folder or its index JSON instead."
        )
    return [path]


def _resolve_folder(folder: Path) -> list[Path]:
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
        raise CheckpointError(f"No DiT weights in {folder}: expected *.safetensors (and an index JSON).")
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
            f"Several DiT files were given but {', '.join(odd)} are not named like shards "
            "(NAME-00001-of-00003.safetensors); pass one file, a shard folder or an index JSON."
        )
    totals = {int(m["total"]) for m in matches}
    stems = {m["stem"] for m in matches}
    if len(totals) != 1 or len(stems) != 1:
        raise CheckpointError(
            "The DiT shards given belong to different checkpoints: "
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
            f"Incomplete DiT checkpoint in {folder}: missing {', '.join(missing + absent)}."
        )
    return sorted(files, key=lambda p: p.name)
