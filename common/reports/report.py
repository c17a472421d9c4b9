"""Compare coarse-to-fine runs with their baseline: the paper's savings tables and a metric-vs-FLOPs plot.

The rule is that of the paper's sections 3.3-3.4 (Tables 2-5). The baseline reference is the baseline's
per-epoch evaluation with the highest validation metric (its best epoch), with the cumulative training FLOPs
and wall time at that evaluation. A coarse-to-fine run is stopped at the earliest per-epoch evaluation *of its
final phase* whose metric strictly surpasses that reference; its savings are ``100 * (1 - F_run / F_base)`` for FLOPs and
``100 * (1 - T_run / T_base)`` for training time (evaluation excluded). A run whose final phase never
surpasses the baseline gets no savings under that rule. ``--stop-epoch N`` replaces the rule by a fixed stop at
epoch N of the final phase, whatever its metric: the paper's AudioSet rows (Table 2: 1 epoch at Fshift x4 + 3
at full resolution against the baseline's best, epoch 5 of 5, with a small mAP drop). The "no budget" column
(Tables 3 and 5) is the best metric of the final phase. A second table compares the whole runs (all their
training FLOPs against the baseline's), so a saving shows even where no run surpasses the baseline. Every
metric is a fraction (accuracy, mAP, masked-patch accuracy) and is shown in percent.
Like is compared with like (``common.phases.baseline``): the evaluation of a weight average that a run appends at
its end is never compared with epochs; where runs averaged, the whole-run table compares their averages with
the baseline's average. Runs validated on other manifests or with other evaluation settings than the
baseline (what both ledgers record) are refused, naming the difference, unless
``--accept-baseline-differences`` (then listed in ``report.md``).
A cross-validation run's root (``fold1/`` ... ``foldK/``, ESC-50) is one run, the mean of its folds
(``common.reports.folds``), compared with a baseline of as many folds, fold by fold for the validation settings.
Runs that applied the rule live (``train.stop_when_surpassing``) are marked, and so are those whose cap
ended the final phase before it surpassed (:func:`end_note`).

    python common/reports/report.py --baseline runs/base --runs runs/fshift4 runs/fshift421 --out reports/
    python common/reports/report.py --baseline runs/as_base --runs runs/as_fshift4 --stop-epoch 3 --out reports/as
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import yaml
from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from common.phases.baseline import differences, is_averaged
from common.reports.folds import FoldError, fold_dirs, fold_mean
from common.system.disk import output_folder
from common.system.prog import prog
from common.system.signals import piped
from common.training.ledger import Ledger

# Imports the command alone needs are inside its functions: --help answers without loading torch.

__all__ = ["ReportError", "Run", "Point", "Row", "load_run", "resolve_metric", "run_label", "distinct_names",
           "points", "compare", "baseline_differences", "end_note", "markdown_table", "whole_run_table",
           "metric_name", "report_title", "figure", "plot", "main", "hardware", "other_hardware"]

METHOD_NAMES = {"fshift": "Fshift", "avgpool": "Avg Pool", "maxpool": "Max Pool", "patch": "Patch"}
PATCH_TRANSFER_NAMES = {"pi": "PI", "bilinear": "BL"}  # the paper's labels
PHASE_MARKERS = "osD^vPpX"


class ReportError(ValueError):
    """Bad input for the report; the message names the file and the problem."""


@dataclass(frozen=True)
class Run:
    """A run to report: where its ledger came from, its row label and the ledger; a cross-validation run's
    ledger is its folds' mean (``common.reports.folds``), ``folds`` its folds and ``left_out`` the evaluations
    that only some folds made."""

    source: str
    label: str
    ledger: Ledger
    folds: tuple["Run", ...] = ()
    left_out: tuple[str, ...] = ()


@dataclass(frozen=True)
class Point:
    """One evaluation: 0-based phase, cumulative training FLOPs and seconds, metric value, epoch in its phase;
    ``averaged``: the evaluation of the run's weight average (at its end), not of an epoch."""

    phase: int
    flops: float
    seconds: float
    value: float
    epoch: int | None = None
    averaged: bool = False


