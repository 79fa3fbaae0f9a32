"""Write a ``metadata.csv`` from a folder of edit pairs (``dataset prepare``).

Source layouts, the first that applies:

* ``before/`` + ``after/`` (or ``input/`` + ``output/``, ``source/`` + ``edited/``) holding images
  with matching file stems -> ``input_image,edited_image,prompt``;
* ``NAME_before.*`` + ``NAME_after.*`` images in one folder -> the same columns;
* 2-frame videos (frame 0 source, frame 1 edited; the original repository's format) -> ``video,prompt``.

A pair's prompt, first found: a text file (``NAME.txt`` or ``NAME_prompt.txt`` in the source folder
or beside either image); the captioner, asked with the fixed prompt as a hint; the fixed prompt
(``prompt``, or ``template`` with ``{style}`` and ``{name}`` filled in). Every image is decoded once:
unreadable pairs are left out and reported, like unmatched files.
"""

from __future__ import annotations

import csv
import difflib
import os
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ChronoEditError
from ..plugins import Captioner
from .images import IMAGE_SUFFIXES, VIDEO_SUFFIXES, PairImages, load_pair
from .metadata import IMAGE_COLUMNS, VIDEO_COLUMNS, EditPair, clean_prompt

FOLDER_PAIRS = (("before", "after"), ("input", "output"), ("source", "edited"))
TAGS = ("_before", "_after")
PLACEHOLDERS = frozenset({"style", "name"})
PROMPT_FILES = ("{name}.txt", "{name}_prompt.txt")


@dataclass(frozen=True)
class SourcePair:
    """Two images found for one name; for a video both paths are the same file."""

    name: str
    before: Path
    after: Path

    @property
    def is_video(self) -> bool:
        return self.before == self.after


@dataclass
class Scan:
    """The pairs found, one line per file left out (unmatched, ambiguous, unsupported), and the layout."""

    pairs: list[SourcePair]
    skipped: list[str]
    layout: str


@dataclass
class Prepared:
    """CSV rows (paths relative to the CSV's folder), files left out, layout, and where prompts came from."""

    rows: list[dict[str, str]]
    skipped: list[str]
    layout: str
    prompt_sources: Counter = field(default_factory=Counter)


