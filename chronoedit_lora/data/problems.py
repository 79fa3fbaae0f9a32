"""Dataset problems: one record per finding, collected rather than raised, and their report."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One finding about a dataset.

    ``row`` is the CSV row as a spreadsheet shows it (the header is row 1, the first pair row 2);
    None for file-level findings. ``fatal`` problems stop training; the rest are warnings or notes
    about what the kit did (e.g. a mode conversion).
    """

    row: int | None
    column: str | None
    reason: str
    fix: str
    fatal: bool = True


def has_fatal(problems: Iterable[Problem]) -> bool:
    """True if any problem stops training."""
    return any(p.fatal for p in problems)


def format_report(problems: Iterable[Problem]) -> str:
    """Human-readable report: one entry per problem (row, column, reason, fix), errors first by row, then a count."""
    problems = sorted(problems, key=lambda p: (not p.fatal, p.row or 0))  # stable: keeps column order
    if not problems:
        return "No problems found."
    lines = []
    for p in problems:
        where = ", ".join(part for part in (
            f"row {p.row}" if p.row is not None else "file",
            f"column {p.column}" if p.column else "",
        ) if part)
        lines.append(f"{'error' if p.fatal else 'warning'} [{where}]: {p.reason}")
        lines.append(f"    fix: {p.fix}")
    errors = sum(p.fatal for p in problems)
    warnings = len(problems) - errors
    lines.append(f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}.")
    return "\n".join(lines)
