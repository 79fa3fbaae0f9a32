"""The Dataset tab: a dataset's pairs and trajectories with their prompts, and ``dataset check``'s
problems on the rows they concern."""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr
import pandas as pd

from ..data import check_dataset
from ..data.metadata import read_metadata
from ..data.problems import Problem
from .safety import listed, readable, user_errors
from .session import Session

SHOWN_PAIRS = 24  # image pairs shown as thumbnails
PROMPT_CHARS = 120  # prompts are cut to this in the table
COLUMNS = ["row", "kind", "problems", "source", "edited", "prompt"]


def problem_text(problem: Problem) -> str:
    return f"{'error' if problem.fatal else 'warning'}: {problem.reason} (fix: {problem.fix})"


def dataset_view(csv_path: Path) -> tuple[pd.DataFrame, str, list[tuple[str, str]]]:
    """The rows with their problems, the file-level problems and a summary, and thumbnails of the
    first image pairs (source, then edit)."""
    pairs, _ = read_metadata(csv_path)
    problems = check_dataset(csv_path)
    by_row: dict[int, list[str]] = {}
    for problem in problems:
        if problem.row is not None:
            by_row.setdefault(problem.row, []).append(problem_text(problem))
    folder = csv_path.parent
    rows = [{"row": pair.row, "kind": pair.kind, "source": os.path.relpath(pair.input_image, folder),
             "edited": "" if pair.edited_image == pair.input_image else os.path.relpath(pair.edited_image, folder),
             "prompt": pair.prompt[:PROMPT_CHARS] + ("…" if len(pair.prompt) > PROMPT_CHARS else ""),
             "problems": "; ".join(by_row.pop(pair.row, []))} for pair in pairs]
    rows += [{"row": row, "kind": "", "source": "", "edited": "", "prompt": "", "problems": "; ".join(texts)}
             for row, texts in by_row.items()]  # rows that yielded no pair
    errors = sum(p.fatal for p in problems)
    summary = [f"**{len(rows)} rows**, {errors} error(s), {len(problems) - errors} warning(s)"]
    summary += [f"- file: {problem_text(p)}" for p in problems if p.row is None]
    image_pairs = [pair for pair in pairs if not (pair.is_video or pair.is_trajectory)][:SHOWN_PAIRS]
    thumbnails = [(str(path), f"row {pair.row}: {label}") for pair in image_pairs
                  for path, label in ((pair.input_image, "source"), (pair.edited_image, pair.prompt[:50]))]
    table = pd.DataFrame(rows, columns=COLUMNS).sort_values("row")
    return table, "\n".join(summary), thumbnails


def dataset_csvs(root: Path | None) -> list[str]:
    """The CSVs under ``root`` (none without it), links that lead out of it left out."""
    return sorted(str(p) for p in listed(root.rglob("*.csv"), [root])) if root else []


def build(session: Session) -> None:
    root = session.folders.datasets
    choices = dataset_csvs(root)
    with gr.Row():
        csv = gr.Dropdown(choices, value=None, label=f"dataset CSV (under {root or 'no --datasets given'})",
                          elem_id="dataset-csv", scale=4)
        check = gr.Button("Check again", scale=1)
    summary = gr.Markdown(elem_id="dataset-summary")
    table = gr.Dataframe(label="rows (problems from dataset check)", wrap=True, interactive=False,
                         elem_id="dataset-table", max_height=420,
                         column_widths=["6%", "8%", "32%", "12%", "12%", "30%"])
    thumbnails = gr.Gallery(label="image pairs: source, edit", columns=8, height=220, elem_id="dataset-pairs",
                            object_fit="contain")

    @user_errors
    def show(path: str | None):
        if not path:
            return None, "", []
        return dataset_view(readable(path, [root], "dataset"))

    csv.change(show, csv, [table, summary, thumbnails])
    check.click(show, csv, [table, summary, thumbnails])
