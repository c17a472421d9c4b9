"""Coarse-to-fine runs against their baseline: the rows of the paper's savings tables.

The rule is that of the paper's sections 3.3-3.4 (Tables 2-5). The baseline reference is the baseline's per-epoch
evaluation with the highest validation metric (its best epoch), with the cumulative training FLOPs and wall time
at that evaluation. A coarse-to-fine run is stopped at the earliest per-epoch evaluation *of its final phase*
whose metric strictly surpasses that reference; its savings are ``100 * (1 - F_run / F_base)`` for FLOPs and
``100 * (1 - T_run / T_base)`` for training time (evaluation excluded). A run whose final phase never surpasses
the baseline gets no savings under that rule. ``stop_epoch`` (the command's ``--stop-epoch N``) replaces the rule
by a fixed stop at epoch N of the final phase, whatever its metric: the paper's AudioSet rows (Table 2: 1 epoch
at Fshift x4 + 3 at full resolution against the baseline's best, epoch 5 of 5, with a small mAP drop). The "no
budget" column (Tables 3 and 5) is the best metric of the final phase. A second table compares the whole runs
(all their training FLOPs against the baseline's), so a saving shows even where no run surpasses the baseline.
Every metric is a fraction (accuracy, mAP, masked-patch accuracy) and is shown in percent.
Like is compared with like (``common.phases.baseline``): the evaluation of a weight average that a run appends at
its end is never compared with epochs; where runs averaged, the whole-run table compares their averages with
the baseline's average. Runs validated on other manifests or with other evaluation settings than the
baseline (what both ledgers record) are named by :func:`baseline_differences` (the command refuses them).
A cross-validation run's root (``fold1/`` ... ``foldK/``, ESC-50) is one run, the mean of its folds
(``common.reports.folds``), compared with a baseline of as many folds, fold by fold for the validation settings.
Runs that applied the rule live (``train.stop_when_surpassing``) are marked, and so are those whose cap
ended the final phase before it surpassed (:func:`common.reports.runs.end_note`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common.phases.baseline import differences
from common.reports.runs import Point, ReportError, Run, end_note, other_hardware, points, require_finished

__all__ = ["Row", "compare", "baseline_differences"]


@dataclass(frozen=True)
class Row:
    """One table row: deltas, savings and ``stop`` are None for the baseline; savings, ``stop`` when never surpassed.

    ``total_flops`` is the whole run's training FLOPs and ``total_save`` its saving against the baseline's
    whole run (None for the baseline); ``device_hours`` the whole run's device time (training and validation
    seconds times the ranks, :func:`_device_hours`); ``fixed`` marks a stop at a given epoch (``--stop-epoch``);
    ``note``: how the run's final phase ended, when a rule ended it (:func:`end_note`); ``averaged``: the score of
    the run's weight average (None without one) and ``averaged_delta`` its difference to the baseline's weight average
    (None unless both averaged); ``hardware``: where the run trained when that is not where the baseline did
    (:func:`other_hardware`; its time saving is then None); ``test``: the run's test-split score (its best final-phase
    model's, ``test_metrics.json``; None for a task without a test split) and ``test_delta`` its difference to the
    baseline's (None unless both have one).
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
    test: float | None = None
    test_delta: float | None = None


def _test_score(run: Run, metric: str) -> float | None:
    """``metric`` on the run's test split (``RUN/test_metrics.json``, which fine-tuning writes for a task with one),
    or None."""
    folder = Path(run.source) if Path(run.source).is_dir() else Path(run.source).parent
    path = folder / "test_metrics.json"
    try:
        value = json.loads(path.read_text()).get(metric) if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        raise ReportError(f"{path}: not the test metrics a fine-tuning run writes (a JSON object)") from None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


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
        require_finished(run)
    base_points = points(baseline, metric)
    epochs = [p for p in base_points if not p.averaged]  # a weight average is not an epoch: like with like
    if not epochs:
        raise ReportError(f"{baseline.source}: no per-epoch evaluation (only a weight average) to compare epochs with")
    base = max(epochs, key=lambda p: p.value)  # the first of equal maxima
    base_avg = _averaged(base_points)
    base_total = _total_flops(baseline, base_points)
    base_test = _test_score(baseline, metric)
    rows = [Row(baseline.label, base.value, None, None, None, base.value, None, None, base_total,
                device_hours=_device_hours(baseline), averaged=base_avg, test=base_test)]
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
                        averaged - base_avg if averaged is not None and base_avg is not None else None, elsewhere,
                        *_with_delta(_test_score(run, metric), base_test)))
    return rows


def _with_delta(value: float | None, base: float | None) -> tuple[float | None, float | None]:
    return value, (value - base if value is not None and base is not None else None)


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


def _folds(run: Run) -> str:
    return f"a mean of {len(run.folds)} folds" if run.folds else "a single run"


def _differences(baseline: Run, run: Run) -> list[str]:
    base = baseline.ledger.to_dict()  # the metric is compared alike on both sides (resolve_metric)
    return differences(base, base.get("score"), run.ledger.data, run.ledger.evaluation, strict=False)
