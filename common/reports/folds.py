"""A cross-validation run as one run to report: the mean of its folds' ledgers.

``finetune/run.py`` trains a k-fold task (ESC-50) in ``<run>/fold1`` ... ``<run>/foldK``, one ledger each; AST's
protocol scores the epoch whose accuracy *averaged over the folds* is best (``cv_summary.json``,
:func:`cross_validation_summary`). The report reads such a root as one run whose evaluations are the folds' means: per
evaluation (phase, epoch; a weight average apart) every metric and the cumulative training FLOPs, seconds and clips
averaged over the folds, so that the paper's rule (the first final-phase epoch above the baseline's best) runs on the
mean curve. An epoch that only some folds scored (a fold that stopped early) is left out and listed. The phases'
counters (what the whole-run table and device-hours show) are the sums over the folds: the whole cross-validation's
cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from common.phases.baseline import is_averaged
from common.training.ledger import Ledger, PhaseRecord

__all__ = ["fold_mean", "across_folds", "cross_validation_summary", "FoldError"]


class FoldError(ValueError):
    """The folds do not make one run (other phases, no common evaluation); the message names the fold."""


def _describe(record: PhaseRecord) -> tuple:
    return record.name, record.compression, record.factor, record.patch_transfer


def _key(ev: dict) -> tuple:
    """What makes two folds' evaluations the same one: the phase, and the epoch (the step where a run counts
    no epochs); a weight average (one per run, at its end) apart."""
    if is_averaged(ev):
        return int(ev["phase"]), "averaged"
    where = ev.get("epoch", ev.get("total_step"))
    return int(ev["phase"]), "epoch" if "epoch" in ev else "step", where


def across_folds(tables: Sequence[dict]) -> tuple[list, dict]:
    """Which evaluations the folds share: ``tables`` holds per fold its evaluations by key (phase and epoch, ...).
    Returns the keys every fold has, in the first fold's order, and every other key with the folds that have it
    (their indices, in fold order): a fold that stopped early leaves its missing epochs out of the mean, and they
    are listed. ``fold_mean`` (this report) and :func:`cross_validation_summary` (``cv_summary.json``)
    average over the folds what it shares."""
    shared = set.intersection(*(set(t) for t in tables))
    partial = {key: [i for i, t in enumerate(tables) if key in t]
               for key in set.union(*(set(t) for t in tables)) - shared}
    return [key for key in tables[0] if key in shared], partial


def cross_validation_summary(fold_evals: Sequence[Sequence[dict]], metric: str) -> dict:
    """AST's ESC-50 protocol: the epoch with the best accuracy averaged over the folds, and that mean.

    Only the final phase's epochs compete (the paper reports the final, full-resolution phase).

    Args:
        fold_evals: per fold, the ledger's evaluation records (``phase``, ``epoch``, ``metrics``); records
            without an ``epoch`` (e.g. a weight average) and records of earlier phases are ignored.
        metric: the metric to average.

    Returns:
        ``{"metric", "per_epoch": [{"phase", "epoch", "mean", "folds"}], "best": {...}}``, and ``"left_out"``
        (``[{"phase", "epoch", "folds": [fold numbers that scored it]}]``) where some folds scored epochs the others
        did not (a fold that stopped early, ``train.stop_when_surpassing``): only epochs every fold scored are
        averaged.
    """
    if not fold_evals:
        raise ValueError("no folds to summarise")
    final = max((e["phase"] for evals in fold_evals for e in evals), default=0)
    tables = [{(e["phase"], e["epoch"]): e["metrics"][metric] for e in evals if "epoch" in e and e["phase"] == final}
              for evals in fold_evals]
    shared, partial = across_folds(tables)
    if not shared:
        raise ValueError("the folds share no evaluated epoch")
    per_epoch = [{"phase": p, "epoch": e, "folds": [t[(p, e)] for t in tables],
                  "mean": float(np.mean([t[(p, e)] for t in tables]))} for p, e in sorted(shared)]
    best = max(per_epoch, key=lambda row: row["mean"])
    summary = {"metric": metric, "per_epoch": per_epoch, "best": best}
    if partial:
        summary["left_out"] = [{"phase": p, "epoch": e, "folds": [k + 1 for k in partial[(p, e)]]}
                               for p, e in sorted(partial)]
    return summary


def _mean_eval(evs: Sequence[dict]) -> dict:
    first = evs[0]
    shared = set.intersection(*(set(ev.get("metrics", {})) for ev in evs))
    out = {k: v for k, v in first.items() if k not in ("train_flops", "wall_seconds", "samples", "metrics")}
    for k in ("train_flops", "wall_seconds", "samples"):
        if all(k in ev for ev in evs):
            out[k] = float(np.mean([float(ev[k]) for ev in evs]))
    with np.errstate(invalid="ignore"):  # a perfect fold's d' is infinite, one of each sign has no mean (NaN)
        out["metrics"] = {m: float(np.mean([float(ev["metrics"][m]) for ev in evs])) for m in sorted(shared)
                          if all(isinstance(ev["metrics"][m], (int, float)) for ev in evs)}
    out["folds"] = len(evs)
    return out


def fold_mean(ledgers: Sequence[Ledger], names: Sequence[str]) -> tuple[Ledger, list[str]]:
    """The folds' mean as one ledger, and the evaluations left out (``phase 2 epoch 7 (only fold1, fold3)``).

    Args:
        ledgers: one per fold, in fold order.
        names: what to call each fold in messages (its directory).

    Raises:
        FoldError: no folds, folds with other phases or scores than the first's, or no evaluation all folds share.
    """
    if not ledgers:
        raise FoldError("no folds to average")
    first, name = ledgers[0], names[0]
    for ledger, other in zip(ledgers[1:], names[1:]):
        if ledger.score != first.score:
            raise FoldError(f"{other} ranks by {ledger.score!r}, {name} by {first.score!r}: not one cross-validation")
        if [_describe(p) for p in ledger.phases] != [_describe(p) for p in first.phases]:
            raise FoldError(f"{other}'s phases ({', '.join(str(p.name) for p in ledger.phases)}) are not {name}'s "
                            f"({', '.join(str(p.name) for p in first.phases)}): not one cross-validation")
    mean = Ledger(first.score)
    for i, record in enumerate(first.phases):
        records = [ledger.phases[i] for ledger in ledgers]
        summed = PhaseRecord(**{k: getattr(record, k) for k in PhaseRecord._DESCRIPTION})
        for k in PhaseRecord._COUNTERS:
            setattr(summed, k, sum(getattr(r, k) for r in records))
        ends = {r.ended_by for r in records}
        summed.ended_by = ends.pop() if len(ends) == 1 else "folds differ"
        mean.phases.append(summed)
    tables = [{_key(ev): ev for ev in ledger.evals} for ledger in ledgers]
    shared, partial = across_folds(tables)
    if not shared:
        raise FoldError(f"the folds ({', '.join(names)}) share no evaluation to average")
    mean.evals = [_mean_eval([t[key] for t in tables]) for key in shared]
    left_out = []
    for key in sorted(partial, key=str):
        which = ", ".join(Path(names[i]).name for i in partial[key])
        what = "weight average" if key[1] == "averaged" else f"{key[1]} {key[2]}"
        left_out.append(f"phase {key[0] + 1} {what} (only {which})")
    evaluations = [ledger.evaluation for ledger in ledgers]
    mean.evaluation = first.evaluation if all(e == first.evaluation for e in evaluations) else None
    return mean, left_out
