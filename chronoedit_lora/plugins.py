"""User plugins given as ``package.module:callable`` or ``path/to/file.py:callable``.

Two kinds exist: a :class:`Captioner` writes training prompts (``dataset prepare --captioner``),
a :class:`PromptEnhancer` rewrites edit instructions (``edit --prompt-enhancer``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from .errors import ChronoEditError

if TYPE_CHECKING:
    from PIL import Image


class Captioner(Protocol):
    def __call__(self, before: Image.Image, after: Image.Image, hint: str | None) -> str:
        """The edit instruction for a pair; ``hint`` is the fixed prompt or filled template, if any."""


class PromptEnhancer(Protocol):
    def __call__(self, image: Image.Image, instruction: str) -> str:
        """``instruction`` rewritten into ChronoEdit's detailed form for ``image``."""


def load_callable(spec: str, option: str = "--captioner") -> Callable:
    """Import ``MODULE:NAME`` (NAME may be dotted, e.g. ``Class.method``) and check it is callable.

    MODULE is a module name, or a ``.py`` file path. Errors name ``option`` and say what is wrong.
    """
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ChronoEditError(f"{option} {spec!r}: expected MODULE:CALLABLE, e.g. my_captioners.qwen:caption "
                              "or ./my_captioner.py:caption.")
    module = _import(module_name, spec, option)
    target: object = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ChronoEditError(f"{option} {spec!r}: {module_name} has no attribute {attribute!r}.")
        target = getattr(target, part)
    if not callable(target):
        raise ChronoEditError(f"{option} {spec!r}: {attribute} is a {type(target).__name__}, not a callable.")
    return target


def _import(module_name: str, spec: str, option: str) -> ModuleType:
    """The module named ``module_name``, or loaded from the file it names."""
    is_file = module_name.endswith(".py") or "/" in module_name or "\\" in module_name
    try:
        if not is_file:
            return importlib.import_module(module_name)
        path = Path(module_name)
        if not path.is_file():
            raise ChronoEditError(f"{option} {spec!r}: file {path} not found.")
        name = f"chronoedit_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # lets the plugin's dataclasses and pickling find it
        module_spec.loader.exec_module(module)
        return module
    except ImportError as exc:
        hint = ""
        if getattr(exc, "name", None) == module_name.split(".")[0]:
            hint = " Install it, add its folder to PYTHONPATH, or give the file: path/to/plugin.py:function."
        raise ChronoEditError(f"{option} {spec!r}: cannot import {module_name} ({exc}).{hint}") from None