@dataclass(frozen=True)
class Row:
    """One table row: deltas, savings and ``stop`` are None for the baseline; savings, ``stop`` when never surpassed.

    ``total_flops`` is the whole run's training FLOPs and ``total_save`` its saving against the baseline's
    whole run (None for the baseline); ``device_hours`` the whole run's device time (training and validation
    seconds times the ranks, :func:`_device_hours`); ``fixed`` marks a stop at a given epoch (``--stop-epoch``); ``note``:
    how the run's final phase ended, when a rule ended it (:func:`end_note`); ``averaged``: the score of the run's
    weight average (None without one) and ``averaged_delta`` its difference to the baseline's weight average
    (None unless both averaged); ``hardware``: where the run trained when that is not where the baseline did
    (:func:`other_hardware`; its time saving is then None).
    """

    label: str
    value: float
    delta: float | None
    flops_save: float | None
    time_save: float | None
    best: float
    best_delta: float | None
    stop: Point | None
    total_flops: float = 0.0
    total_save: float | None = None
    fixed: bool = False
    note: str | None = None
    device_hours: float | None = None
    averaged: float | None = None
    averaged_delta: float | None = None
    hardware: str | None = None


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Reads ``ledger.json`` from a run directory (or the file itself); a cross-validation run's root (a
    ``foldN/ledger.json`` per fold) is read as the mean of its folds (``common.reports.folds``).

    Args:
        path: the run directory or its ``ledger.json``.
        label: the row label; default :func:`run_label` of the ledger (with ``K-fold mean`` for folds).

    Raises:
        ReportError: the ledger is missing or is not valid JSON; the folds do not make one run.
    """
    folds = [] if (Path(path) / "ledger.json").is_file() else fold_dirs(path)
    if folds:
        runs = tuple(load_run(fold) for fold in folds)
        try:
            ledger, left_out = fold_mean([run.ledger for run in runs], [str(fold) for fold in folds])
        except FoldError as err:
            raise ReportError(f"{path}: {err}") from None
        return Run(str(path), f"{label or run_label(ledger)} ({len(folds)}-fold mean)", ledger, runs, tuple(left_out))
    try:
        ledger = Ledger.read(path)
    except FileNotFoundError as err:
        raise ReportError(str(err)) from None
    except ValueError as err:
        raise ReportError(f"{path}: ledger is not valid JSON ({err})") from None
    return Run(str(path), label or run_label(ledger), ledger)


def resolve_metric(runs: Sequence[Run], metric: str | None = None) -> str:
    """The metric to compare: ``metric`` if given, else the ``score`` all ledgers agree on.

    Raises:
        ReportError: a ledger names no score, or the ledgers name different ones.
    """
    if metric:
        return metric
    for run in runs:
        if not run.ledger.score:
            raise ReportError(f"{run.source}: ledger names no score metric; pass --metric")
    names = {run.ledger.score for run in runs}
    if len(names) > 1:
        listing = ", ".join(f"{run.source}: {run.ledger.score}" for run in runs)
        raise ReportError(f"runs are ranked by different metrics ({listing}); pass --metric to choose one")
    return names.pop()


def run_label(ledger: Ledger) -> str:
    """A label from the phases, e.g. ``Fshift 4→1`` or ``Avg Pool 4→2→1`` (``Full resolution`` if none)."""
    if any(p.compression is None or p.factor is None for p in ledger.phases):
        return " → ".join(str(p.name or i + 1) for i, p in enumerate(ledger.phases))
    methods = dict.fromkeys(p.compression for p in ledger.phases if p.compression != "none")
    if not methods:
        return "Full resolution"
    transfers = {p.compression: p.patch_transfer for p in ledger.phases if p.patch_transfer}
    names = "/".join(METHOD_NAMES.get(m, m) + (f" {PATCH_TRANSFER_NAMES.get(transfers[m], transfers[m])}"
                                                 if m in transfers else "") for m in methods)
    return f"{names} {'→'.join(str(p.factor) for p in ledger.phases)}"


def points(run: Run, metric: str) -> list[Point]:
    """The run's evaluations in order, checked.

    Raises:
        ReportError: no evaluations, or an evaluation lacks a field or the metric.
    """
    if not run.ledger.evals:
        raise ReportError(f"{run.source}: no evaluations in the ledger")
    out = []
    for i, ev in enumerate(run.ledger.evals):
        missing = [k for k in ("phase", "train_flops", "wall_seconds", "metrics") if k not in ev]
        if missing:
            raise ReportError(f"{run.source}: evaluation {i} lacks {', '.join(missing)}")
        if metric not in ev["metrics"]:
            raise ReportError(f"{run.source}: evaluation {i} (phase {ev['phase']}) has no metric {metric!r}; "
                              f"it has {sorted(ev['metrics'])}")
        try:
            averaged = is_averaged(ev)
            epoch = None if averaged or ev.get("epoch") is None else int(ev["epoch"])
            out.append(Point(int(ev["phase"]), float(ev["train_flops"]), float(ev["wall_seconds"]),
                             float(ev["metrics"][metric]), epoch, averaged))
        except (TypeError, ValueError):
            raise ReportError(f"{run.source}: evaluation {i} holds a non-numeric phase, FLOPs, time or "
                              f"{metric!r}") from None
    return out


def _saving(used: float, reference: float) -> float | None:
    return 100.0 * (1.0 - used / reference) if reference > 0 else None


def _total_flops(run: Run, pts: Sequence[Point]) -> float:
    """The run's training FLOPs: the ledger's phase totals, or (hand-written ledgers) its last evaluation's."""
    total = float(run.ledger.totals()["train_flops"] or 0)
    return total if total > 0 else max(p.flops for p in pts)


