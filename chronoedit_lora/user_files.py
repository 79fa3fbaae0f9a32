"""Reading the files users hand the kit with bounded memory, whatever they hold.

Configs, JSON files (indexes, model and scheduler configs) and prompt files are small by nature:
they are read only up to a cap, and a larger file is refused naming its size, before it is read
whole. CSVs (datasets, batch edits) are read line by line with a cap per line, so a malformed file
made of one multi-GB line costs a line's cap, not the file's size.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from .errors import ChronoEditError

SMALL_FILE_BYTES = 1 << 20  # a config, a scheduler or model config.json, a prompt file
INDEX_FILE_BYTES = 64 << 20  # a shard index JSON (ChronoEdit-14B's is about 100 KB)
CSV_LINE_BYTES = 1 << 20  # one line of a CSV (a detailed prompt is under 1 KB)
CSV_DELIMITERS = (",", ";", "\t")


def not_regular(path: str | Path) -> str | None:
    """What ``path`` is if it exists but is no regular file ("a FIFO", "a folder", ...), else None.
    Opening a FIFO would wait for a writer forever, so this is asked before anything is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return None if stat.S_ISREG(mode) else next((kind for test, kind in kinds if test(mode)), "not a regular file")


def check_regular(path: str | Path) -> None:
    """Refuse a path that exists but is no regular file, naming what it is."""
    kind = not_regular(path)
    if kind:
        raise ChronoEditError(f"{path} is not a regular file but {kind}; give the path of a file.")


def read_bytes(path: str | Path, limit: int = SMALL_FILE_BYTES) -> bytes:
    """The bytes of ``path``, refusing (before reading it whole) a file larger than ``limit``."""
    check_regular(path)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ChronoEditError(f"{path} is larger than {limit // 1024} KiB ({Path(path).stat().st_size} bytes), "
                              "far more than such a file holds; check that it is the right file.")
    return data


def read_text(path: str | Path, limit: int = SMALL_FILE_BYTES) -> str:
    """:func:`read_bytes` as UTF-8 text (a BOM dropped); undecodable bytes name the file."""
    try:
        return read_bytes(path, limit).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ChronoEditError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None


def read_json(path: str | Path, limit: int = SMALL_FILE_BYTES) -> object:
    """The JSON value in ``path`` (read with :func:`read_text`); invalid JSON names the file."""
    try:
        return json.loads(read_text(path, limit))
    except json.JSONDecodeError as exc:
        raise ChronoEditError(f"{path} is not valid JSON ({exc}).") from None


class LineTooLong(ValueError):
    """A CSV line over :data:`CSV_LINE_BYTES`."""


def _lines(path: Path, limit: int) -> Iterator[str]:
    """The file's lines (line ends kept, undecodable bytes as surrogates, a BOM dropped), each at most ``limit`` bytes."""
    with open(path, "rb") as f:
        first = True
        while line := f.readline(limit + 1):
            if len(line) > limit and not line.endswith(b"\n"):
                raise LineTooLong(f"a line longer than {limit // 1024} KiB")
            text = line.decode("utf-8", errors="surrogateescape")
            yield text.removeprefix("\ufeff") if first else text
            first = False


def read_csv(path: str | Path, line_limit: int = CSV_LINE_BYTES) -> tuple[list[list[str]], str | None]:
    """Every record of a CSV (blank lines as ``[]``, so record ``i`` is spreadsheet row ``i + 1``)
    and, if reading stopped early, why: a syntax error or an over-long line at row ``len(records) + 1``,
    after which nothing more was read. The delimiter is the first of ``, ; tab`` on the first line.
    Bytes that are not UTF-8 stay in the fields as lone surrogates, for the caller to report per row."""
    lines = _lines(Path(path), line_limit)
    records: list[list[str]] = []
    try:
        first = next(lines, "")
        delimiter = next((d for d in CSV_DELIMITERS if d in first), ",")
        for fields in csv.reader(_chain(first, lines), delimiter=delimiter, strict=True):
            records.append(fields)
    except LineTooLong as exc:
        return records, f"{exc}; this row and the rest of the file were not read"
    except csv.Error as exc:
        return records, f"CSV syntax error: {exc}; this row and the rest of the file were not read"
    return records, None


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    if first:
        yield first
    yield from rest


def text_problem(text: str) -> str | None:
    """Why a CSV cell holding ``text`` would be refused (a NUL byte, another control character than a
    tab or line end, more than a CSV line's cap), else None: the rule prompts read and written share."""
    if "\0" in text:
        return "holds a NUL byte"
    control = next((ch for ch in text if ch not in "\t\n\r" and unicodedata.category(ch) == "Cc"), None)
    if control is not None:
        return f"holds the control character U+{ord(control):04X}"
    size = len(text.encode("utf-8", errors="surrogateescape"))
    if size > CSV_LINE_BYTES:
        return f"is {size // 1024} KiB, over a CSV line's {CSV_LINE_BYTES // 1024} KiB"
    return None


def not_utf8(value: str) -> bytes | None:
    """The raw bytes of a field read by :func:`read_csv` if some were not UTF-8, else None."""
    if any("\udc80" <= ch <= "\udcff" for ch in value):
        return value.encode("utf-8", errors="surrogateescape")
    return None
