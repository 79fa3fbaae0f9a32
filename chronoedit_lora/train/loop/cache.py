"""Cached conditioning: per pair or trajectory, the target-clip latents, y, CLIP features, umT5
embeddings and the change map (:func:`.inputs.change_map`), computed once and reused until
anything they depend on changes.

An entry's key hashes the row's file bytes (a frame folder: every frame's name and bytes), which
frames it uses (a trajectory: its kind and clip length), its prompt, its training size, and a fingerprint of
the text encoder, image encoder, VAE and tokenizer files (size plus the first and last MiB of
each file, so multi-GB files are not read whole), and the dtype. A stale entry is never used: it
simply has another key. Entries are safetensors, written atomically.

Augmentation: the kit crops deterministically (centre crop to the bucket), so a pair's latents
are a function of its key. A random crop or flip would make every epoch see different latents;
caching would then freeze one draw. Add any such randomness to the key, or don't cache.

Entries are derived state and never trusted: before training, each entry's header is checked
(complete file, this cache version, its own key, the four tensors with the run's dtype and the
shapes its row's size and kind imply); a bad one is named, deleted and encoded again. When an
entry is read for a step its values must be finite, or the run stops naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ...data import EditPairDataset
from ...data.metadata import TRAJECTORY
from ...data.trajectories import frame_files
from ...errors import CheckpointError, ChronoEditError
from ...files import atomic_path
from ...models.components import ComponentPaths
from ...models.loading import SAFETENSORS_DTYPES, read_entries
from ...video import EDIT_FRAMES, REASONING_FRAMES, latent_frames

CACHE_VERSION = 3  # bump when what is cached, or how, changes (3: the change map)
FINGERPRINT_BYTES = 1 << 20
TENSORS = ("input_latents", "y", "clip_feature", "context", "change")
MASK_CHANNELS = 4  # y = [mask (4), VAE condition (as many channels as the latents)]
VAE_SCALE = 8  # pixels per latent, each side


class CacheEntryError(ChronoEditError):
    """A cache entry read during training holds NaN or inf."""


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(size - FINGERPRINT_BYTES, FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()


def _sha256(path: Path) -> bytes:
    """A file's SHA-256, read in blocks (a long video is never in memory whole)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


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

    def __init__(self, folder: Path, fingerprint: str, dtype: torch.dtype):
        self.folder = folder
        self.fingerprint = fingerprint
        self.dtype = dtype

    def key(self, dataset: EditPairDataset, index: int) -> str:
        pair = dataset.pair(index)
        # which frames: a pair video's two indices; a trajectory's kind and clip length
        frames = [TRAJECTORY, REASONING_FRAMES] if pair.is_trajectory else [pair.input_frame, pair.edited_frame]
        h = hashlib.sha256(json.dumps({"components": self.fingerprint, "prompt": pair.prompt,
                                       "size": list(dataset.sizes[index]), "frames": frames}).encode())
        if pair.is_trajectory and pair.input_image.is_dir():  # a frame folder: every frame, named
            for frame in frame_files(pair.input_image):
                h.update(frame.name.encode() + _sha256(frame))
        else:
            for path in dict.fromkeys((pair.input_image, pair.edited_image)):  # a video is one file
                h.update(_sha256(path))
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor]:
        path = self.path(key)
        tensors = load_file(str(path))
        bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
        if bad:
            raise CacheEntryError(f"conditioning cache entry {path} holds NaN or inf in {', '.join(bad)}; delete it "
                                  f"(or the whole cache folder {self.folder}) and rerun: it will be encoded again.")
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_path(self.path(key)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"chronoedit_lora_cache": str(CACHE_VERSION), "key": key})

    def problem(self, key: str, size: tuple[int, int], trajectory: bool) -> str | None:
        """Why the entry at ``key`` cannot be used for a row of training ``size`` (width, height) and kind, or None."""
        try:
            _, entries, metadata = read_entries(self.path(key))
        except CheckpointError as exc:
            return str(exc).split(": ", 1)[-1]
        if metadata.get("chronoedit_lora_cache") != str(CACHE_VERSION) or metadata.get("key") != key:
            return "from another kit version or another entry"
        if sorted(entries) != sorted(TENSORS):
            return f"holds {', '.join(sorted(entries)) or 'nothing'}, not {', '.join(TENSORS)}"
        dtypes = {name: SAFETENSORS_DTYPES.get(entry[0]) for name, entry in entries.items()}
        if any(dtype != self.dtype for dtype in dtypes.values()):
            return f"holds {', '.join(sorted({entry[0] for entry in entries.values()}))} tensors, not {self.dtype}"
        shapes = {name: entry[1] for name, entry in entries.items()}
        latents, y = shapes["input_latents"], shapes["y"]
        frames = latent_frames(REASONING_FRAMES if trajectory else EDIT_FRAMES)
        width, height = size
        expected = [1, latents[1] if len(latents) == 5 else -1, frames, height // VAE_SCALE, width // VAE_SCALE]
        if latents != expected or y != [1, latents[1] + MASK_CHANNELS, *expected[2:]] \
                or shapes["change"] != [1, 1, *expected[2:]] or len(shapes["clip_feature"]) != 3 \
                or len(shapes["context"]) != 3:
            return (f"has latents of shape {latents}, y of shape {y} and a change map of shape {shapes['change']}, "
                    f"not the {expected} of a "
                    f"{width}x{height} {'trajectory' if trajectory else 'pair'}")
        return None

    def missing(self, dataset: EditPairDataset, report: bool = True) -> tuple[list[int], int]:
        """Indices (first of each distinct pair) whose entry is not there yet or cannot be used, and
        how many distinct entries the dataset has (an item repeated or listed twice is one); an
        unusable one is named (``report``) and deleted, so that it is encoded again."""
        seen, todo = set(), []
        for index in range(len(dataset.pairs)):
            key = self.key(dataset, index)
            if key in seen:
                continue
            seen.add(key)
            path = self.path(key)
            problem = self.problem(key, dataset.sizes[index], dataset.pair(index).is_trajectory) if path.is_file() else None
            if problem:
                if report:
                    print(f"conditioning cache: {path} is {problem}; dropped, it will be encoded again.")
                path.unlink(missing_ok=True)
            if problem or not path.is_file():
                todo.append(index)
        return todo, len(seen)


@torch.no_grad()
def fill(cache: ConditioningCache, pipe, dataset: EditPairDataset, indices: list[int], show: bool = True) -> int:
    """Encode ``indices`` (this process's share) into the cache; returns how many were written."""
    from .inputs import training_inputs

    for index in tqdm(indices, desc="caching conditioning", disable=not show or not indices):
        item = dataset[index]
        cache.put(cache.key(dataset, index), training_inputs(pipe, item["video"], item["prompt"]))
    return len(indices)