def _device_hours(run: Run) -> float | None:
    """The run's device-hours (GPU-hours on GPUs) from its ledger; None for a ledger that does not record them."""
    seconds = float(run.ledger.totals().get("device_seconds") or 0)
    return seconds / 3600 if seconds > 0 else None


def hardware(run: Run) -> frozenset[tuple[str, int]] | None:
    """Where the run trained: ``(device, ranks)`` of every launch of its phases (a cross-validation run's folds
    together); None when its ledger does not record it."""
    ledgers = [fold.ledger for fold in run.folds] or [run.ledger]
    found = frozenset(pair for ledger in ledgers for p in ledger.phases for pair in _phase_hardware(p))
    return found or None


def _phase_hardware(phase) -> set[tuple[str, int]]:
    if phase.hardware:
        return {(str(device), int(ranks)) for device, ranks in phase.hardware}
    return {(phase.device, int(phase.world_size))} if phase.device and phase.world_size else set()  # older ledgers


def describe_hardware(found: frozenset[tuple[str, int]]) -> str:
    return " and ".join(f"{ranks} x {device}" for device, ranks in sorted(found))


def other_hardware(baseline: Run, run: Run) -> str | None:
    """How ``run`` trained on other devices or another number of ranks than ``baseline``, or either on a mix of
    them (their wall times do not compare: no time saving), e.g. ``8 x NVIDIA H100 (baseline: 1 x cpu)``; None
    when alike or not recorded."""
    mine, theirs = hardware(run), hardware(baseline)
    if mine is None or theirs is None or (mine == theirs and len(mine) == 1):
        return None
    return f"{describe_hardware(mine)} (baseline: {describe_hardware(theirs)})"


def end_note(run: Run) -> str | None:
    """How the run's final phase ended when a rule ended it: stopped live on surpassing its baseline
    (``train.stop_when_surpassing``), by a criterion, or by its cap before it surpassed; None otherwise. A
    cross-validation run's folds that ended alike share one note; otherwise each fold's is named."""
    if run.folds:
        notes = [end_note(fold) for fold in run.folds]
        if len(set(notes)) == 1:
            return notes[0]
        return "; ".join(f"{Path(fold.source).name}: {note or 'its planned length'}"
                         for fold, note in zip(run.folds, notes))
    if not run.ledger.phases:
        return None
    final = run.ledger.phases[-1]
    at = final.ended_at or {}
    where = f"epoch {at['epoch']}" if "epoch" in at else f"step {at.get('step', '?')}"
    if final.ended_by == "surpassed":
        return f"stopped live on surpassing its baseline ({where} of the final phase)"
    if final.ended_by == "cap" and run.ledger.stop_target:
        return f"the cap ended it ({where} of the final phase) before it surpassed its baseline"
    if final.ended_by not in (None, "length", "cap"):
        return f"final phase ended by {final.ended_by} ({where})"
    return None


