"""A training run's weights as a model of their own: a diffusers-layout folder (the DiT's shards
rewritten with the trained weights, the other components linked) or one ComfyUI/Wan file.

Works on any checkpoint of a run, a LoRA run's (its LoRA, or its EMA, baked into the base) or a
full fine-tune's (its sharded weights or their EMA read back in one process, shard by shard of the
base, so a 14B export holds one base shard at a time in memory).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...errors import ChronoEditError
from ...files import atomic_path
from ...lora import check_finite, check_lora_matches, load_lora
from ...lora.apply import check_weights_match
from ...lora.merge import Update, lora_update, updated, write_model
from ...models.components import find_dit
from ...models.dit import HEADS_METADATA_KEY, DiTCheckpoint, inspect_dit, meta_dit, wan_names
from ...models.loading import read_state_dict
from . import checkpoint as ckpt
from . import dcp
from .lora_export import FINAL_NAME
from .run_folder import EMA_NAME, check_checkpoint, saved_settings

# key prefixes of the single-file formats: ComfyUI's full-model saves, and the original Wan names
SINGLE_FILE_PREFIX = {"comfyui": "model.diffusion_model.", "wan": ""}


def run_checkpoint(run: Path) -> Path:
    """``run`` if it is a checkpoint folder, else the newest complete checkpoint of the run folder
    ``run``; checked complete (:func:`.run_folder.check_checkpoint`) before anything reads it."""
    checkpoint = run if (run / "progress.json").is_file() else ckpt.latest_checkpoint(run)
    if checkpoint is None:
        raise ChronoEditError(f"{run}: neither a training run with a complete checkpoint (under {run / ckpt.CHECKPOINTS}) "
                              "nor a checkpoint folder.")
    check_checkpoint(checkpoint)
    return checkpoint


def run_update(checkpoint: Path, full: bool, ema: bool, base: DiTCheckpoint) -> Update:
    """How the run changes the base (its weights replace them, or its LoRA adds to them); refused,
    before anything is read or written, unless every changed weight is one of the base's in its
    shape (the check ``lora merge`` makes)."""
    skeleton = meta_dit(base)
    if full:
        trained = set(full_run_shapes(checkpoint, ema, skeleton))
        return lambda tensors: dcp.read_weights(checkpoint, sorted(trained & tensors.keys()), ema)
    lora = checkpoint / (EMA_NAME if ema else FINAL_NAME)
    if not lora.is_file():
        raise ChronoEditError(f"--ema: {checkpoint} holds no {EMA_NAME}; the run was trained without ema_decay/ema_power."
                              if ema else f"{lora} is missing.")
    weights, _ = load_lora(lora)
    check_finite(weights, str(lora))
    check_lora_matches(weights, skeleton, str(lora))
    return lora_update([(weights, 1.0)])


def full_run_shapes(checkpoint: Path, ema: bool, skeleton: torch.nn.Module) -> dict[str, list[int]]:
    """The trained weights' shapes of a full fine-tune's ``checkpoint``, checked against the base's
    (``skeleton``: :func:`.meta_dit`), the EMA's presence with ``ema``."""
    saved = dcp.saved_tensors(checkpoint)
    if ema and not any(key.startswith("ema.") for key in saved):
        raise ChronoEditError(f"--ema: {checkpoint} holds no EMA; the run was trained without ema_decay/ema_power.")
    shapes = {key[len("model."):]: shape for key, (shape, _) in saved.items() if key.startswith("model.")}
    check_weights_match(shapes, skeleton, str(checkpoint / dcp.STATE))
    return shapes


def is_run(path: Path) -> bool:
    """Whether ``path`` is a training run folder or one of its checkpoints (not a model)."""
    return (path / "progress.json").is_file() or (path / ckpt.CHECKPOINTS).is_dir()


Reader = Callable[[list[str]], dict[str, torch.Tensor]]


def full_run_reader(run: Path, base: DiTCheckpoint, read_base: Reader, ema: bool = False) -> tuple[Reader, set[str]]:
    """``(read(names) -> tensors, trained names)`` of a full fine-tune's newest checkpoint (or the
    checkpoint ``run``), checked against ``base``: its trained weights (or their EMA), the base's
    (``read_base``) for the rest."""
    checkpoint = run_checkpoint(run)
    if saved_settings(checkpoint).get("finetune", "lora") != "full":
        raise ChronoEditError(f"{run} is a LoRA run: its LoRA is {checkpoint / FINAL_NAME} already.")
    trained = set(full_run_shapes(checkpoint, ema, meta_dit(base)))

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        return {**read_base(sorted(set(names) - trained)), **dcp.read_weights(checkpoint, sorted(set(names) & trained), ema)}
    return read, trained


def export_run(run: Path, fmt: str, output: Path, ema: bool = False, model: Path | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write the run's weights (newest checkpoint, or the checkpoint ``run``) as ``fmt`` (diffusers,
    comfyui or wan) to ``output`` (a new folder for diffusers, a .safetensors file otherwise). The
    base is the run's ``model`` (or ``dit``) unless ``model`` is given; tensors keep its dtype
    unless ``dtype`` is given."""
    checkpoint = run_checkpoint(run)
    settings = saved_settings(checkpoint)
    model_dir = model or (Path(settings["model"]) if settings.get("model") else None)
    if model is None and settings.get("dit"):  # the run's own DiT override
        base = inspect_dit(settings["dit"])
    elif model_dir is not None:
        base = inspect_dit(find_dit(model_dir))
    else:
        raise ChronoEditError(f"{checkpoint} names no base model; pass it with --model.")
    update = run_update(checkpoint, settings.get("finetune", "lora") == "full", ema, base)
    if fmt == "diffusers":
        if base.format != "diffusers":
            raise ChronoEditError(f"--to diffusers rewrites a diffusers-layout base, and this run's DiT ({base.files[0]}) is "
                                  "in the Wan layout; export --to wan or comfyui, or pass --model DIFFUSERS_FOLDER.")
        write_model(model_dir, base, update, output, dtype)
    else:
        _write_single_file(base, update, output, SINGLE_FILE_PREFIX[fmt], dtype)
    return output


def _write_single_file(base: DiTCheckpoint, update: Update, output: Path, prefix: str, dtype: torch.dtype | None) -> None:
    """The whole DiT in original Wan names (with ``prefix``) as one safetensors file."""
    names = wan_names(base)
    state = {names[key]: tensor for key, tensor in read_state_dict(base.files, dtype).items() if key in names}
    state.update(updated(state, update, base.files[0]))
    with atomic_path(output) as tmp:
        save_file({prefix + name: t.contiguous() for name, t in state.items()}, str(tmp),
                  metadata={HEADS_METADATA_KEY: str(base.kwargs["num_heads"]),
                            "rope_temporal_skip_len": str(base.temporal_skip_len)})
