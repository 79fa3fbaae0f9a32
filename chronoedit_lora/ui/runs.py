"""The Runs tab: a run folder's logged metrics plotted live (``logs/metrics.csv``, and
``eval/metrics.csv`` when an evaluation wrote one), its sample grids, its checkpoints with their
metrics, and "use in Edit" for each checkpoint's LoRA.

Columns are read generically: every numeric column but the bookkeeping ones is a metric. A run's
files are read and shown only if they resolve inside its folder (a link to a file elsewhere is left
out, never served).
"""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr
import pandas as pd

from ..errors import ChronoEditError
from ..eval.checkpoints import BASE, FINAL, STEP_FILE, step_label
from ..models.loading import read_header
from ..train.state.checkpoint import CHECKPOINTS
from ..train.state.lora_export import FINAL_NAME
from .safety import listed, user_errors, within
from .session import Session

TRAINING_LOG = Path("logs") / "metrics.csv"
EVAL_LOG = Path("eval") / "metrics.csv"
BOOKKEEPING = ("step", "time", "samples", "checkpoint")
DEFAULT_METRICS = re.compile(r"^(loss|val_loss|eval[/:].*)$")
EVAL_PREFIX = "eval: "
REFRESH_SECONDS = 3.0


def list_runs(root: Path | None) -> list[tuple[str, str]]:
    """(label, folder) of every run under ``root`` (a folder with a training log, a LoRA or checkpoints)."""
    if root is None:
        return []
    marks = [*root.rglob(str(TRAINING_LOG)), *root.rglob(FINAL_NAME), *root.rglob(CHECKPOINTS)]
    folders = {mark.parent.parent if mark.name == TRAINING_LOG.name else mark.parent for mark in marks}
    folders = {folder for folder in folders if CHECKPOINTS not in folder.relative_to(root).parts}
    return sorted((str(folder.relative_to(root)) if folder != root else ".", str(folder)) for folder in folders)


def checkpoint_loras(run: Path) -> list[tuple[str, Path]]:
    """(label, file) of a run's LoRAs, oldest first: ``step-NNNNNN`` per checkpoint, ``final`` last
    (the labels an evaluation's ``eval/metrics.csv`` uses)."""
    found = sorted((step_label(int(m.group(1))), p) for p in run_files(run, "lora-step*.safetensors")
                   if (m := STEP_FILE.match(p.name)))
    return found + [(FINAL, path) for path in run_files(run, FINAL_NAME)]


def run_files(run: Path, pattern: str) -> list[Path]:
    """``run``'s files matching ``pattern``, sorted, without those that lead out of the run's folder."""
    return listed(sorted(path for path in run.glob(pattern) if path.is_file()), [run])


def lora_step(label: str, path: Path | None) -> int | None:
    """The step of a checkpoint LoRA: from its label, else from the trainer's header (``step``)."""
    if label.startswith("step-"):
        return int(label[5:])
    try:
        return int(read_header(path)[1]["step"]) if path is not None else None
    except (ChronoEditError, KeyError, ValueError):
        return None


def read_log(run: Path, name: Path) -> pd.DataFrame | None:
    """The run's metrics CSV ``name`` with its numeric columns as numbers (None if absent or empty)."""
    found = run_files(run, str(name))
    if not found:
        return None
    try:
        table = pd.read_csv(found[0])
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
    for column in table.columns:
        if column not in ("checkpoint", "samples"):
            table[column] = pd.to_numeric(table[column], errors="coerce")
    return table if len(table) else None


def metric_points(run: Path) -> pd.DataFrame:
    """Every logged metric value as (step, value, metric) rows: the training log's columns by
    name, the evaluation's prefixed with ``eval: ``."""
    parts = []
    for name, prefix in ((TRAINING_LOG, ""), (EVAL_LOG, EVAL_PREFIX)):
        table = read_log(run, name)
        if table is None or "step" not in table:
            continue
        for column in table.columns:
            if column in BOOKKEEPING or not pd.api.types.is_numeric_dtype(table[column]):
                continue
            values = table[["step", column]].dropna()
            if len(values):
                parts.append(pd.DataFrame({"step": values["step"].astype(int), "value": values[column].astype(float),
                                           "metric": prefix + column}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"step": [], "value": [], "metric": []})


