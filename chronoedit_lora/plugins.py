"""Load user plugins given as ``package.module:callable`` (captioners, prompt enhancers)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .errors import ChronoEditError


def load_callable(spec: str, option: str = "--captioner") -> Callable:
    """Import ``module:attribute`` and check it is callable, with errors naming the option."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ChronoEditError(f"{option} {spec!r}: expected MODULE:CALLABLE, e.g. my_captioners.qwen:caption.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ChronoEditError(f"{option} {spec!r}: cannot import {module_name} ({exc}).") from None
    target = getattr(module, attribute, None)
    if target is None:
        raise ChronoEditError(f"{option} {spec!r}: {module_name} has no attribute {attribute!r}.")
    if not callable(target):
        raise ChronoEditError(f"{option} {spec!r}: {attribute} is not callable.")
    return target
