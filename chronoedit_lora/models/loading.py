"""Build a model through DiffSynth's registry and loader (lazy per-tensor reads, ``assign=True``)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffsynth.models.model_loader import ModelPool

from . import registry
from .component_config import read_config
from .lean_read import read_state_dict
from .weight_files import read_shapes, resolve_weight_files

# (shapes, config.json of a component folder, where) -> (constructor kwargs, converter dotted path)
KwargsFromShapes = Callable[[dict[str, list[int]], dict, str], tuple[dict, "str | None"]]



def load_registered(files: Sequence[Path], entry: dict, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    """Let DiffSynth build ``entry``'s model class and fill it from ``files``.

    ``entry`` comes from :func:`registry.ensure_entry`, so it is in ``MODEL_CONFIGS`` too.
    """
    pool = ModelPool()
    vram_config = pool.default_vram_config()
    device = torch.device(device)
    # accelerate names CPU ranks "cpu:N"; safetensors only accepts "cpu"
    vram_config.update(computation_dtype=dtype, computation_device="cpu" if device.type == "cpu" else str(device))
    paths = [str(f) for f in files]
    state_dict = read_state_dict(files, dtype)  # the weights once in RAM (see lean_read)
    with contextlib.redirect_stdout(io.StringIO()):  # DiffSynth prints every key map it builds
        return pool.load_model_file(entry, paths if len(paths) > 1 else paths[0], vram_config, state_dict=state_dict)


def load_component(path: str | Path, what: str, model_name: str, model_class: str, kwargs_from_shapes: KwargsFromShapes,
                   dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    """Resolve a component's files, size it from its shapes, register it, and load it."""
    files = resolve_weight_files(path, what)
    shapes, _ = read_shapes(files)
    kwargs, converter = kwargs_from_shapes(shapes, read_config(path), str(path))
    entry = registry.ensure_entry(registry.hash_shapes(shapes), model_name, model_class, kwargs, converter)
    return load_registered(files, entry, dtype, device)