def unfinished(run: Run) -> str | None:
    """Why ``run`` may not have finished, so that its last phase in the ledger need not be its final one (None: it
    finished). A run directory finished when it holds ``model.safetensors`` (written after the final phase); a
    ledger file on its own when its last phase ended; a cross-validation run when every fold finished and it wrote
    its summary (a fold not started yet has no ledger to show it is missing)."""
    if run.folds:
        reasons = [f"{fold.source}: {reason}" for fold in run.folds if (reason := unfinished(fold))]
        if not (Path(run.source) / "cv_summary.json").is_file():
            reasons.append(f"{run.source} has no cv_summary.json, which the run writes after its last fold")
        return "; ".join(reasons) or None
    source = Path(run.source)
    folder = source if source.is_dir() else source.parent
    if (folder / "model.safetensors").is_file():
        return None
    last = run.ledger.phases[-1] if run.ledger.phases else None
    if last is None or last.ended_by is None:
        name = last.name if last is not None and last.name else f"phase {len(run.ledger.phases)}"
        return f"its last phase in the ledger ({name}) has not ended"
    if source.is_dir():
        return "it has no model.safetensors, the export a finished run writes after its final phase"
    return None


def _finished(run: Run) -> None:
    reason = unfinished(run)
    if reason:
        raise ReportError(f"{run.source}: the run has not finished ({reason}); its scores so far may be of a coarse "
                          f"phase, not of its final one: report it once it has finished")


def compare(baseline: Run, runs: Sequence[Run], metric: str, stop_epoch: int | None = None) -> list[Row]:
    """The Table 2/3 rows (Tables 4/5 for 3-phase runs): the baseline's row, then one per run.

    Args:
        baseline: the full-resolution baseline run.
        runs: the coarse-to-fine runs.
        metric: the metric name in the evaluations (higher is better).
        stop_epoch: stop every run at this epoch (1-based) of its final phase instead of at the first
            evaluation that surpasses the baseline (the paper's AudioSet rows).

    Raises:
        ReportError: as :func:`points`, a run has not finished (:func:`unfinished`), has no evaluation in its
            final phase, or none at ``stop_epoch``.
    """
    for run in (baseline, *runs):
        _finished(run)
    base_points = points(baseline, metric)
    epochs = [p for p in base_points if not p.averaged]  # a weight average is not an epoch: like with like
    if not epochs:
        raise ReportError(f"{baseline.source}: no per-epoch evaluation (only a weight average) to compare epochs with")
    base = max(epochs, key=lambda p: p.value)  # the first of equal maxima
    base_avg = _averaged(base_points)
    base_total = _total_flops(baseline, base_points)
    rows = [Row(baseline.label, base.value, None, None, None, base.value, None, None, base_total,
                device_hours=_device_hours(baseline), averaged=base_avg)]
    for run in runs:
        final = len(run.ledger.phases) - 1
        if final < 0:
            raise ReportError(f"{run.source}: no phases in the ledger")
        pts = points(run, metric)
        last = [p for p in pts if p.phase == final and not p.averaged]
        if not last:
            raise ReportError(f"{run.source}: no evaluation in the final phase (phase index {final})")
        if stop_epoch is not None:
            stop = next((p for p in last if p.epoch == stop_epoch), None)
            if stop is None:
                epochs = sorted({p.epoch for p in last if p.epoch is not None})
                raise ReportError(f"{run.source}: no evaluation at epoch {stop_epoch} of the final phase (its epochs: "
                                  f"{', '.join(map(str, epochs)) or 'none; an iteration-based run'})")
        else:
            stop = next((p for p in last if p.value > base.value), None)
        best = max(p.value for p in last)
        value = stop.value if stop else best
        total = _total_flops(run, pts)
        averaged = _averaged(pts)
        elsewhere = other_hardware(baseline, run)
        rows.append(Row(run.label, value, value - base.value,
                        _saving(stop.flops, base.flops) if stop else None,
                        _saving(stop.seconds, base.seconds) if stop and not elsewhere else None,
                        best, best - base.value, stop, total, _saving(total, base_total), stop_epoch is not None,
                        end_note(run), _device_hours(run), averaged,
                        averaged - base_avg if averaged is not None and base_avg is not None else None, elsewhere))
    return rows


def _averaged(pts: Sequence[Point]) -> float | None:
    """The score of the run's weight average (its last averaged evaluation), or None."""
    return next((p.value for p in reversed(pts) if p.averaged), None)


