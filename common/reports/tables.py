"""The report's tables and names: the savings table, the whole-run table, what the metric is and the title.

Fractions (accuracy, mAP, mAUC) are shown in percent, other scores (d') as they are, each with its difference to
the baseline in parentheses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml

from common.reports.compare import Row
from common.reports.runs import FRACTIONS, Run, distinct_names, run_kind

__all__ = ["markdown_table", "whole_run_table", "metric_name", "report_title", "shown"]

def shown(metric: str) -> float:
    """The factor a score is shown with: 100 for a fraction (in percent), 1 for another score (d' of 2.71 is not
    271 %)."""
    return 100.0 if metric in FRACTIONS else 1.0


def _percent(value: float, delta: float | None, metric: str) -> str:
    scale = shown(metric)
    text = f"{scale * value:.2f}"
    if delta is None:
        return text
    diff = f"{scale * delta:+.2f}"
    return f"{text} ({'=' if diff in ('+0.00', '-0.00') else diff})"


def markdown_table(rows: Sequence[Row], metric: str) -> str:
    """The rows as a Markdown table (fractions in percent, differences to the baseline in parentheses)."""
    lines = [f"| Setting | {metric} | FLOPs save (%) | Time save (%) | Best {metric} (no budget) |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        value = _percent(row.value, row.delta, metric)
        if row.delta is not None and row.stop is None:
            value += ", not surpassed"
        elif row.fixed and row.stop is not None:
            value += f", epoch {row.stop.epoch}"
        saves = ["-" if s is None else f"{s:.2f}" for s in (row.flops_save, row.time_save)]
        if row.hardware and row.stop is not None:
            saves[1] = "- (other devices)"
        label = f"{row.label} ({row.note})" if row.note else row.label
        lines.append(f"| {label} | {value} | {saves[0]} | {saves[1]} | {_percent(row.best, row.best_delta, metric)} |")
    return "\n".join(lines) + "\n"


def whole_run_table(rows: Sequence[Row], metric: str) -> str:
    """Every run's whole training compute against the baseline's, with its best final-phase metric.

    Shown whatever the stopping rule, so that a run that never surpasses the baseline still shows what it
    cost and how far it ended from the baseline (the demo's summary does the same). Where a run averaged its
    weights, a column gives the average's score, against the baseline's average when it has one (like with like).
    """
    averaged = any(row.averaged is not None for row in rows)  # a column only where some run averaged
    tested = any(row.test is not None for row in rows)  # and where some run has a test split
    lines = [f"| Setting | training FLOPs (whole run) | FLOPs save (%) | device-hours (whole run) | best {metric}, "
             f"final phase |" + (f" weight-averaged {metric} |" if averaged else "")
             + (f" test {metric} |" if tested else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if averaged else "") + ("---:|" if tested else "")]
    for row in rows:
        save = "-" if row.total_save is None else f"{row.total_save:.2f}"
        hours = "-" if row.device_hours is None else f"{row.device_hours:.3g}"
        cell = "" if not averaged else \
            " - |" if row.averaged is None else f" {_percent(row.averaged, row.averaged_delta, metric)} |"
        cell += "" if not tested else " - |" if row.test is None else f" {_percent(row.test, row.test_delta, metric)} |"
        lines.append(f"| {row.label} | {row.total_flops:.3g} | {save} | {hours} | "
                     f"{_percent(row.best, row.best_delta, metric)} |" + cell)
    return "\n".join(lines) + "\n"


def metric_name(runs: Sequence[Run], metric: str) -> str:
    """What the metric is, for axis labels: SSAST pretraining's ``acc`` is the masked-patch accuracy."""
    pretext = any(run_kind(run) == "pretraining" for run in runs)
    if metric == "acc":
        return "masked-patch accuracy" if pretext else "accuracy"
    return metric


def _recipe_of(run: Run) -> dict:
    folder = Path(run.source)
    folder = folder if folder.is_dir() else folder.parent
    for candidate in (folder / "recipe.yaml", folder.parent / "recipe.yaml"):  # a fold's recipe is one level up
        if candidate.is_file():
            try:
                data = yaml.safe_load(candidate.read_text())
            except (OSError, yaml.YAMLError):
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def report_title(runs: Sequence[Run], metric: str) -> str:
    """``<task or pretraining>: <metric> against training compute`` and the run directories compared."""
    recipe = _recipe_of(runs[0])
    task = recipe.get("task", {}).get("name") if isinstance(recipe.get("task"), dict) else None
    pretext = metric_name(runs, metric) == "masked-patch accuracy"
    what = f"{task} fine-tuning" if task else "SSAST pretraining" if pretext else "runs"
    names = ", ".join(distinct_names([run.source for run in runs]))
    return f"{what}: {metric_name(runs, metric)} against training compute\n{names}"
