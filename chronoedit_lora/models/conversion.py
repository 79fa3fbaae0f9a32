"""Helpers shared by the encoder adapters: run a key converter on shapes alone, check a
component's ``config.json`` against what DiffSynth's module hard-codes, name a wrong file."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import CheckpointError

Converter = Callable[[Mapping], dict]


def convert_shapes(converter: Converter, shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Key shapes after ``converter``: it runs on meta tensors, so sizing a model goes through the
    very code that later converts its weights, without reading or allocating any data."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    return {name: list(tensor.shape) for name, tensor in converter(meta).items()}


def check_config(config: Mapping, supported: Mapping[str, tuple], where: str, what: str) -> None:
    """Raise :class:`CheckpointError` when ``config`` sets a field to a value DiffSynth cannot run
    (``supported``: field -> allowed values; absent fields are fine)."""
    for field, allowed in supported.items():
        if field in config and config[field] not in allowed:
            raise CheckpointError(
                f"{where}: a {what} with {field}={config[field]!r} is not supported "
                f"(DiffSynth's module implements {field} = {' or '.join(map(repr, allowed))} only).")


def wrong_component(where: str, what: str, expected: str, shapes: Mapping[str, Sequence[int]]) -> CheckpointError:
    """The error for weights that are not the component asked for."""
    sample = ", ".join(sorted(shapes)[:3]) or "none"
    return CheckpointError(f"{where} does not hold {what}: expected {expected}; its first keys are {sample}.")
