"""Read ``metadata.csv``: edit pairs and trajectories plus every problem found in the file, in one pass.

Two pair layouts are accepted (column names are matched case-insensitively):

* ``input_image,edited_image,prompt`` - two image files per row;
* ``video,prompt`` - the original ChronoEdit repository's layout: a 2-frame MP4 per row,
  frame 0 the source and frame 1 the edited image.

Either may add a ``trajectory`` column, and ``trajectory,prompt`` alone is a third layout: a row
whose ``trajectory`` cell is filled is a trajectory (a video, or a folder of numbered frames,
whose first frame is the input and last frame the edit; see :mod:`.trajectories`) and leaves the
pair columns empty; a row whose ``trajectory`` cell is empty is a pair.

The prompt trained on is a row's ``caption_cot`` (the detailed prompt ``dataset prepare --captioner``
writes, beside its concise ``caption``) if that cell is filled, else its ``prompt``; ``prompt_column``
names one column to use instead (e.g. ``caption``).

Paths are relative to the CSV's folder and must stay inside it, symlinks resolved (a link to a
file outside is refused like ``../``), unless ``allow_outside``. The file may start with a UTF-8
BOM, use CRLF line ends, and quote prompts that contain commas, quotes or newlines.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from ..errors import listing
from ..files import inside
from ..user_files import not_regular, not_utf8, read_csv, text_problem
from .problems import Problem, has_fatal

IMAGE_COLUMNS = ("input_image", "edited_image", "prompt")
VIDEO_COLUMNS = ("video", "prompt")
TRAJECTORY = "trajectory"  # the optional column, and the kind of its rows
TRAJECTORY_COLUMNS = (TRAJECTORY, "prompt")
PROMPT_COLUMNS = ("caption_cot", "prompt")  # trained on by default: a row's first filled one
TEXT_COLUMNS = ("prompt", "caption", "caption_cot")  # accepted without a warning when not trained on
PAIR = "pair"
CSV_FIX = ('Check the quotes (a value that starts with " must end with ", and a " inside it is written ""), and '
           "that this is the dataset's CSV: one row per line, two paths and a prompt.")


@dataclass(frozen=True)
class EditPair:
    """One training row. For the ``video,prompt`` layout both paths name the same MP4 and the
    frame fields say which frame is which (0 = source, 1 = edited); for a trajectory row both
    paths name its video or frame folder and ``kind`` is ``"trajectory"``; for an identity pair
    (:mod:`.identity`) both paths name the one image."""

    input_image: Path
    edited_image: Path
    prompt: str
    row: int | None  # None: an image of a folder (:mod:`.identity`), not a CSV row
    input_frame: int | None = None
    edited_frame: int | None = None
    kind: str = PAIR

    @property
    def is_video(self) -> bool:
        """True for a ``video,prompt`` row (both images are frames of one MP4)."""
        return self.input_frame is not None

    @property
    def is_trajectory(self) -> bool:
        """True for a trajectory row (its first frame the source, its last the edit)."""
        return self.kind == TRAJECTORY

    @property
    def columns(self) -> tuple[str, str]:
        """CSV column names of the source and edited image, for problem reports."""
        if self.is_trajectory:
            return TRAJECTORY, TRAJECTORY
        return ("video", "video") if self.is_video else ("input_image", "edited_image")


def clean_prompt(text: str) -> str:
    """The prompt as trained on: line ends normalised to ``\\n``, outer whitespace stripped."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def read_metadata(csv_path: str | Path, allow_outside: bool = False,
                  prompt_column: str = "") -> tuple[list[EditPair], list[Problem]]:
    """Parse ``csv_path`` into edit pairs and the problems found (prompts from ``prompt_column``, or
    by default each row's first filled :data:`PROMPT_COLUMNS` cell).

    Every row whose files were found yields a pair, even if it has another fatal problem (an
    empty prompt, say), so that its files can be checked too: the dataset is usable only if
    ``has_fatal(problems)`` is False. Absolute paths and paths leading out of the CSV's folder
    (through ``..`` or a symlink) are fatal unless ``allow_outside``. Files are checked for
    existence here, their content by :mod:`.images`.
    """
    csv_path = Path(os.path.abspath(csv_path))
    if kind := not_regular(csv_path):
        return [], [Problem(None, None, f"{csv_path} is not a regular file but {kind}.", "Pass the path of your metadata.csv.")]
    if not csv_path.is_file():
        return [], [Problem(None, None, f"{csv_path} not found.", "Pass the path of your metadata.csv.")]
    with csv_path.open("rb") as f:
        if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            return [], [Problem(None, None, "The CSV is saved as UTF-16.", "Save it as 'CSV UTF-8 (comma delimited)'.")]
    records, stopped = read_csv(csv_path)
    problems: list[Problem] = []
    if stopped:
        problems.append(Problem(len(records) + 1, None, f"{stopped[0].upper()}{stopped[1:]}.", CSV_FIX))
    if not records:
        problems.append(Problem(None, None, "The CSV is empty.",
                                "Write a header line (input_image,edited_image,prompt) and one row per pair."))
        return [], problems
    header = [name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for name in records[0]]
    columns, prompt_columns, header_problems = _match_header(header, prompt_column)
    problems += header_problems
    reader = _RowReader(csv_path.parent, columns, prompt_columns, len(header), allow_outside, problems)
    pairs = [pair for row, fields in enumerate(records[1:], start=2) if (pair := reader.read(row, fields))]
    if not pairs and not has_fatal(problems):
        problems.append(Problem(None, None, "The CSV has a header but no pairs.", "Add one row per edit pair."))
    return pairs, problems


