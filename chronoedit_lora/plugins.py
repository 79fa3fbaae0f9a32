"""Load user plugins given as ``package.module:callable`` (captioners, prompt enhancers), and call them
so that a plugin's failure is one message naming the plugin and what it was working on."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .errors import ChronoEditError


class PluginError(ChronoEditError):
    """A plugin raised, or returned something other than a non-empty text."""


class Plugin:
    """A loaded ``MODULE:CALLABLE`` that must return a non-empty string; ``about`` names the pair or
    image it is called on, for the message if it fails (the plugin's own traceback is kept as the
    cause, shown with ``CHRONOEDIT_LORA_DEBUG=1``)."""

    def __init__(self, target: Callable, spec: str, option: str):
        self.target, self.spec, self.option = target, spec, option

    def __call__(self, *args, about: str | None = None) -> str:
        where = f" on {about}" if about else ""
        try:
            text = self.target(*args)
        except Exception as exc:  # noqa: BLE001 - any failure inside user code is reported the same way
            raise PluginError(f"{self.option} {self.spec} failed{where}: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else '(no message)'}") from exc
        if not isinstance(text, str) or not text.strip():
            got = "an empty or blank text" if isinstance(text, str) else f"a {type(text).__name__}"
            raise PluginError(f"{self.option} {self.spec} returned {got}{where}; it must return the prompt text. "
                              "Nothing was written.")
        return text.strip()


def load_callable(spec: str, option: str = "--captioner") -> Plugin:
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
    return Plugin(target, spec, option)
