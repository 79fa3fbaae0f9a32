"""Bake LoRAs into a DiT checkpoint, shard by shard, keeping its layout (file names, index, keys, dtype),
and make the result a complete model folder (untouched components linked, not copied)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import ChronoEditError
from ..files import atomic_folder, atomic_path, copy_file
from ..models.components import discover_components
from ..models.dit import DiTCheckpoint, inspect_dit, meta_dit
from ..models.loading import read_header
from .apply import check_finite, check_lora_matches
from .io import load_lora
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
    """Write ``ckpt``'s files to ``output`` with W += scale * delta(W) for every adapter layer, in the
    order given (a DoRA layer's change depends on the weight it meets, as when ComfyUI stacks them).

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
                total += scale * weights[module].delta(total)
            tensors[key] = total.to(tensors[key].dtype)
            merged.add(key)
        target = output / path.name
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=_metadata(path))
        written.append(target)
    if merged != deltas.keys():
        raise ChronoEditError(f"LoRA layers not found in the checkpoint: {sorted(deltas.keys() - merged)[:5]}")
    folder = ckpt.files[0].parent
    if len(ckpt.files) > 1:
        for index in folder.glob("*.safetensors.index.json"):
            copy_file(index, output / index.name)
    if ckpt.format == "diffusers" and (folder / "config.json").is_file():
        copy_file(folder / "config.json", output / "config.json")
    return written


def _metadata(path: Path) -> dict[str, str] | None:
    return read_header(path)[1] or None


def merge_model(model_dir: Path | None, dit: str | Path | None, loras: list[tuple[Path, float]],
                output: Path) -> tuple[Path, list[Path]]:
    """Merge LoRA files (path, scale) into the DiT of ``model_dir`` (or ``dit``) under ``output``.

    Every LoRA is checked (finite weights, layers of the DiT from its headers) before anything is written.
    With a model folder, its other components are symlinked so ``output`` is a complete model.
    ``output`` (new or empty) appears whole or not at all. Returns the folder holding the merged DiT
    and the files written.
    """
    ckpt = inspect_dit(discover_components(model_dir, dit=dit).dit if model_dir else Path(dit or ""))
    skeleton = meta_dit(ckpt)
    weights = []
    for path, scale in loras:
        lora, _ = load_lora(path)
        check_finite(lora, str(path))
        check_lora_matches(lora, skeleton, str(path))
        weights.append((lora, scale))
    dit_folder = ckpt.files[0].parent
    inside_model = model_dir is not None and dit_folder.resolve() != model_dir.resolve()
    with atomic_folder(output) as staging:
        written = merge_into_files(ckpt, weights, staging / dit_folder.name if inside_model else staging)
        if model_dir is not None:
            merged = {dit_folder.name} if inside_model else {f.name for f in ckpt.files} | {p.name for p in dit_folder.glob("*.index.json")}
            for entry in model_dir.iterdir():
                if entry.name not in merged and not (staging / entry.name).exists():
                    (staging / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return (output / dit_folder.name if inside_model else output), [output / p.relative_to(staging) for p in written]
