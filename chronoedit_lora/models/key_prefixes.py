"""State-dict converters for original-format DiT files whose keys carry a ComfyUI prefix.

DiffSynth calls converters with a lazy ``DiskMap`` (iterable, indexable), so these only rename.
"""

from __future__ import annotations

from collections.abc import Mapping


def _strip(state_dict: Mapping, prefix: str) -> dict:
    return {name[len(prefix):]: state_dict[name] for name in state_dict if name.startswith(prefix)}


def strip_model_diffusion_model(state_dict: Mapping) -> dict:
    """``model.diffusion_model.blocks.0…`` -> ``blocks.0…`` (ComfyUI full-model saves)."""
    return _strip(state_dict, "model.diffusion_model.")


def strip_diffusion_model(state_dict: Mapping) -> dict:
    """``diffusion_model.blocks.0…`` -> ``blocks.0…`` (ComfyUI repackaged diffusion models)."""
    return _strip(state_dict, "diffusion_model.")
