"""The model the web app loaded once, and one edit on it as ``chronoedit-lora edit`` does it.

Page settings become the edit command's own arguments (its parser's defaults plus what the page
set), checked and mapped to the pipeline by the same functions the command uses, so a page edit
equals the command's with the same settings. LoRAs are applied unfused (forward hooks) and kept
between edits: switching LoRAs or scales costs no reload.

Each page's job (an edit, or a comparison's edits) has its own cancel flag, checked before every
denoising step: the page's Cancel sets it, and so does closing the page (Gradio's unload event), so
an abandoned edit frees the model before its next step, and a job of a page already closed never
starts.
"""

from __future__ import annotations

import argparse
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..commands import edit as edit_command
from ..data.images import open_image
from ..errors import ChronoEditError
from ..lora import UnfusedLora, parse_lora_spec
from ..pipeline import ChronoEditPipeline, EditRequest, EditResult
from ..train.state.checkpoint import CHECKPOINTS
from .safety import listed, readable

LORA_SUFFIX = ".safetensors"
CLOSED_PAGES_KEPT = 4096  # closed pages remembered, so that their queued jobs are refused


class EditCancelled(ChronoEditError):
    """The page's Cancel, or closing the page, stopped its edit between two denoising steps."""


@dataclass(frozen=True)
class Folders:
    """The folders the app was started with (None: not given); only these are served."""

    runs: Path | None
    loras: Path | None
    datasets: Path | None
    history: Path

    def served(self) -> list[Path]:
        return [folder for folder in (self.runs, self.loras, self.datasets, self.history) if folder is not None]


