"""Cached conditioning: per pair or trajectory, the target-clip latents, y, CLIP features and umT5
embeddings, computed once and reused until anything they depend on changes.

An entry's key hashes the row's file bytes (a frame folder: every frame's name and bytes), which
frames it uses (a trajectory: its kind and clip length), its prompt, its training size, and a fingerprint of
the text encoder, image encoder, VAE and tokenizer files (size plus the first and last MiB of
each file, so multi-GB files are not read whole), and the dtype. A stale entry is never used: it
simply has another key. Entries are safetensors, written atomically.

Augmentation: the kit crops deterministically (centre crop to the bucket), so a pair's latents
are a function of its key. A random crop or flip would make every epoch see different latents;
caching would then freeze one draw. Add any such randomness to the key, or don't cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data import EditPairDataset
from ..data.metadata import TRAJECTORY
from ..data.trajectories import frame_files
from ..files import atomic_path
from ..models.components import ComponentPaths
from ..video import REASONING_FRAMES

CACHE_VERSION = 1  # bump when what is cached, or how, changes
FINGERPRINT_BYTES = 1 << 20


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(size - FINGERPRINT_BYTES, FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()


def components_fingerprint(paths: ComponentPaths, dtype: torch.dtype) -> str:
    """Digest of everything the cached tensors are computed with (not the DiT: it is trained)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{dtype}".encode())
    for component in (paths.text_encoder, paths.image_encoder, paths.vae, paths.tokenizer):
        files = sorted(p for p in component.rglob("*") if p.is_file()) if component.is_dir() else [component]
        for file in files:
            h.update(_file_digest(file).encode())
    return h.hexdigest()


class ConditioningCache:
    """Entries under ``folder/ab/<key>.safetensors``."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = folder
        self.fingerprint = fingerprint

    def key(self, dataset: EditPairDataset, index: int) -> str:
        pair = dataset.pair(index)
        # which frames: a pair video's two indices; a trajectory's kind and clip length
        frames = [TRAJECTORY, REASONING_FRAMES] if pair.is_trajectory else [pair.input_frame, pair.edited_frame]
        h = hashlib.sha256(json.dumps({"components": self.fingerprint, "prompt": pair.prompt,
                                       "size": list(dataset.sizes[index]), "frames": frames}).encode())
        if pair.is_trajectory and pair.input_image.is_dir():  # a frame folder: every frame, named
            for frame in frame_files(pair.input_image):
                h.update(frame.name.encode() + hashlib.sha256(frame.read_bytes()).digest())
        else:
            for path in dict.fromkeys((pair.input_image, pair.edited_image)):  # a video is one file
                h.update(hashlib.sha256(path.read_bytes()).digest())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(key)))

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_path(self.path(key)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))

    def missing(self, dataset: EditPairDataset) -> list[int]:
        """Indices (first of each distinct pair) whose entry is not there yet."""
        seen, todo = set(), []
        for index in range(len(dataset.pairs)):
            key = self.key(dataset, index)
            if key not in seen and not self.path(key).is_file():
                todo.append(index)
            seen.add(key)
        return todo


@torch.no_grad()
def fill(cache: ConditioningCache, pipe, dataset: EditPairDataset, indices: list[int], show: bool = True) -> int:
    """Encode ``indices`` (this process's share) into the cache; returns how many were written."""
    from .inputs import encode_clip

    for index in tqdm(indices, desc="caching conditioning", disable=not show or not indices):
        item = dataset[index]
        cache.put(cache.key(dataset, index), encode_clip(pipe, item["video"], item["prompt"]))
    return len(indices)
