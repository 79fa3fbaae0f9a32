"""Bake LoRAs into a DiT checkpoint, shard by shard, keeping its layout (file names, index, keys, dtype)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import ChronoEditError
from ..models.dit import DiTCheckpoint
from ..models.safetensors_header import read_header
from .names import to_diffusers
from .weights import LoraWeights


def checkpoint_key(module: str, ckpt: DiTCheckpoint) -> str:
    """The weight's key in the checkpoint's own naming (diffusers or original Wan, with prefix)."""
    if ckpt.format == "wan":
        return f"{ckpt.key_prefix}{module}.weight"
    name = to_diffusers(module)
    if name is None:
        raise ChronoEditError(f"cannot merge LoRA layer {module}: it has no diffusers-format counterpart.")
    return f"{name}.weight"


def merge_into_files(ckpt: DiTCheckpoint, loras: list[tuple[LoraWeights, float]], output: Path) -> list[Path]:
    """Write ``ckpt``'s files to ``output`` with W += scale * delta for every LoRA layer.

    One shard is in memory at a time; sums are done in float32 and cast back to the stored dtype.
    Returns the written files (index JSON and config.json are copied alongside).
    """
    deltas: dict[str, list[tuple[LoraWeights, str, float]]] = {}
    for weights, scale in loras:
        for module in weights:
            deltas.setdefault(checkpoint_key(module, ckpt), []).append((weights, module, scale))
    output.mkdir(parents=True, exist_ok=True)
    written, merged = [], set()
    for path in tqdm(ckpt.files, desc="merging", disable=len(ckpt.files) < 2):
        tensors = load_file(str(path))
        for key in deltas.keys() & tensors.keys():
            total = tensors[key].float()
            for weights, module, scale in deltas[key]:
                total += scale * weights[module].delta()
            tensors[key] = total.to(tensors[key].dtype)
            merged.add(key)
        target = output / path.name
        tmp = target.with_name(target.name + ".tmp")
        save_file(tensors, str(tmp), metadata=_metadata(path))
        os.replace(tmp, target)
        written.append(target)
    if merged != deltas.keys():
        raise ChronoEditError(f"LoRA layers not found in the checkpoint: {sorted(deltas.keys() - merged)[:5]}")
    folder = ckpt.files[0].parent
    if len(ckpt.files) > 1:
        for index in folder.glob("*.safetensors.index.json"):
            shutil.copy(index, output / index.name)
    if ckpt.format == "diffusers" and (folder / "config.json").is_file():
        shutil.copy(folder / "config.json", output / "config.json")
    return written


def _metadata(path: Path) -> dict[str, str] | None:
    return read_header(path)[1] or None
