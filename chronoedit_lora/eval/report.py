"""What an evaluation writes and prints: ``metrics.csv`` (one row per checkpoint), ``judge.csv``
(the judge's scores and reasons per edit), the best checkpoint per metric, the overall pick with
its rule, and the Markdown table of the model card."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..files import write_text
from .checkpoints import BASE, Checkpoint
from .judge import Judgement
from .metrics import METRICS, NEUTRAL, PICK_METRICS, QUANTILES, better, quantile_column

Table = dict[str, dict[str, float | None]]  # checkpoint label -> metric -> value
# metric columns of the model card's table (the per-quantile losses stay in metrics.csv)
CARD_METRICS = ("loss", "psnr", "ssim", "lpips", "clip_image", "clip_text_direction", "dino", "source_ssim",
                "judge_overall")
QUANTILE_COLUMNS = {quantile_column(q) for q in QUANTILES}
PICK_RULE = ("the LoRA checkpoint (base excluded) with the best mean rank over the measured metrics among "
             f"{', '.join(PICK_METRICS)} (rank 1 = best on that metric; a tie goes to the earlier checkpoint)")


def measured(table: Table) -> list[str]:
    """The metric columns with at least one value, in :data:`METRICS` order."""
    return [m for m in METRICS if any(row.get(m) is not None for row in table.values())]


def metrics_csv(checkpoints: list[Checkpoint], table: Table) -> str:
    """``checkpoint,step,<metric columns>``: one row per checkpoint; step empty for the base and
    for files without one; values to 6 significant digits, empty where not measured."""
    columns = measured(table)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["checkpoint", "step", *columns])
    for checkpoint in checkpoints:
        row = table[checkpoint.label]
        writer.writerow([checkpoint.label, "" if checkpoint.step is None else checkpoint.step,
                         *("" if row.get(m) is None else f"{row[m]:.6g}" for m in columns)])
    return buffer.getvalue()


def read_metrics_csv(path: Path) -> tuple[list[Checkpoint], Table]:
    """The checkpoints and table of a ``metrics.csv`` (paths are not stored: None)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    checkpoints = [Checkpoint(r["checkpoint"], None, int(r["step"]) if r["step"] else None) for r in rows]
    table = {r["checkpoint"]: {k: float(v) for k, v in r.items() if k not in ("checkpoint", "step") and v != ""}
             for r in rows}
    return checkpoints, table


def judge_csv(checkpoints: list[Checkpoint], rows: list[int], judgements: dict[str, list[Judgement]]) -> str:
    """One line per judged edit: checkpoint, dataset row, both scores (empty if unparsed) and reasons."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["checkpoint", "row", "instruction", "quality", "overall", "instruction_reason", "quality_reason"])
    for checkpoint in checkpoints:
        for row, verdict in zip(rows, judgements.get(checkpoint.label, [])):
            writer.writerow([checkpoint.label, row, *("" if v is None else f"{v:g}" for v in
                             (verdict.instruction.score, verdict.quality.score, verdict.overall)),
                             verdict.instruction.reason, verdict.quality.reason])
    return buffer.getvalue()


def best_per_metric(checkpoints: list[Checkpoint], table: Table) -> dict[str, str]:
    """For every ranked metric, the label of the checkpoint (base included) with the best value
    (the earlier one on a tie)."""
    best = {}
    for metric in measured(table):
        if METRICS[metric][0] == NEUTRAL:
            continue
        for checkpoint in checkpoints:
            value = table[checkpoint.label].get(metric)
            if value is not None and (metric not in best or better(metric, value, table[best[metric]][metric])):
                best[metric] = checkpoint.label
    return best


def overall_pick(checkpoints: list[Checkpoint], table: Table) -> tuple[str, float, list[str]] | None:
    """(label, mean rank, metrics used) by :data:`PICK_RULE`; None without a LoRA or a metric."""
    candidates = [c.label for c in checkpoints if c.label != BASE]
    used = [m for m in PICK_METRICS if all(table[c].get(m) is not None for c in candidates)]
    if not candidates or not used:
        return None
    ranks = {label: 0.0 for label in candidates}
    for metric in used:
        for label in candidates:  # rank = 1 + the number of checkpoints strictly better
            ranks[label] += 1 + sum(better(metric, table[o][metric], table[label][metric]) for o in candidates)
    label = min(candidates, key=lambda c: ranks[c])  # min keeps the first of equal ranks
    return label, ranks[label] / len(used), used


def summary(checkpoints: list[Checkpoint], table: Table, targets_source_ssim: float | None = None) -> str:
    """The printed summary: each metric's best checkpoint beside the base's value, then the overall pick."""
    best = best_per_metric(checkpoints, table)
    lines = ["best checkpoint per metric (base included; the per-quantile losses are in metrics.csv):"]
    for metric, label in best.items():
        if metric in QUANTILE_COLUMNS:
            continue
        base = table.get(BASE, {}).get(metric)
        lines.append(f"  {metric:<20} {label:<14} {table[label][metric]:.4g}"
                     + (f"   (base {base:.4g}; {METRICS[metric][0]} is better)" if base is not None else ""))
    if "source_ssim" in measured(table):
        kept = ", ".join(f"{c.label} {table[c.label]['source_ssim']:.3f}" for c in checkpoints
                         if table[c.label].get("source_ssim") is not None)
        reference = f"; the targets themselves: {targets_source_ssim:.3f}" if targets_source_ssim is not None else ""
        lines.append(f"input kept (SSIM of the edit to the input){reference}: {kept}")
    pick = overall_pick(checkpoints, table)
    if pick:
        label, rank, used = pick
        lines.append(f"overall pick: {label} (mean rank {rank:.2g} over {', '.join(used)})")
        lines.append(f"  rule: {PICK_RULE}")
    return "\n".join(lines)


def markdown_table(checkpoints: list[Checkpoint], table: Table) -> str:
    """The model card's table (:data:`CARD_METRICS` that were measured; the best value per column in bold)."""
    columns = [m for m in CARD_METRICS if m in measured(table)]
    best = best_per_metric(checkpoints, table)
    lines = ["| checkpoint | step | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for checkpoint in checkpoints:
        row = table[checkpoint.label]
        cells = [("" if row.get(m) is None else (f"**{row[m]:.4g}**" if best.get(m) == checkpoint.label else f"{row[m]:.4g}"))
                 for m in columns]
        lines.append(f"| {checkpoint.label} | {'' if checkpoint.step is None else checkpoint.step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(folder: Path, checkpoints: list[Checkpoint], table: Table, rows: list[int],
                 judgements: dict[str, list[Judgement]]) -> list[Path]:
    """``metrics.csv``, and ``judge.csv`` if the judge ran, into ``folder`` (atomically); returns what was written."""
    write_text(folder / "metrics.csv", metrics_csv(checkpoints, table))
    if judgements:
        write_text(folder / "judge.csv", judge_csv(checkpoints, rows, judgements))
    return [folder / "metrics.csv"] + ([folder / "judge.csv"] if judgements else [])


# every file an evaluation writes into its folder: one evaluation's set, never mixed with an earlier one's
OUTPUTS = ("metrics.csv", "judge.csv", "metrics.png", "grid.png")


def remove_earlier(folder: Path, written: list[Path]) -> None:
    """Remove the files of :data:`OUTPUTS` in ``folder`` that this evaluation did not write (an
    earlier one's ``grid.png`` beside a ``--loss-only`` run's ``metrics.csv``, say)."""
    kept = {path.name for path in written}
    for name in OUTPUTS:
        if name not in kept:
            (folder / name).unlink(missing_ok=True)
