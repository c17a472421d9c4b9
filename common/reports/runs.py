"""A run to report, read from its ledger: its evaluations (points), its label, where it trained and how it ended.

A run is a run directory or its ``ledger.json``; a cross-validation run's root (``fold1/`` ... ``foldK/``,
ESC-50) is one run, the mean of its folds (``common.reports.folds``). What the report compares
(``common.reports.compare``), tabulates and plots is read here.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from common.models.exports import fold_dirs
from common.phases.baseline import is_averaged
from common.reports.folds import FoldError, fold_mean
from common.training.ledger import Ledger, LedgerError

__all__ = ["ReportError", "Run", "Point", "load_run", "resolve_metric", "run_label", "distinct_names",
           "distinct_labels", "points", "end_note", "unfinished", "require_finished", "run_kind", "hardware",
           "describe_hardware", "other_hardware", "precisions", "other_precision"]

METHOD_NAMES = {"fshift": "Fshift", "avgpool": "Avg Pool", "maxpool": "Max Pool", "patch": "Patch"}
PATCH_TRANSFER_NAMES = {"pi": "PI", "bilinear": "BL"}  # the paper's labels


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


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Reads ``ledger.json`` from a run directory (or the file itself); a cross-validation run's root (a
    ``foldN/ledger.json`` per fold) is read as the mean of its folds (``common.reports.folds``).

    Args:
        path: the run directory or its ``ledger.json``.
        label: the row label; default :func:`run_label` of the ledger (with ``K-fold mean`` for folds).

    Raises:
        ReportError: the ledger is missing, is not valid JSON or not a ledger; the folds do not make one run.
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
    except LedgerError as err:  # not JSON, or JSON of another shape: the message names the file
        raise ReportError(str(err)) from None
    return Run(str(path), label or run_label(ledger), ledger)


# what --metric may name: the validation scores where higher is better (a loss, nce or mse falls as a model improves;
# clips and acc_se are counts and spreads); a pretraining run's own score is its masked-patch accuracy, acc
RANKED = ("acc", "mAP", "mAUC", "dprime")
FRACTIONS = ("acc", "mAP", "mAUC")  # the scores in [0, 1] of RANKED, shown in percent (d' is not one)


def resolve_metric(runs: Sequence[Run], metric: str | None = None) -> str:
    """The metric to compare: ``metric`` if given, else the ``score`` all ledgers agree on.

    Raises:
        ReportError: a ledger names no score, or the ledgers name different ones; ``metric`` is not a score that
            grows as the model improves (the report takes the highest as the best: a loss would read backwards).
    """
    if metric:
        if metric not in RANKED:
            raise ReportError(f"--metric {metric}: the report ranks runs by a score that grows as the model improves "
                              f"({', '.join(RANKED)}), the highest taken as the best; {metric} is not one")
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


def precisions(run: Run) -> frozenset[str] | None:
    """What the run trained in: ``bf16`` (autocast) and / or ``fp32`` over its phases and launches (a
    cross-validation run's folds together); None when its ledger does not record it."""
    ledgers = [fold.ledger for fold in run.folds] or [run.ledger]
    found = frozenset(str(p) for ledger in ledgers for phase in ledger.phases for p in phase.precision or ())
    return found or None


def other_precision(baseline: Run, run: Run) -> str | None:
    """How ``run`` trained in another precision than ``baseline`` (``train.precision: auto`` resolves by GPU: bf16
    on Ampere and later, fp32 before), e.g. ``bf16 (baseline: fp32)``, or ``bf16 (baseline: not recorded)`` against
    a baseline trained before ledgers recorded it; None when alike, or not recorded for the run."""
    mine, theirs = precisions(run), precisions(baseline)
    if mine is None or mine == theirs:
        return None
    return f"{' and '.join(sorted(mine))} (baseline: {' and '.join(sorted(theirs)) if theirs else 'not recorded'})"


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


def require_finished(run: Run) -> None:
    """Refuses a run that may not have finished (:func:`unfinished`).

    Raises:
        ReportError: naming why.
    """
    reason = unfinished(run)
    if reason:
        raise ReportError(f"{run.source}: the run has not finished ({reason}); its scores so far may be of a coarse "
                          f"phase, not of its final one: report it once it has finished")


def run_kind(run: Run) -> str:
    """``pretraining`` (SSAST's evaluations carry its InfoNCE loss) or ``fine-tuning``."""
    return "pretraining" if any("nce" in ev.get("metrics", {}) for ev in run.ledger.evals) else "fine-tuning"


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