def _match_header(header: list[str], prompt_column: str = "") -> tuple[dict[str, int], tuple[str, ...], list[Problem]]:
    """Map each expected column to its field index; report missing, misspelled and extra columns.
    Also returns the prompt columns to read, in order of preference.

    A misspelled column is reported as fatal but still used, so that row problems are found too.
    """
    names = [name.strip().lower() for name in header]
    prompts = ((prompt_column.strip().lower(),) if prompt_column.strip()
               else tuple(c for c in PROMPT_COLUMNS if c in names) or ("prompt",))
    layout = tuple(c for c in _guess_layout(names) if c != "prompt") + prompts
    problems: list[Problem] = []
    header_text = ",".join(layout) + ("" if TRAJECTORY in layout else f" (plus {TRAJECTORY}, for trajectory rows)")
    columns: dict[str, int] = {}
    unknown: list[int] = []
    for index, name in enumerate(names):
        if name in columns:
            problems.append(Problem(1, name, f"Column '{name}' appears twice.", "Remove or rename one of them."))
        elif name in layout:
            columns[name] = index
        elif name not in TEXT_COLUMNS:
            unknown.append(index)
    for index in unknown:
        name = header[index].strip()
        missing = [c for c in layout if c not in columns]
        if name.lower() in IMAGE_COLUMNS + VIDEO_COLUMNS + TRAJECTORY_COLUMNS:
            problems.append(Problem(1, name, f"Column '{name}' belongs to the other layout; this header mixes "
                                    "video,prompt with input_image,edited_image,prompt.",
                                    "Keep one layout: a 'video' column, or 'input_image' and 'edited_image' columns."))
            continue
        optional = [TRAJECTORY] if TRAJECTORY not in columns else []
        close = difflib.get_close_matches(name.lower(), missing + optional, n=1)
        if close:
            columns[close[0]] = index
            problems.append(Problem(1, name, f"Unknown column '{name}'; did you mean '{close[0]}'?",
                                    f"Rename the header '{name}' to '{close[0]}'."))
        elif name:
            similar = difflib.get_close_matches(name.lower(), layout, n=1)
            hint = f" (or rename it to '{similar[0]}' if that is what it holds)" if similar else ""
            problems.append(Problem(1, name, f"Column '{name}' is not used and will be ignored.",
                                    f"Remove the column{hint}; expected columns: {header_text}.", fatal=False))
    for column in layout:
        if column not in columns:
            problems.append(Problem(1, column, f"Missing column '{column}'.",
                                    f"Add a '{column}' column; the header must be: {header_text}."))
    return columns, prompts, problems


