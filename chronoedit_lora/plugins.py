"""Load user plugins given as ``package.module:callable`` (captioners, prompt enhancers, degradations), and call them
so that a plugin's failure is one message naming the plugin and what it was working on."""

from __future__ import annotations

import importlib
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from PIL import Image

from .errors import ChronoEditError
from .user_files import text_problem


class PluginError(ChronoEditError):
    """A plugin raised or exited, or returned something other than a non-empty text a CSV can hold."""


class Plugin:
    """A loaded ``MODULE:CALLABLE`` whose every answer must be text: a non-empty string, or an object
    whose ``caption`` is one (a captioner's :class:`~chronoedit_lora.captioners.Caption`). ``about``
    names the pair or image it is called on, for the message if it fails (the plugin's own
    traceback is kept as the cause, shown with ``CHRONOEDIT_LORA_DEBUG=1``)."""

    def __init__(self, target: Callable, spec: str, option: str):
        self.target, self.spec, self.option = target, spec, option

    def __call__(self, *args, about: str | None = None):
        return self._checked(self.target, args, about)[0]

    @property
    def caption_batch(self) -> Callable | None:
        """The plugin's ``caption_batch(pairs, ...)`` (several pairs a call), guarded alike, or None."""
        batch = getattr(self.target, "caption_batch", None)
        return None if batch is None else lambda *args, about=None: self._checked(batch, args, about, many=True)

    def release(self) -> None:
        """Let the plugin free its model, if it can (``f.release``)."""
        if release := getattr(self.target, "release", None):
            release()

    def image(self, *args, about: str | None = None) -> Image.Image:
        """Call a plugin that must answer with an image (``--degrade``): the answer as RGB."""
        answer = self._called(self.target, args, about)
        if not isinstance(answer, Image.Image):
            raise PluginError(f"{self.option} {self.spec} returned a {type(answer).__name__}"
                              f"{f' on {about}' if about else ''}; it must return a PIL image. Nothing was written.")
        return answer.convert("RGB")

    def _called(self, function: Callable, args: tuple, about: str | None):
        """``function(*args)``, any failure a :class:`PluginError` naming the plugin and ``about``."""
        with _ctrl_c_noted() as pressed:
            try:
                return function(*args)
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # noqa: BLE001 - any way user code can end
                if pressed:  # the user's Ctrl-C, not the plugin's doing: the command stops as interrupted
                    raise
                said = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "(no message)"
                where = f" on {about}" if about else ""
                raise PluginError(f"{self.option} {self.spec} failed{where}: {type(exc).__name__}: {said}. "
                                  "Nothing was written.") from exc

    def _checked(self, function: Callable, args: tuple, about: str | None, many: bool = False) -> list:
        where = f" on {about}" if about else ""
        answer = self._called(function, args, about)
        answers = list(answer) if many else [answer]
        for item in answers:
            text = item if isinstance(item, str) else getattr(item, "caption", None)
            if not isinstance(text, str) or not text.strip():
                got = "an empty or blank text" if isinstance(text, str) else f"a {type(item).__name__}"
                raise PluginError(f"{self.option} {self.spec} returned {got}{where}; it must return the prompt text. "
                                  "Nothing was written.")
            texts = [text, getattr(item, "caption_cot", "")]  # every text the CSV will hold
            if problem := next((found for found in map(text_problem, texts) if found), None):
                raise PluginError(f"{self.option} {self.spec} returned text that {problem}{where}; a prompt must be "
                                  "plain text under that cap. Nothing was written.")
        return [item.strip() if isinstance(item, str) else item for item in answers]


@contextmanager
def _ctrl_c_noted() -> Iterator[list[int]]:
    """A list that a SIGINT arriving inside the block is added to (it still raises KeyboardInterrupt), so
    that the user's Ctrl-C is told from a plugin raising KeyboardInterrupt itself. Only where Python's
    own handler is in place, in the main thread (signals are not handled elsewhere)."""
    pressed: list[int] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield pressed
        return

    def note(signum: int, frame) -> None:
        pressed.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
