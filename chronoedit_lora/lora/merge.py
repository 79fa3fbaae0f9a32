"""Rewrite a DiT checkpoint shard by shard with some weights changed, keeping its layout (file names,
index, keys, dtype), and make the result a complete model folder (untouched components linked, not
copied): ``lora merge`` bakes LoRAs in this way, ``export`` a training run's weights."""

from __future__ import annotations

import sys

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..files import atomic_folder, atomic_path, copy_file
from ..models.components import describe_path, discover_components
from ..models.dit import DiTCheckpoint, inspect_dit, meta_dit, wan_names
from ..models.loading import read_header, read_state_dict
from ..models.quantized import stored_quantized
from .apply import LoraMismatchError, check_lora_file
from .weights import LoraWeights

# The tensors of one shard by DiffSynth/Wan name -> the new values of those it changes (any dtype).
Update = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def rewrite_files(ckpt: DiTCheckpoint, update: Update, output: Path,
                  dtype: torch.dtype | None = None) -> list[Path]:
    """Write ``ckpt``'s files to ``output`` with the tensors ``update`` changes, one shard in memory at a time.

    Changed tensors are cast to the stored dtype, or every floating-point tensor to ``dtype`` if given.
    A quantized DiT (GGUF, ComfyUI fp8) is written dequantized, in ``dtype`` or bfloat16, as
    ``<name>.safetensors``: a LoRA's change is finer than its quantization steps, and re-quantizing
    would need the original quantizer. Returns the written files (index JSON and config.json are
    copied alongside).
    """
    names = wan_names(ckpt)
    quantized = stored_quantized(ckpt)
    if quantized:
        print(f"{ckpt.files[0]} is quantized ({quantized}): the merged DiT is written dequantized in "
              f"{str(dtype or torch.bfloat16).removeprefix('torch.')}.", file=sys.stderr)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(ckpt.files, desc="writing", disable=len(ckpt.files) < 2):
        if quantized:  # the readers' dequantization; markers and scales dropped
            tensors = read_state_dict([path], dtype or torch.bfloat16)
            metadata = {"num_attention_heads": str(ckpt.kwargs["num_heads"])}
        else:
            tensors, metadata = load_file(str(path)), read_header(path)[1] or None
        keys = {names[key]: key for key in tensors if key in names}
        if dtype is not None:
            tensors = {key: t.to(dtype) if t.is_floating_point() else t for key, t in tensors.items()}
        for name, value in updated({name: tensors[key] for name, key in keys.items()}, update, path).items():
            tensors[keys[name]] = value
        target = output / f"{path.stem}.safetensors"
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        written.append(target)
    folder = ckpt.files[0].parent
    if len(ckpt.files) > 1:
        for index in folder.glob("*.safetensors.index.json"):
            copy_file(index, output / index.name)
    if ckpt.format == "diffusers" and (folder / "config.json").is_file():
        copy_file(folder / "config.json", output / "config.json")
    return written


def updated(tensors: dict[str, torch.Tensor], update: Update, source: Path) -> dict[str, torch.Tensor]:
    """The tensors ``update`` changes, in their stored dtype. A new value of another shape stops the
    write (the callers check every shape up front; this keeps a model of mixed shapes unwritable)."""
    new = update(tensors)
    misfit = [f"{name}: {tuple(value.shape)} vs {tuple(tensors[name].shape)}" for name, value in sorted(new.items())
              if value.shape != tensors[name].shape]
    if misfit:
        raise LoraMismatchError(f"{source}: the new weights do not fit the base's: {', '.join(misfit[:3])}; nothing was written.")
    return {name: value.to(tensors[name].dtype) for name, value in new.items()}


def lora_update(loras: list[tuple[LoraWeights, float]]) -> Update:
    """W += scale * delta(W) for every adapter layer, in float32 and in the order given (a DoRA
    layer's change depends on the weight it meets, as when ComfyUI stacks them)."""
    def update(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        new = {}
        for weights, scale in loras:
            for module, adapter in weights.items():
                name = f"{module}.weight"
                if name in tensors:
                    total = new.get(name, tensors[name].float())
                    new[name] = total + scale * adapter.delta(total)
        return new
    return update


def write_model(model_dir: Path | None, ckpt: DiTCheckpoint, update: Update, output: Path,
                dtype: torch.dtype | None = None) -> tuple[Path, list[Path]]:
    """:func:`rewrite_files` into ``output`` (the DiT's own subfolder when it is one of ``model_dir``'s)
    and, with a model folder, its other components symlinked so ``output`` is a complete model.
    ``output`` (new or empty) appears whole or not at all. Returns the folder holding the DiT and the
    files written."""
    dit_folder = ckpt.files[0].parent
    inside_model = model_dir is not None and dit_folder.resolve() != model_dir.resolve()
    with atomic_folder(output) as staging:
        written = rewrite_files(ckpt, update, staging / dit_folder.name if inside_model else staging, dtype)
        if model_dir is not None:
            merged = {dit_folder.name} if inside_model else {f.name for f in ckpt.files} | {p.name for p in dit_folder.glob("*.index.json")}
            for entry in model_dir.iterdir():
                if entry.name not in merged and not (staging / entry.name).exists():
                    (staging / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return (output / dit_folder.name if inside_model else output), [output / p.relative_to(staging) for p in written]


def merge_model(model_dir: Path | None, dit: str | Path | None, loras: list[tuple[Path, float]],
                output: Path) -> tuple[Path, list[Path]]:
    """Merge LoRA files (path, scale) into the DiT of ``model_dir`` (or ``dit``) under ``output``.

    Every LoRA is checked (finite weights, layers of the DiT from its headers) before anything is written.
    With a model folder, its other components are symlinked so ``output`` is a complete model, which
    appears whole or not at all. Returns the folder holding the merged DiT and the files written.
    """
    dit_path = discover_components(model_dir, dit=dit).dit if model_dir else Path(dit or "")
    print(f"model: dit: {describe_path(dit_path)}", file=sys.stderr)
    ckpt = inspect_dit(dit_path)
    skeleton = meta_dit(ckpt)
    weights = [(check_lora_file(path, skeleton, str(path)), scale) for path, scale in loras]
    return write_model(model_dir, ckpt, lora_update(weights), output)