def baseline_differences(baseline: Run, runs: Sequence[Run]) -> dict[str, list[str]]:
    """Per run label, why its scores do not compare with the baseline's: other validation manifests or
    evaluation settings (``common.phases.baseline.differences``, on what both ledgers record; fold k with fold k
    for cross-validation runs), or another number of folds; empty when all compare."""
    out = {}
    for run in runs:
        if len(run.folds) != len(baseline.folds):
            found = [f"{_folds(baseline)} (baseline) vs {_folds(run)} (this run)"]
        else:  # fold k with fold k: each fold validates on its own held-out part
            found = [f"{Path(mine.source).name}: {text}" if run.folds else text
                     for theirs, mine in (zip(baseline.folds, run.folds) if run.folds else [(baseline, run)])
                     for text in _differences(theirs, mine)]
        if found:
            out[run.label] = found
    return out


def _fold_text(run: Run) -> str:
    """report.md's paragraph on a cross-validation run: what its numbers are, and what was left out."""
    if not run.folds:
        return ""
    text = (f"\n{run.label}: a cross-validation run ({run.source}); each evaluation is the mean over its "
            f"{len(run.folds)} folds (metric, cumulative FLOPs and time), the whole-run columns are the sums over "
            f"the folds.")
    if run.left_out:
        text += f" Left out (not scored by every fold): {'; '.join(run.left_out)}."
    return text + "\n"


def _folds(run: Run) -> str:
    return f"a mean of {len(run.folds)} folds" if run.folds else "a single run"


def _differences(baseline: Run, run: Run) -> list[str]:
    base = baseline.ledger.to_dict()  # the metric is compared alike on both sides (resolve_metric)
    return differences(base, base.get("score"), run.ledger.data, run.ledger.evaluation, strict=False)


def _percent(value: float, delta: float | None) -> str:
    text = f"{100 * value:.2f}"
    if delta is None:
        return text
    diff = f"{100 * delta:+.2f}"
    return f"{text} ({'=' if diff in ('+0.00', '-0.00') else diff})"


