"""Write a ``metadata.csv`` from folders of pairs: ``before/`` + ``after/`` with matching names,
``NAME_before.*`` + ``NAME_after.*`` files, or 2-frame MP4s (the original repository's format);
and of trajectories: every video of more than 2 frames and every folder of images (other than
the pair folders) in the source folder or in its ``trajectories/`` folder.

Prompt of a row, first found: a ``.txt`` beside it (``NAME.txt``, ``NAME_prompt.txt``, in the
source folder or next to either image or the trajectory; a frame folder's own ``prompt.txt``),
``--prompt``, ``--prompt-template`` (``{style}``, ``{name}``), then ``--captioner`` (given a
trajectory's first and last frames; see :mod:`.captioning`). A captioner's :class:`Caption` fills the
``caption`` and ``caption_cot`` columns (the latter is trained on); a pair it finds unchanged
(``no change``) is left out unless ``keep_unchanged``. Or pairs made from finished images by
degrading a copy (:func:`prepare_degraded`, see :mod:`.degrade`).
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import os
import string
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..captioners import Caption
from ..errors import ChronoEditError
from ..files import write_text
from ..plugins import Plugin
from ..user_files import read_text
from .captioning import CaptionJob, caption_pairs, progress_path
from .degrade import DEGRADED_FOLDER, Generator, finished_images, write_degraded
from .images import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from .metadata import TRAJECTORY
from .trajectories import frame_files, load_trajectory, video_frame_count

FOLDER_PAIRS = (("before", "after"), ("input", "output"), ("source", "edited"))
TRAJECTORY_FOLDER = "trajectories"
COLUMN_ORDER = ("input_image", "edited_image", "video", TRAJECTORY, "prompt", "caption", "caption_cot")


@dataclass
class Prepared:
    rows: list[dict[str, str]]
    unmatched: list[str]
    layout: str
    trajectories: int = 0
    unchanged: list[str] = field(default_factory=list)  # pairs the captioner saw no change in, left out


def find_pairs(source: Path) -> tuple[list[tuple[str, Path, Path]], list[str], str]:
    """``[(name, before, after)]``, unmatched file names, and the layout found."""
    for before_dir, after_dir in FOLDER_PAIRS:
        if (source / before_dir).is_dir() and (source / after_dir).is_dir():
            befores = {p.stem: p for p in _images(source / before_dir)}
            afters = {p.stem: p for p in _images(source / after_dir)}
            return _match(befores, afters, f"{before_dir}/", f"{after_dir}/") + (f"{before_dir}/ + {after_dir}/",)
    befores = {p.stem[: -len("_before")]: p for p in _images(source) if p.stem.endswith("_before")}
    afters = {p.stem[: -len("_after")]: p for p in _images(source) if p.stem.endswith("_after")}
    if befores or afters:
        return _match(befores, afters, "", "") + ("NAME_before / NAME_after",)
    videos = [p for p in sorted(source.glob("*.mp4")) if video_frame_count(p) == 2]
    if videos:
        return [(p.stem, p, p) for p in videos], [], "2-frame MP4s"
    return [], [], "none"


def find_trajectories(source: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """``[(name, video or frame folder)]`` of the trajectories in ``source`` and its
    ``trajectories/`` folder, and the videos that could not be read."""
    pair_folders = {name for pair in FOLDER_PAIRS for name in pair} | {TRAJECTORY_FOLDER}
    found, unreadable = [], []
    for folder in (source, source / TRAJECTORY_FOLDER):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_dir() and not path.name.startswith(".") and path.name not in pair_folders and frame_files(path):
                found.append((path.name, path))
            elif path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
                count = video_frame_count(path)
                if count is None:
                    unreadable.append(f"{path.relative_to(source)} (not a readable video)")
                elif count > 2:
                    found.append((path.stem, path))
    return found, unreadable


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _match(befores: dict[str, Path], afters: dict[str, Path], before_label: str, after_label: str):
    names = sorted(befores.keys() & afters.keys())
    unmatched = [f"{before_label}{befores[n].name} (no edited image)" for n in sorted(befores.keys() - afters.keys())]
    unmatched += [f"{after_label}{afters[n].name} (no input image)" for n in sorted(afters.keys() - befores.keys())]
    return [(n, befores[n], afters[n]) for n in names], unmatched


def _prompt_file(source: Path, name: str, before: Path, after: Path) -> str | None:
    candidates = [folder / f"{name}{suffix}" for folder in dict.fromkeys((source, before.parent, after.parent))
                  for suffix in (".txt", "_prompt.txt")]
    for candidate in candidates + ([before / "prompt.txt"] if before.is_dir() else []):
        if candidate.is_file():
            return read_text(candidate).strip()
    return None


TEMPLATE_FIELDS = ("style", "name")


def check_template(template: str, style: str) -> None:
    """Refuse a ``--prompt-template`` that would fail or write a broken prompt: unknown or
    malformed placeholders, or ``{style}`` without a style."""
    valid = ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS)
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise ChronoEditError(f"--prompt-template {template!r}: {exc}; the placeholders are {valid}, and a literal "
                              "brace is written {{ or }}.") from None
    unknown = [field for field in fields if field not in TEMPLATE_FIELDS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], TEMPLATE_FIELDS, n=1)
        hint = f" (did you mean {{{close[0]}}}?)" if close else ""
        raise ChronoEditError(f"--prompt-template {template!r}: unknown placeholder {{{unknown[0]}}}{hint}; "
                              f"the placeholders are {valid}.")
    if "style" in fields and not style.strip():
        raise ChronoEditError(f"--prompt-template {template!r} uses {{style}} but no style was given; pass --style "
                              "(e.g. --style \"watercolor\"), or remove {style} from the template.")
    try:  # what parse() does not see: format specs ({style:d}) and placeholders nested in them
        template.format(style=style, name="NAME")
    except (KeyError, IndexError, ValueError) as exc:
        raise ChronoEditError(f"--prompt-template {template!r}: {exc!r}; the placeholders are {valid}, written "
                              "plainly (e.g. {style}).") from None


def prepare(source: Path, csv_path: Path, prompt: str | None = None, template: str | None = None,
            style: str = "", captioner: Plugin | None = None, caption_batch_size: int = 1,
            keep_unchanged: bool = False) -> Prepared:
    """Build the rows (paths relative to ``csv_path``'s folder); raises if no prompt can be found
    or ``template`` is unusable (:func:`check_template`). Captions are saved as they come in
    ``csv_path``'s progress file (:func:`.captioning.progress_path`), and reused from it."""
    if template is not None:
        check_template(template, style)
    pairs, unmatched, layout = find_pairs(source)
    trajectories, unreadable = find_trajectories(source)
    if not pairs and not trajectories:
        raise ChronoEditError(f"{source}: no pairs or trajectories found. Expected before/ + after/ folders, "
                              "NAME_before / NAME_after images, 2-frame MP4s, or videos / frame folders of "
                              "trajectories (here or in trajectories/).")
    items = [(name, before, after, False) for name, before, after in pairs]
    items += [(name, path, path, True) for name, path in trajectories]
    results: list[Caption | str | None] = []
    for name, before, after, _ in items:
        text = _prompt_file(source, name, before, after) or prompt
        results.append(template.format(style=style, name=name) if text is None and template is not None else text)
    if captioner is not None:
        _caption_missing(items, results, captioner, csv_path, caption_batch_size, keep_unchanged)
    rows, no_prompt, unchanged = [], [], []
    for (name, before, after, trajectory), result in zip(items, results):
        if isinstance(result, Caption) and result.unchanged and not keep_unchanged:
            unchanged.append(name)
        elif not (result.caption_cot if isinstance(result, Caption) else result):
            no_prompt.append(name)
        else:
            texts = {"caption": result.caption, "caption_cot": result.caption_cot} if isinstance(result, Caption) \
                else {"prompt": result}
            rows.append({**_paths(before, after, trajectory, csv_path), **texts})
    if unchanged and not rows and not no_prompt:
        raise ChronoEditError(f"the captioner saw no change in any of the {len(unchanged)} pair(s) "
                              f"({', '.join(unchanged[:5])}): nothing to train on. Pass --keep-unchanged to keep them.")
    if no_prompt:
        raise ChronoEditError(f"no prompt for {len(no_prompt)} row(s) ({', '.join(no_prompt[:5])}): give --prompt, "
                              "--prompt-template, per-pair .txt files or --captioner.")
    return Prepared(rows, unmatched + unreadable, layout, len(trajectories), unchanged)


def prepare_degraded(source: Path, csv_path: Path, generators: list[Generator], seed: int = 0,
                     prompt: str | None = None, template: str | None = None, style: str = "") -> Prepared:
    """Pairs from the finished images in ``source``: for each image and generator, the degraded copy
    (written under ``csv_path``'s folder, ``degraded/<generator>/``) as the input and the image as the
    target. The prompt: ``prompt``, else ``template``, else the generator's own instruction."""
    if template is not None:
        check_template(template, style)
    if prompt is None and template is None and (plugins := [g.label for g in generators if g.instruction is None]):
        raise ChronoEditError(f"--degrade {', '.join(plugins)}: a plugin has no instruction of its own; give "
                              "--prompt or --prompt-template for its rows.")
    images = finished_images(source)
    rows = []
    for generator in generators:
        for image in images:
            degraded = write_degraded(image, generator, seed, csv_path.parent / DEGRADED_FOLDER)
            text = prompt or (template.format(style=style, name=image.stem) if template else generator.instruction)
            rows.append({**_paths(degraded, image, False, csv_path), "prompt": text})
    return Prepared(rows, [], f"{len(images)} finished images x {len(generators)} degradation(s)")


def _caption_missing(items: list[tuple[str, Path, Path, bool]], results: list, captioner: Plugin, csv_path: Path,
                     batch_size: int, keep_unchanged: bool) -> None:
    """Fill the ``results`` that have no prompt yet with the captioner's (2-frame MP4s excepted)."""
    jobs = {i: CaptionJob("|".join(_paths(before, after, trajectory, csv_path).values()),
                          functools.partial(_ends, before, after, trajectory))
            for i, (_, before, after, trajectory) in enumerate(items)
            if results[i] is None and (before != after or trajectory)}
    if jobs:
        captions = caption_pairs(list(jobs.values()), captioner, progress_path(csv_path), batch_size, keep_unchanged)
        for i, job in jobs.items():
            results[i] = captions[job.key]


def _paths(before: Path, after: Path, trajectory: bool, csv_path: Path) -> dict[str, str]:
    """A row's path columns."""
    if trajectory:
        return {TRAJECTORY: _relative(before, csv_path)}
    if before == after:
        return {"video": _relative(before, csv_path)}
    return {"input_image": _relative(before, csv_path), "edited_image": _relative(after, csv_path)}


def _ends(before: Path, after: Path, trajectory: bool) -> tuple[Image.Image, Image.Image]:
    """The input and edited image of a pair, or the first and last frame of a trajectory, as RGB."""
    if trajectory:
        frames, problems = load_trajectory(before, None, TRAJECTORY, frames=2)
        if not frames:
            raise ChronoEditError(f"{before}: {problems[0].reason} {problems[0].fix}")
        return frames[0], frames[1]
    with Image.open(before) as b, Image.open(after) as a:
        return b.convert("RGB"), a.convert("RGB")


def _relative(path: Path, csv_path: Path) -> str:
    return os.path.relpath(path.resolve(), csv_path.parent.resolve()).replace(os.sep, "/")


def check_output(csv_path: Path, overwrite: bool = False) -> None:
    """Refuse to replace an existing CSV unless asked (checked before any captioning, and when writing)."""
    if csv_path.exists() and not overwrite:
        raise ChronoEditError(f"{csv_path} exists; pass --overwrite to replace it.")


def write_metadata(rows: list[dict[str, str]], csv_path: Path, overwrite: bool = False) -> None:
    """Write the CSV atomically; refuse to replace an existing one unless asked."""
    check_output(csv_path, overwrite)
    buffer = io.StringIO()
    columns = [column for column in COLUMN_ORDER if any(column in row for row in rows)]
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(csv_path, buffer.getvalue())