def find_pairs(source: Path) -> Scan:
    """The pairs in ``source`` under the first layout that applies (see the module docstring)."""
    for before_name, after_name in FOLDER_PAIRS:
        if (source / before_name).is_dir() and (source / after_name).is_dir():
            finder = _Finder(source)
            befores = finder.index(_files(source / before_name), lambda p: p.stem)
            afters = finder.index(_files(source / after_name), lambda p: p.stem)
            return finder.match(befores, afters, f"{before_name}/ + {after_name}/")
    finder = _Finder(source)
    files = _files(source)
    tagged = [p for p in files if _tag(p)]
    videos = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
    if tagged:
        befores = finder.index([p for p in tagged if _tag(p) == TAGS[0]], lambda p: p.stem[: -len(TAGS[0])])
        afters = finder.index([p for p in tagged if _tag(p) == TAGS[1]], lambda p: p.stem[: -len(TAGS[1])])
        finder.ignore([p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not _tag(p)] + videos,
                      "ignored: the name does not end in _before or _after")
        return finder.match(befores, afters, "NAME_before + NAME_after")
    if videos:
        by_name = finder.index(videos, lambda p: p.stem, VIDEO_SUFFIXES)
        finder.ignore([p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
                      "ignored: pair images need before/ + after/ folders or NAME_before / NAME_after names")
        return Scan([SourcePair(n, p, p) for n, p in sorted(by_name.items())], finder.skipped, "2-frame videos")
    return Scan([], [], "none")


def _files(folder: Path) -> list[Path]:
    """Visible files of ``folder``, sorted; text files (prompts) and CSVs are not candidates."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in (".txt", ".csv"))


def _tag(path: Path) -> str | None:
    """``_before`` or ``_after`` if the file's stem ends with it (any case)."""
    return next((tag for tag in TAGS if path.stem.lower().endswith(tag)), None)


class _Finder:
    """Builds one :class:`Scan`, collecting the files it leaves out."""

    def __init__(self, source: Path):
        self.source = source
        self.skipped: list[str] = []
        self.ambiguous: set[str] = set()  # names shared by several files on one side

    def label(self, path: Path) -> str:
        return path.relative_to(self.source).as_posix()

    def ignore(self, paths: list[Path], reason: str) -> None:
        self.skipped += [f"{self.label(p)}: {reason}" for p in paths]

    def index(self, paths: list[Path], key, suffixes: frozenset = IMAGE_SUFFIXES) -> dict[str, Path]:
        """``{key(path): path}`` for files with a supported suffix; other files and shared keys are reported."""
        supported = [p for p in paths if p.suffix.lower() in suffixes]
        self.ignore([p for p in paths if p.suffix.lower() not in suffixes],
                    f"ignored: not a supported file type ({', '.join(sorted(suffixes))})")
        groups: dict[str, list[Path]] = {}
        for path in supported:
            groups.setdefault(key(path), []).append(path)
        for name, group in groups.items():
            if len(group) > 1:
                self.ambiguous.add(name)
                self.skipped.append(f"{' and '.join(self.label(p) for p in group)}: same name {name!r}, so the pair "
                                    "is ambiguous and left out; rename or remove one")
        return {name: group[0] for name, group in groups.items() if len(group) == 1}

    def match(self, befores: dict[str, Path], afters: dict[str, Path], layout: str) -> Scan:
        """Pairs for names on both sides; each lone file is reported, with the closest name on the other side."""
        for side, other, missing in ((befores, afters, "edited"), (afters, befores, "input")):
            candidates = sorted(other.keys() - side.keys())
            for name in sorted(side.keys() - other.keys() - self.ambiguous):
                close = difflib.get_close_matches(name, candidates, n=1)
                hint = f"; did you mean {self.label(other[close[0]])}?" if close else ""
                self.skipped.append(f"{self.label(side[name])}: no {missing} image with the same name{hint}")
        pairs = [SourcePair(name, befores[name], afters[name]) for name in sorted(befores.keys() & afters.keys())]
        return Scan(pairs, self.skipped, layout)


def check_template(template: str, style: str | None) -> None:
    """Raise ChronoEditError unless ``template`` uses only ``{style}`` and ``{name}`` (and has ``style`` if needed)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ChronoEditError(f"--prompt-template: {exc}; write {{{{ and }}}} for literal braces.") from None
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise ChronoEditError(f"--prompt-template: unknown placeholder(s) {', '.join(f'{{{n}}}' for n in sorted(unknown))}; "
                              "use {style} and {name}, and write {{ and }} for literal braces.")
    if "style" in fields and not style:
        raise ChronoEditError("--prompt-template uses {style}: give --style NAME.")


def read_prompt_file(source: Path, pair: SourcePair) -> str | None:
    """The pair's prompt from ``NAME.txt`` / ``NAME_prompt.txt`` (source folder or beside either image), if any.

    Raises ChronoEditError for a file that is empty, not UTF-8, or contradicted by another one.
    """
    folders = dict.fromkeys((source, pair.before.parent, pair.after.parent))
    texts: dict[str, Path] = {}
    for path in (folder / pattern.format(name=pair.name) for folder in folders for pattern in PROMPT_FILES):
        if not path.is_file():
            continue
        try:
            text = clean_prompt(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            raise ChronoEditError(f"{path}: not UTF-8 text; re-save it as UTF-8.") from None
        if not text:
            raise ChronoEditError(f"{path}: empty prompt file; write the instruction or delete the file.")
        texts.setdefault(text, path)
    if len(texts) > 1:
        raise ChronoEditError(f"prompt files for {pair.name} disagree: {', '.join(map(str, texts.values()))}; keep one.")
    return next(iter(texts), None)


def prepare(source: Path, csv_path: Path, prompt: str | None = None, template: str | None = None,
            style: str | None = None, captioner: Captioner | None = None, progress: bool = False) -> Prepared:
    """The rows of ``csv_path`` for the pairs in ``source`` (nothing is written).

    Raises ChronoEditError on bad options, when no pair is found or none is readable, and when a
    pair would have no prompt (checked before any image is decoded or captioned).
    """
    if prompt is not None and template is not None:
        raise ChronoEditError("give --prompt or --prompt-template, not both.")
    if any(fixed is not None and not clean_prompt(fixed) for fixed in (prompt, template)):
        raise ChronoEditError("--prompt / --prompt-template is empty.")
    if style and template is None:
        raise ChronoEditError("--style only fills {style} in --prompt-template; give a template too.")
    if template is not None:
        check_template(template, style)
    scan = find_pairs(source)
    if not scan.pairs:
        raise ChronoEditError(_with_lines(f"{source}: no pairs found. Expected before/ + after/ folders, NAME_before / "
                                          "NAME_after images, or 2-frame MP4s.", scan.skipped))
    texts = {pair: read_prompt_file(source, pair) for pair in scan.pairs}
    no_prompt = [pair.name for pair, text in texts.items() if text is None]
    if no_prompt and captioner is None and prompt is None and template is None:
        raise ChronoEditError(f"no prompt for {len(no_prompt)} pair(s) ({', '.join(no_prompt[:5])}): give --prompt, "
                              "--prompt-template, per-pair .txt files or --captioner.")
    result = Prepared([], scan.skipped, scan.layout)
    fixed_origin = "--prompt" if template is None else "--prompt-template"
    for pair in tqdm(scan.pairs, desc="pairs", disable=not progress or len(scan.pairs) < 20):
        images = _load(pair)
        fatal = [p for p in images.problems if p.fatal]
        if fatal:
            result.skipped += [f"{_label(source, pair, p.column)}: {p.reason}" for p in fatal]
            continue
        fixed = _fixed_prompt(prompt, template, style, pair.name)
        text, origin = _prompt(pair, images, texts[pair], fixed, captioner)
        if not text:
            result.skipped.append(f"{pair.name}: the captioner returned an empty prompt and there is no fixed prompt")
            continue
        result.prompt_sources[fixed_origin if origin == "fixed" else origin] += 1
        result.rows.append(_row(pair, text, csv_path))
    if not result.rows:
        raise ChronoEditError(_with_lines(f"{source}: none of the {len(scan.pairs)} pairs is usable.", result.skipped))
    return result


def _load(pair: SourcePair) -> PairImages:
    """Both images decoded (a video's frames 0 and 1), with problems instead of exceptions."""
    frames = (0, 1) if pair.is_video else (None, None)
    return load_pair(EditPair(pair.before, pair.after, "", 0, *frames))


def _label(source: Path, pair: SourcePair, column: str | None) -> str:
    path = pair.after if column == "edited_image" else pair.before
    return path.relative_to(source).as_posix() if path.is_relative_to(source) else str(path)


def _fixed_prompt(prompt: str | None, template: str | None, style: str | None, name: str) -> str | None:
    """``prompt``, or ``template`` filled in for pair ``name``; None if neither is given."""
    if template is not None:
        return clean_prompt(template.format(style=style, name=name))
    return clean_prompt(prompt) if prompt is not None else None


def _prompt(pair: SourcePair, images: PairImages, text: str | None, fixed: str | None,
            captioner: Captioner | None) -> tuple[str | None, str]:
    """(prompt, origin): the text file's, else the captioner's (hinted with ``fixed``), else ``fixed``."""
    if text is not None:
        return text, ".txt files"
    if captioner is not None:
        caption = captioner(images.source, images.edited, fixed)
        if not isinstance(caption, str):
            raise ChronoEditError(f"the captioner returned {type(caption).__name__} for {pair.name}; it must return str.")
        if clean_prompt(caption):
            return clean_prompt(caption), "captioner"
    return fixed, "fixed"


def _row(pair: SourcePair, text: str, csv_path: Path) -> dict[str, str]:
    if pair.is_video:
        return dict(zip(VIDEO_COLUMNS, (_relative(pair.before, csv_path), text)))
    return dict(zip(IMAGE_COLUMNS, (_relative(pair.before, csv_path), _relative(pair.after, csv_path), text)))


def _relative(path: Path, csv_path: Path) -> str:
    """``path`` relative to the CSV's folder, with ``/`` (symlinks are kept, not resolved)."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(csv_path.parent)).replace(os.sep, "/")


def _with_lines(message: str, lines: list[str]) -> str:
    return "\n".join([message, *(f"  {line}" for line in lines)])


def resolve_output(source: Path, output: str | Path | None) -> Path:
    """The CSV to write: ``output`` if it names a .csv file, ``output/metadata.csv`` for a folder,
    ``source/metadata.csv`` by default."""
    path = Path(output) if output is not None else source
    return path if path.suffix.lower() == ".csv" and not path.is_dir() else path / "metadata.csv"


def ensure_writable(csv_path: Path, overwrite: bool) -> None:
    """Raise ChronoEditError if ``csv_path`` exists and ``overwrite`` is False."""
    if csv_path.exists() and not overwrite:
        raise ChronoEditError(f"{csv_path} exists; pass --overwrite to replace it.")


def write_metadata(rows: list[dict[str, str]], csv_path: Path, overwrite: bool = False) -> None:
    """Write the CSV atomically (a temporary file renamed over it); refuse to replace one unless ``overwrite``."""
    if not rows:
        raise ChronoEditError("no rows to write.")
    ensure_writable(csv_path, overwrite)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as file:
            writer = csv.DictWriter(file, list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, csv_path)
    finally:
        tmp.unlink(missing_ok=True)