def modified(path: Path) -> float | None:
    """A file's modification time (None once it is gone)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def edit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronoedit-lora edit", add_help=False)
    edit_command.add_arguments(parser)
    return parser


class Session:
    """The loaded pipeline, its active LoRAs, and the cancel flag of each page's job."""

    def __init__(self, pipe: ChronoEditPipeline, args: argparse.Namespace, folders: Folders,
                 enhancer: Callable | None = None):
        self.pipe = pipe
        self.args = args  # the ui command's arguments (the model flags among them)
        self.folders = folders
        self.enhancer = enhancer
        self._jobs: dict[str | None, threading.Event] = {}  # page (Gradio's session hash) -> its job's cancel flag
        self._closed: OrderedDict[str | None, None] = OrderedDict()  # pages closed lately, oldest first
        self._pages = threading.Lock()  # guards the two above
        self._busy = threading.Lock()  # one edit at a time, even if a cancelled one is still ending its step
        self._parser = edit_parser()
        self._loras: dict[Path, tuple[float | None, list[UnfusedLora]]] = {}  # path -> (file mtime, its hooks per use)

    # -- LoRAs --------------------------------------------------------------------------------
    def lora_choices(self) -> list[tuple[str, str]]:
        """(label, path) of every LoRA file under --loras, and of every run's LoRAs under --runs
        (the final ``lora.safetensors`` and the per-checkpoint ``lora-stepN.safetensors``), links that
        lead out of their folder left out."""
        found = []
        if self.folders.loras is not None:
            found += [("loras", self.folders.loras, p)
                      for p in listed(self.folders.loras.rglob(f"*{LORA_SUFFIX}"), [self.folders.loras])]
        if self.folders.runs is not None:
            found += [("runs", self.folders.runs, p)
                      for p in listed(self.folders.runs.rglob(f"lora*{LORA_SUFFIX}"), [self.folders.runs])
                      if CHECKPOINTS not in p.relative_to(self.folders.runs).parts]
        return sorted((f"{name}/{path.relative_to(root)}", str(path)) for name, root, path in found)

    def lora_specs(self, pairs: list[tuple[str | None, float]]) -> list[str]:
        """``PATH:SCALE`` values (as ``--lora`` takes them) for the chosen LoRAs, each checked to lie
        in a served folder."""
        specs = []
        for path, scale in pairs:
            if path:
                specs.append(f"{readable(path, [self.folders.loras, self.folders.runs], 'LoRA')}:{float(scale):g}")
        return specs

    def use_loras(self, loras: list[tuple[Path, float]]) -> None:
        """Make exactly ``loras`` active at their scales, stacked as `edit` stacks its ``--lora`` flags
        (a file chosen twice, as Compare's fixed LoRA and as a variant, is applied twice); files
        already hooked as often (and unchanged on disk) are only rescaled."""
        wanted: dict[Path, list[float]] = {}
        for path, scale in loras:
            wanted.setdefault(path, []).append(scale)
        for path in list(self._loras):
            mtime, hooks = self._loras[path]
            if len(wanted.get(path, [])) != len(hooks) or modified(path) != mtime:  # unwanted, rewritten or removed
                for hook in hooks:
                    hook.remove()
                del self._loras[path]
        for path, scales in wanted.items():
            if path not in self._loras:
                self._loras[path] = (modified(path), [self.pipe.load_lora(path, scale, fuse=False) for scale in scales])
            for hook, scale in zip(self._loras[path][1], scales):
                hook.scale = scale

    # -- page jobs ----------------------------------------------------------------------------
    @contextmanager
    def job(self, page: str | None) -> Iterator[threading.Event]:
        """The cancel flag of one job of ``page``, for as long as the job runs; a closed page's job
        is refused before it starts."""
        cancelled = threading.Event()
        with self._pages:
            if page in self._closed:
                raise EditCancelled("the page that asked for this edit was closed; it was not started.")
            self._jobs[page] = cancelled
        try:
            yield cancelled
        finally:
            with self._pages:
                if self._jobs.get(page) is cancelled:
                    del self._jobs[page]

    def cancel(self, page: str | None) -> None:
        """Stop ``page``'s running job before its next denoising step (other pages' jobs go on)."""
        with self._pages:
            if page in self._jobs:
                self._jobs[page].set()

    def page_closed(self, page: str | None) -> None:
        """``page`` is gone: cancel its running job and refuse its queued ones."""
        with self._pages:
            self._closed[page] = None
            while len(self._closed) > CLOSED_PAGES_KEPT:
                self._closed.popitem(last=False)
        self.cancel(page)

    # -- one edit -----------------------------------------------------------------------------
    def start(self, image_path: str | None, instruction: str | None) -> Image.Image:
        """A page job's input, checked and decoded (as ``edit --image`` decodes it)."""
        if not image_path:
            raise ChronoEditError("upload an input image first.")
        if not (instruction or "").strip():
            raise ChronoEditError("write an instruction first.")
        return open_image(image_path, "input image")

    def edit_args(self, **values) -> argparse.Namespace:
        """The edit command's arguments: its defaults, this app's model flags, then ``values``
        (edit flags by their argparse names, e.g. ``steps``, ``lora``, ``temporal_reasoning_steps``)."""
        args = self._parser.parse_args([])
        for key, value in vars(self.args).items():
            if key in vars(args) and key != "prompt_enhancer":
                setattr(args, key, value)
        args.unfused = True  # the app keeps LoRAs as hooks
        for key, value in values.items():
            if key not in vars(args):
                raise TypeError(f"edit has no setting {key!r}")
            setattr(args, key, value)
        return args

    def command(self, args: argparse.Namespace) -> list[str]:
        """``chronoedit-lora edit ...``: the flags of ``args`` that differ from the defaults."""
        argv = ["chronoedit-lora", "edit"]
        for action in self._parser._actions:
            value = getattr(args, action.dest, None)
            if not action.option_strings or value == action.default or value is None:
                continue
            flag = action.option_strings[-1]
            if isinstance(value, bool):
                argv.append(flag)
            elif isinstance(value, list):
                argv += [part for item in value for part in (flag, str(item))]
            else:
                argv += [flag, str(value)]
        return argv

    def edit(self, image: Image.Image, args: argparse.Namespace, cancelled: threading.Event,
             report: Callable[[int, int], None] | None = None) -> EditResult:
        """One edit of ``image`` with ``args`` (checked first, as the command checks them), stopped
        before the next denoising step once ``cancelled`` (its :meth:`job`'s flag) is set;
        ``report(step, steps)`` before each denoising step."""
        settings = edit_command.sampling_settings(args)
        edit_command.check_edit_settings(args, settings)
        request = EditRequest(image, args.prompt, args.negative_prompt, args.seed)
        with self._busy:
            self.use_loras([parse_lora_spec(value) for value in args.lora])
            on_step = functools.partial(self._step, cancelled=cancelled, report=report)  # before each step
            return next(self.pipe.edit_many([request], progress=True, on_step=on_step,
                                            **edit_command.edit_options(args, settings)))

    @staticmethod
    def _step(step: int, steps: int, cancelled: threading.Event, report: Callable[[int, int], None] | None) -> None:
        if cancelled.is_set():
            raise EditCancelled(f"edit cancelled before step {step + 1} of {steps}.")
        if report is not None:
            report(step, steps)