def _guess_layout(names: list[str]) -> tuple[str, ...]:
    """The pair layout whose path columns the header resembles most (the image layout on a tie),
    with the ``trajectory`` column if there is one; ``trajectory,prompt`` if it has only that."""
    def score(expected: tuple[str, ...]) -> int:
        paths = [c for c in expected if c != "prompt"]
        return sum(bool(difflib.get_close_matches(name, paths, n=1)) for name in names if name != TRAJECTORY)

    pairs = VIDEO_COLUMNS if score(VIDEO_COLUMNS) > score(IMAGE_COLUMNS) else IMAGE_COLUMNS
    if TRAJECTORY not in names:
        return pairs
    return pairs[:-1] + TRAJECTORY_COLUMNS if score(pairs) else TRAJECTORY_COLUMNS


class _RowReader:
    """Turns one CSV record into an :class:`EditPair`, appending problems to a shared list."""

    def __init__(self, root: Path, columns: dict[str, int], prompt_columns: tuple[str, ...], header_width: int,
                 allow_outside: bool, problems: list[Problem]):
        self.root = Path(os.path.normpath(root))
        self.columns = columns
        self.prompt_columns = tuple(c for c in prompt_columns if c in columns)
        self.header_width = header_width
        self.is_video = "video" in columns
        self.path_columns = ("video",) if self.is_video else ("input_image", "edited_image")
        if "input_image" not in columns and "edited_image" not in columns and not self.is_video:
            self.path_columns = ()  # the trajectory,prompt layout
        self.allow_outside = allow_outside
        self.problems = problems
        self.seen: dict[tuple, int] = {}
        self.listings: dict[Path, list[str]] = {}

    def read(self, row: int, fields: list[str]) -> EditPair | None:
        """The pair of one record, or None for a blank line or a row whose files cannot be located."""
        if not any(field.strip() for field in fields):
            return None
        if any(field.strip() for field in fields[self.header_width:]):
            self._add(row, None, f"The row has {len(fields)} values but the header has {self.header_width} columns.",
                      'Put values that contain commas in double quotes, e.g. "make it red, then blue".')
            return None
        values = {c: fields[i] if i < len(fields) else "" for c, i in self.columns.items()}
        values = {c: v for c, v in values.items() if self._is_utf8(row, c, v)}
        prompt = next((text for c in self.prompt_columns if (text := clean_prompt(values.get(c, "")))), "")
        if self.prompt_columns and not prompt and all(c in values for c in self.prompt_columns):
            self._add(row, "/".join(self.prompt_columns), "Empty prompt.", "Write the edit instruction for this pair.")
        if problem := text_problem(prompt):
            self._add(row, "/".join(self.prompt_columns), f"The prompt {problem}.",
                      "Write the prompt as plain text (tabs and line breaks are fine).")
        if values.get(TRAJECTORY, "").strip() or not self.path_columns:
            return self._trajectory(row, values, prompt)
        paths = [self._path(row, c, values[c]) for c in self.path_columns if c in values]
        if None in paths or len(paths) != len(self.path_columns):
            return None
        if self.is_video:
            pair = EditPair(paths[0], paths[0], prompt, row, input_frame=0, edited_frame=1)
        else:
            pair = EditPair(paths[0], paths[1], prompt, row)
            if paths[0] == paths[1]:
                self._add(row, "edited_image", "The input and edited image are the same file.",
                          "Point edited_image at the edited version.", fatal=False)
        return self._unique(pair)

    def _trajectory(self, row: int, values: dict[str, str], prompt: str) -> EditPair | None:
        """A trajectory row: its video or frame folder, and no pair columns filled beside it."""
        filled = [c for c in self.path_columns if values.get(c, "").strip()]
        if filled:
            self._add(row, filled[0], f"The row fills both '{TRAJECTORY}' and '{filled[0]}'.",
                      f"Give either a trajectory or a pair per row: empty the {'/'.join(self.path_columns)} "
                      f"cell(s), or the {TRAJECTORY} cell.")
            return None
        if TRAJECTORY not in values:  # undecodable cell, already reported
            return None
        path = self._path(row, TRAJECTORY, values[TRAJECTORY], folder_ok=True)
        if path is None or (path.is_dir() and not self._frames_usable(row, path)):
            return None
        return self._unique(EditPair(path, path, prompt, row, kind=TRAJECTORY))

    def _frames_usable(self, row: int, folder: Path) -> bool:
        """A frame folder's frames must be numbered (their order is their names') and, like every file
        the kit reads, lead into the dataset folder (symlinks resolved) unless ``allow_outside``."""
        from .trajectories import frame_files, misnumbered_frames  # it imports .images, which imports this module

        files = frame_files(folder)
        misnumbered = misnumbered_frames(files)
        if misnumbered:
            self._add(row, TRAJECTORY, f"{folder.name}/: {listing('frame(s) not named by their number', misnumbered, 5)}; "
                      "the order of the frames is read from their names.",
                      "Rename the frames 00.png, 01.png, ... in the order they play (one prefix, the number last).")
        relative = [file.relative_to(self.root) if file.is_relative_to(self.root) else file for file in files]
        outside = [] if self.allow_outside else [f"{file.name} -> {file.resolve()}" for file, rel in zip(files, relative)
                                                  if not inside(rel, self.root)]
        if outside:
            self._add(row, TRAJECTORY, f"{folder.name}/: {listing('frame(s) leading outside the dataset folder', outside, 3)}.",
                      "Copy the frames into the dataset folder instead of linking to them, or set allow_outside.")
        return not misnumbered and not outside

    def _unique(self, pair: EditPair) -> EditPair:
        """``pair``, with a warning if an earlier row had the same files and prompt."""
        key = (pair.input_image, pair.edited_image, pair.prompt)
        if key in self.seen:
            self._add(pair.row, None, f"Duplicate of row {self.seen[key]} (same files and prompt).",
                      "Remove the duplicate, or keep it on purpose to weight this row twice.", fatal=False)
        else:
            self.seen[key] = pair.row
        return pair

    def _add(self, row: int, column: str | None, reason: str, fix: str, fatal: bool = True) -> None:
        self.problems.append(Problem(row, column, reason, fix, fatal))

    def _is_utf8(self, row: int, column: str, value: str) -> bool:
        """Undecodable bytes survive decoding as lone surrogates; report them with a likely reading."""
        raw = not_utf8(value)
        if raw is None:
            return True
        guess = raw.decode("cp1252", errors="replace").strip()
        self._add(row, column, f"Bytes that are not UTF-8 ({raw!r:.60}).",
                  f"Re-save the CSV as UTF-8 (as Windows-1252 this value reads {guess[:60]!r}).")
        return False

    def _path(self, row: int, column: str, value: str, folder_ok: bool = False) -> Path | None:
        """Resolve a path against the CSV's folder; report empty, absolute, escaping or missing ones
        (a folder is accepted if ``folder_ok``: a trajectory's frames)."""
        text = value.strip().replace("\\", "/")
        if not text:
            self._add(row, column, "Empty path.", f"Write the {column} file's path relative to the CSV's folder.")
            return None
        path = Path(text)
        absolute = path.is_absolute() or bool(PureWindowsPath(text).drive)
        full = path if absolute else Path(os.path.normpath(self.root / path))
        if not self.allow_outside and not inside(text, self.root):
            if absolute:
                kind, fix = "an absolute path", "Move the file into the CSV's folder and write its relative path"
            elif full.is_relative_to(self.root):  # only a symlink on the way leads out
                kind, fix = (f"a link to {full.resolve()}, outside the dataset folder",
                             "Copy the file into the CSV's folder instead of linking to it")
            else:
                kind, fix = "outside the dataset folder", "Move the file into the CSV's folder and write its relative path"
            self._add(row, column, f"'{value.strip()}' is {kind}; paths must lead into {self.root}.",
                      f"{fix}, or set allow_outside.")
            return None
        if folder_ok and full.is_dir():
            return full
        if not full.is_file():
            kind = not_regular(full)
            reason = f"is {kind}, not a file" if kind else "not found"
            self._add(row, column, f"'{value.strip()}' {reason} ({full}).", self._suggest(full))
            return None
        return full

    def _suggest(self, missing: Path) -> str:
        """A fix naming the closest existing file in the same folder, if any."""
        folder = missing.parent
        if folder not in self.listings:
            self.listings[folder] = sorted(os.listdir(folder)) if folder.is_dir() else []
        close = difflib.get_close_matches(missing.name, self.listings[folder], n=1)
        if close:
            return f"Did you mean '{close[0]}' in {folder}? Fix the path in the CSV."
        return "Fix the path (relative to the CSV's folder) or add the file."