def checkpoint_table(run: Path) -> pd.DataFrame:
    """One row per checkpoint LoRA: its label, step, the training loss logged at that step, and the
    evaluation's metrics for it (the row labelled ``base`` is the model without a LoRA)."""
    log, evaluation = read_log(run, TRAINING_LOG), read_log(run, EVAL_LOG)
    losses = dict(zip(log["step"], log["loss"])) if log is not None and "loss" in log else {}
    scores = {str(row["checkpoint"]): row for _, row in evaluation.iterrows()} \
        if evaluation is not None and "checkpoint" in evaluation else {}
    eval_columns = [c for c in (evaluation.columns if evaluation is not None else []) if c not in BOOKKEEPING]
    rows = []
    for label, path in [(BASE, None), *checkpoint_loras(run)]:
        if label == BASE and label not in scores:
            continue
        score = scores.get(label)
        step = int(score["step"]) if score is not None and pd.notna(score.get("step")) else lora_step(label, path)
        rows.append({"checkpoint": label, "step": step, "file": path.name if path else "(no LoRA)",
                     "training loss": losses.get(step),
                     **{EVAL_PREFIX + c: (score[c] if score is not None else None) for c in eval_columns}})
    return pd.DataFrame(rows)


def sample_grids(run: Path) -> list[tuple[str, str]]:
    return [(str(p), p.stem) for p in run_files(run, "samples/*.png")]


def build(session: Session, tabs: gr.Tabs, edit_lora: gr.Dropdown) -> None:
    runs_root = session.folders.runs
    with gr.Row():
        run = gr.Dropdown(list_runs(runs_root), value=None, label=f"run (under {runs_root or 'no --runs given'})",
                          elem_id="runs-run", scale=3)
        refresh = gr.Button("Refresh run list", size="sm", scale=1)
        live = gr.Checkbox(True, label=f"live (every {REFRESH_SECONDS:g} s)", scale=1)
    metrics = gr.CheckboxGroup([], label="metrics", elem_id="runs-metrics")
    plot = gr.LinePlot(x="step", y="value", color="metric", label="metrics per step", elem_id="runs-plot")
    table = gr.Dataframe(label="checkpoints", elem_id="runs-checkpoints", interactive=False)
    with gr.Row():
        checkpoint = gr.Dropdown([], label="checkpoint LoRA", elem_id="runs-lora", scale=3)
        use = gr.Button("Use in Edit", elem_id="runs-use", scale=1)
    newest = gr.Image(label="newest sample grid", type="filepath", interactive=False, elem_id="runs-newest-sample")
    grids = gr.Gallery(label="sample grids", columns=6, height=160, object_fit="contain", elem_id="runs-samples")
    timer = gr.Timer(REFRESH_SECONDS)

    @user_errors
    def show(folder: str | None, chosen: list[str] | None, new_run: bool):
        if not folder:
            return gr.CheckboxGroup(), None, None, gr.Dropdown(), None, []
        path = within(folder, [runs_root], "run")
        points = metric_points(path)
        names = list(dict.fromkeys(points["metric"]))
        selected = [m for m in names if DEFAULT_METRICS.match(m)] if new_run or chosen is None else chosen
        loras = checkpoint_loras(path)
        last_lora = {"value": str(loras[-1][1]) if loras else None} if new_run else {}
        samples = sample_grids(path)
        return (gr.CheckboxGroup(choices=names, value=selected), points[points["metric"].isin(selected)],
                checkpoint_table(path), gr.Dropdown(choices=[(label, str(p)) for label, p in loras], **last_lora),
                samples[-1][0] if samples else None, samples)

    # The plot takes its colours and legend from the data when one of its settings changes, not when
    # new data arrives: after a new run or selection has landed, setting colors_in_legend redraws it.
    # The live refresh sends the data alone (a setting every 3 s would redraw the plot every 3 s).
    def redraw(chosen: list[str] | None):
        return gr.LinePlot(colors_in_legend=chosen or [])

    outputs = [metrics, plot, table, checkpoint, newest, grids]
    run.change(lambda folder: show(folder, None, True), run, outputs).then(redraw, metrics, plot)
    metrics.input(lambda folder, chosen: show(folder, chosen, False), [run, metrics], outputs).then(redraw, metrics, plot)
    timer.tick(lambda folder, chosen, on: show(folder, chosen, False) if on and folder else [gr.skip()] * len(outputs),
               [run, metrics, live], outputs)
    refresh.click(lambda: gr.Dropdown(choices=list_runs(runs_root)), None, run)

    @user_errors
    def use_in_edit(path: str | None):
        if not path:
            raise gr.Error("choose a checkpoint LoRA first.")
        return gr.Tabs(selected="edit"), gr.Dropdown(choices=session.lora_choices(), value=path)

    use.click(use_in_edit, checkpoint, [tabs, edit_lora])