def markdown_table(rows: Sequence[Row], metric: str) -> str:
    """The rows as a Markdown table (metrics in percent, differences to the baseline in parentheses)."""
    lines = [f"| Setting | {metric} | FLOPs save (%) | Time save (%) | Best {metric} (no budget) |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        value = _percent(row.value, row.delta)
        if row.delta is not None and row.stop is None:
            value += ", not surpassed"
        elif row.fixed and row.stop is not None:
            value += f", epoch {row.stop.epoch}"
        saves = ["-" if s is None else f"{s:.2f}" for s in (row.flops_save, row.time_save)]
        if row.hardware and row.stop is not None:
            saves[1] = "- (other devices)"
        label = f"{row.label} ({row.note})" if row.note else row.label
        lines.append(f"| {label} | {value} | {saves[0]} | {saves[1]} | {_percent(row.best, row.best_delta)} |")
    return "\n".join(lines) + "\n"


def whole_run_table(rows: Sequence[Row], metric: str) -> str:
    """Every run's whole training compute against the baseline's, with its best final-phase metric.

    Shown whatever the stopping rule, so that a run that never surpasses the baseline still shows what it
    cost and how far it ended from the baseline (the demo's summary does the same). Where a run averaged its
    weights, a column gives the average's score, against the baseline's average when it has one (like with like).
    """
    averaged = any(row.averaged is not None for row in rows)  # a column only where some run averaged
    lines = [f"| Setting | training FLOPs (whole run) | FLOPs save (%) | device-hours (whole run) | best {metric}, "
             f"final phase |" + (f" weight-averaged {metric} |" if averaged else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if averaged else "")]
    for row in rows:
        save = "-" if row.total_save is None else f"{row.total_save:.2f}"
        hours = "-" if row.device_hours is None else f"{row.device_hours:.3g}"
        cell = "" if not averaged else \
            " - |" if row.averaged is None else f" {_percent(row.averaged, row.averaged_delta)} |"
        lines.append(f"| {row.label} | {row.total_flops:.3g} | {save} | {hours} | "
                     f"{_percent(row.best, row.best_delta)} |" + cell)
    return "\n".join(lines) + "\n"


def metric_name(runs: Sequence[Run], metric: str) -> str:
    """What the metric is, for axis labels: SSAST pretraining's ``acc`` is the masked-patch accuracy."""
    pretext = any(_kind(run) == "pretraining" for run in runs)
    if metric == "acc":
        return "masked-patch accuracy" if pretext else "accuracy"
    return metric


def _kind(run: Run) -> str:
    """``pretraining`` (SSAST's evaluations carry its InfoNCE loss) or ``fine-tuning``."""
    return "pretraining" if any("nce" in ev.get("metrics", {}) for ev in run.ledger.evals) else "fine-tuning"


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


def _run_dir(source: str) -> Path:
    path = Path(source)
    return path.parent if path.name == "ledger.json" else path


def distinct_names(sources: Sequence[str]) -> list[str]:
    """The run directories' names, each the shortest path suffix that no other run shares
    (``runs/a/fold1`` and ``runs/b/fold1`` give ``a/fold1`` and ``b/fold1``)."""
    parts = [Path(os.path.abspath(_run_dir(s))).parts for s in sources]
    names = []
    for i, own in enumerate(parts):
        n = 1
        while n < len(own) and any(other[-n:] == own[-n:] for j, other in enumerate(parts) if j != i):
            n += 1
        names.append("/".join(own[-n:]))
    return names


def distinct_labels(runs: Sequence[Run]) -> list[Run]:
    """``runs`` with every label that two of them share followed by the run directory's distinct name."""
    names = distinct_names([run.source for run in runs])
    counts = Counter(run.label for run in runs)
    return [replace(run, label=f"{run.label} ({name})") if counts[run.label] > 1 else run
            for run, name in zip(runs, names)]


def report_title(runs: Sequence[Run], metric: str) -> str:
    """``<task or pretraining>: <metric> against training compute`` and the run directories compared."""
    recipe = _recipe_of(runs[0])
    task = recipe.get("task", {}).get("name") if isinstance(recipe.get("task"), dict) else None
    pretext = metric_name(runs, metric) == "masked-patch accuracy"
    what = f"{task} fine-tuning" if task else "SSAST pretraining" if pretext else "runs"
    names = ", ".join(distinct_names([run.source for run in runs]))
    return f"{what}: {metric_name(runs, metric)} against training compute\n{names}"


def _limits(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = max(0.08 * (hi - lo), 0.5)
    return lo - pad, hi + pad


def figure(runs: Sequence[Run], rows: Sequence[Row], metric: str, title: str | None = None) -> Figure:
    """The metric against cumulative training FLOPs, one line per run (the drawing :func:`plot` saves).

    The y-range is that of the final phases and the baseline: a coarse phase's values (hollow markers,
    dashed line) are on another token grid and, for SSAST's masked-patch accuracy, on another scale; those
    outside the range sit on its edge as triangles. Each run's stop (the first final-phase evaluation
    above the baseline's best, or ``--stop-epoch``) is a star; a run's weight average, evaluated at its end,
    is a diamond off its line (not an epoch); the legend, outside the axes, lists only what is drawn.
    """
    fig = Figure(figsize=(10, 5.2), dpi=120, layout="constrained")  # no pyplot: no display, no global backend
    ax = fig.subplots()
    final_values = [100 * rows[0].value]
    series = []
    for run in runs:
        pts = points(run, metric)
        final = len(run.ledger.phases) - 1 if run.ledger.phases else max(p.phase for p in pts)  # a hand-written
        # baseline's ledger may list evaluations only
        series.append((pts, final))
        final_values += [100 * p.value for p in pts if p.phase == final]
    lo, hi = _limits(final_values)
    handles = []
    coarse_shown: dict[int, bool] = {}
    stop_label = averaged_shown = None
    colors = itertools.cycle(rcParams["axes.prop_cycle"].by_key()["color"])
    for run, row, (pts, final), color in zip(runs, rows, series, colors):
        fine = [p for p in pts if p.phase == final and not p.averaged]
        averaged = [p for p in pts if p.averaged]
        if averaged:
            ax.scatter([p.flops for p in averaged], [min(max(100 * p.value, lo), hi) for p in averaged], marker="d",
                       s=70, color=color, edgecolors="black", zorder=4)
            averaged_shown = True
        line, = ax.plot([p.flops for p in fine], [100 * p.value for p in fine], color=color, marker="o",
                        markersize=4, label=run.label)
        handles.append(line)
        coarse = [p for p in pts if p.phase != final and not p.averaged]
        if coarse:
            ax.plot([p.flops for p in coarse] + [fine[0].flops], [min(max(100 * p.value, lo), hi) for p in coarse]
                    + [100 * fine[0].value], color=color, linestyle="--", linewidth=0.8, alpha=0.6)
            for phase in sorted({p.phase for p in coarse}):
                sel = [p for p in coarse if p.phase == phase]
                inside = [p for p in sel if lo <= 100 * p.value <= hi]
                above = [p for p in sel if 100 * p.value > hi]
                below = [p for p in sel if 100 * p.value < lo]
                marker = PHASE_MARKERS[phase % len(PHASE_MARKERS)]
                ax.scatter([p.flops for p in inside], [100 * p.value for p in inside], facecolors="none",
                           edgecolors=color, marker=marker, s=30, zorder=3)
                for group, edge, arrow in ((above, hi, "^"), (below, lo, "v")):
                    if group:
                        ax.scatter([p.flops for p in group], [edge] * len(group), facecolors="none",
                                   edgecolors=color, marker=arrow, s=40, zorder=3, clip_on=False)
                        coarse_shown[-1] = True
                if inside:
                    coarse_shown[phase] = True
        if row.stop is not None:
            ax.scatter([row.stop.flops], [100 * row.stop.value], marker="*", s=220, color=color, edgecolors="black",
                       zorder=4)
            stop_label = f"stop: epoch {row.stop.epoch} of the final phase" if row.fixed else \
                "first to surpass the baseline"
    ax.axhline(100 * rows[0].value, color="gray", linestyle=":", linewidth=1)
    ax.set_ylim(lo, hi)
    handles.append(Line2D([], [], color="gray", linestyle=":", label=f"baseline best ({100 * rows[0].value:.2f})"))
    for phase in sorted(p for p in coarse_shown if p >= 0):
        handles.append(Line2D([], [], color="gray", linestyle="", marker=PHASE_MARKERS[phase % len(PHASE_MARKERS)],
                              markerfacecolor="none", label=f"phase {phase + 1} (coarse)"))
    if -1 in coarse_shown:
        handles.append(Line2D([], [], color="gray", linestyle="", marker="^", markerfacecolor="none",
                              label="coarse value off this scale"))
    if stop_label:
        handles.append(Line2D([], [], color="gray", linestyle="", marker="*", markersize=12, markeredgecolor="black",
                              label=stop_label))
    if averaged_shown:
        handles.append(Line2D([], [], color="gray", linestyle="", marker="d", markersize=8, markeredgecolor="black",
                              label="weight average (end of run)"))
    fig.legend(handles=handles, fontsize=8, loc="outside right upper")
    ax.set_xlabel("cumulative training compute (FLOPs)")
    ax.set_ylabel(f"validation {metric_name(runs, metric)} (%)")
    ax.set_title(title or report_title(runs, metric), fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig


def plot(runs: Sequence[Run], rows: Sequence[Row], metric: str, path: str | Path, title: str | None = None) -> Figure:
    """Writes :func:`figure` as a PNG and returns it.

    Args:
        runs: the baseline then the other runs, in the order of ``rows``.
        rows: :func:`compare`'s rows.
        metric: the metric name.
        path: where the PNG goes.
        title: the plot's title (default: :func:`report_title`).
    """
    fig = figure(runs, rows, metric, title)
    fig.savefig(path)
    return fig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("common/reports/report.py"),
        description="Compare coarse-to-fine runs with a baseline as in the paper's Tables 2-5 (fine-tuning or\n"
                    "pretraining runs). Each run stops at the earliest evaluation of its final phase that\n"
                    "surpasses the baseline's best per-epoch evaluation (a weight average is compared only with\n"
                    "a weight average); FLOPs and time savings are against the baseline's best evaluation.\n"
                    "Prints the Markdown table and writes report.md and report.png.",
        epilog="example:\n  python common/reports/report.py --baseline runs/esc50_base \\\n"
               "      --runs runs/esc50_fshift4 runs/esc50_fshift421 --names 'Fshift 4→1' 'Fshift 4→2→1' \\\n"
               "      --out reports/esc50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--baseline", type=Path, required=True, metavar="RUN_DIR",
                        help="the baseline's run directory (or its ledger.json); a cross-validation run's root "
                             "(fold1/ ... foldK/) is the mean of its folds")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, metavar="RUN_DIR",
                        help="coarse-to-fine run directories (or their ledger.json), cross-validation roots as "
                             "for --baseline")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="row labels, one per --runs entry (default: from the phases, e.g. 'Fshift 4→1', and the "
                             "run directory's name after those that two runs share)")
    parser.add_argument("--metric", metavar="NAME",
                        help="the metric to compare, e.g. mAP (default: the 'score' the ledgers agree on)")
    parser.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                        help="where report.md and report.png go (default: the current directory)")
    parser.add_argument("--stop-epoch", type=int, default=None, metavar="N",
                        help="stop every run at epoch N of its final phase instead of at the first evaluation that "
                             "surpasses the baseline (the paper's AudioSet rows: --stop-epoch 3)")
    parser.add_argument("--title", default=None, help="title of the plot (default: the task and the run directories)")
    parser.add_argument("--accept-baseline-differences", action="store_true",
                        help="compare runs validated on other manifests or with other evaluation settings than the "
                             "baseline (refused otherwise); the differences are listed in report.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 on bad input, 141 when the output's reader went away)."""
    args = build_parser().parse_args(argv)
    return piped(lambda: _report(args))


def _report(args: argparse.Namespace) -> int:
    try:
        if args.names is not None and len(args.names) != len(args.runs):
            raise ReportError(f"--names has {len(args.names)} labels for {len(args.runs)} --runs")
        baseline = load_run(args.baseline, "Baseline")
        runs = [load_run(path, name) for path, name in zip(args.runs, args.names or [None] * len(args.runs))]
        if args.names is None:  # labels from the phases: runs with the same phases get their directories' names
            runs = distinct_labels(runs)
        for run in runs:  # SSAST pretraining's masked-patch accuracy is no fine-tuning accuracy
            if Path(run.source).resolve() == Path(baseline.source).resolve():
                raise ReportError(f"--runs {run.source} is the baseline itself; --runs names the runs compared "
                                  f"with it")
            if _kind(run) != _kind(baseline):
                raise ReportError(f"{run.source} is a {_kind(run)} run and the baseline {baseline.source} a "
                                  f"{_kind(baseline)} run: compare runs of one kind")
        for run in (baseline, *runs):  # before the differences, which an unfinished run's may only seem to have
            _finished(run)
        metric = resolve_metric([baseline, *runs], args.metric)
        if args.stop_epoch is not None and args.stop_epoch < 1:
            raise ReportError(f"--stop-epoch must be >= 1, got {args.stop_epoch}")
        found = baseline_differences(baseline, runs)
        if found and not args.accept_baseline_differences:
            listed = "; ".join(f"{label}: {', '.join(d)}" for label, d in found.items())
            raise ReportError(f"the runs' scores do not compare with the baseline's ({listed}); compare runs validated "
                              f"alike, or pass --accept-baseline-differences (listed in report.md)")
        rows = compare(baseline, runs, metric, args.stop_epoch)
        table = markdown_table(rows, metric)
        accepted = "".join(f"\nAccepted differences from the baseline (--accept-baseline-differences), {label}: "
                           f"{'; '.join(d)}.\n" for label, d in found.items())
        averaged = "" if all(row.averaged is None for row in rows) else \
            (f" The weight-averaged {metric} is the score of each run's weight average, against the baseline's "
             f"average where it has one; the tables above compare epochs with epochs only.")
        folds = "".join(_fold_text(run) for run in (baseline, *runs))
        folds += "".join(f"\n{row.label} trained on {row.hardware}: its time saving is not computed (wall times on "
                         f"other devices, another number of ranks or a mix of them do not compare); its FLOPs saving "
                         f"is.\n"
                         for row in rows if row.hardware)
        output_folder(args.out)
        rule = (f"Each run stops at epoch {args.stop_epoch} of its final phase (a fixed stop, whatever its {metric})"
                if args.stop_epoch is not None else
                f"Each run stops at the earliest evaluation of its final phase whose {metric} surpasses the "
                f"baseline's best (epochs with epochs: a weight average is not an epoch)")
        (args.out / "report.md").write_text(
            f"# Coarse-to-fine report ({metric_name([baseline, *runs], metric)})\n\n{table}\n{rule}; savings are "
            f"against the baseline's best evaluation.\n\n## Whole runs\n\n{whole_run_table(rows, metric)}\n"
            f"All the training FLOPs of each run against all of the baseline's, the device time it held (training "
            f"and validation seconds times the ranks: GPU-hours on GPUs), and the best {metric} of the final "
            f"phase (difference to the baseline's best).{averaged}\n{folds}{accepted}\n"
            f"![{metric} against training FLOPs](report.png)\n",
            encoding="utf-8")
        plot([baseline, *runs], rows, metric, args.out / "report.png", args.title)
    except (ReportError, OSError, ValueError) as err:  # ValueError: --out names a file (output_folder)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
