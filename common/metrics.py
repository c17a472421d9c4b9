"""Evaluation metrics, computed with scikit-learn as AST does (``src/utilities/stats.py``).

- ``mAP``: the mean over classes of ``sklearn.metrics.average_precision_score`` on per-class scores
  (AudioSet). Classes without a positive example in the evaluation set have no defined AP and are left
  out of the mean (AST would average a meaningless value for them); a class whose every clip is positive counts
  an AP of 1 whatever the model, as AST's (it matters on a few-clip set only).
- ``acc``: top-1 accuracy, ``accuracy_score(argmax(target), argmax(score))``.
- ``mAUC``: mean ROC AUC over classes with both positives and negatives.
- ``dprime``: the sensitivity index of that AUC, ``sqrt(2) * Phi^-1(mAUC)`` (AST's and HTS-AT's d').

The scores are what validation gives them (``finetune.classifier.metric_scores``: sigmoids, as AST's, in
float64). Scores that are not finite (a model whose outputs went NaN) are refused, with their count.

:func:`standard_error` says how much the score would move on another draw of as many clips, the
validation set's own noise (what the phase criteria of ``common.phases.criteria`` compare changes with):
accuracy is a proportion of the clips, so its binomial error (Agresti-Coull: never 0 on a finite set);
mAP has no closed form, so a bootstrap over the clips (each clip weighted by a Poisson(1) count, seeded,
so every rank and every run of the same scores gets the same value).
"""

from __future__ import annotations

import warnings
from statistics import NormalDist

import numpy as np

__all__ = ["METRICS", "mean_average_precision", "accuracy", "mean_auc", "d_prime", "compute_metrics", "standard_error"]

METRICS = ("mAP", "acc")


def _check(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    targets, scores = np.asarray(targets, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if targets.shape != scores.shape or targets.ndim != 2:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} must both be [clips, classes]")
    if not len(targets):
        raise ValueError("no clips to evaluate")
    bad = np.count_nonzero(~np.isfinite(scores))
    if bad:
        clips = np.count_nonzero(~np.isfinite(scores).all(axis=1))
        raise ValueError(f"{bad} of the {scores.size} scores ({clips} of {len(scores)} clips) are not finite (NaN or "
                         f"infinite): the model's outputs went non-finite")
    return targets, scores


def mean_average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Mean average precision over the classes that have at least one positive clip."""
    targets, scores = _check(targets, scores)
    positive = (targets > 0.5).any(axis=0)
    if not positive.any():
        raise ValueError("mAP is undefined: no class has a positive clip")
    from sklearn.metrics import average_precision_score  # lazy: scikit-learn takes 0.7 s; predict.py needs none

    aps = [average_precision_score(targets[:, k] > 0.5, scores[:, k]) for k in np.flatnonzero(positive)]
    return float(np.mean(aps))


def accuracy(targets: np.ndarray, scores: np.ndarray) -> float:
    """Top-1 accuracy: the highest-scoring class against the (first) highest target."""
    from sklearn.metrics import accuracy_score  # lazy: as above

    targets, scores = _check(targets, scores)
    return float(accuracy_score(targets.argmax(axis=1), scores.argmax(axis=1)))


def mean_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC AUC over classes with positives and negatives (NaN if there is none)."""
    targets, scores = _check(targets, scores)
    binary = targets > 0.5
    usable = [k for k in range(targets.shape[1]) if 0 < binary[:, k].sum() < len(binary)]
    if not usable:
        return float("nan")
    from sklearn.metrics import roc_auc_score  # lazy: as above

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(np.mean([roc_auc_score(binary[:, k], scores[:, k]) for k in usable]))


def d_prime(auc: float) -> float:
    """The sensitivity index d' of a ROC AUC: ``sqrt(2) * Phi^-1(auc)`` (NaN stays NaN; an AUC of 0 or 1 gives
    an infinite d')."""
    if not 0.0 < auc < 1.0:
        return float("nan") if np.isnan(auc) else float(np.copysign(np.inf, auc - 0.5))
    return float(np.sqrt(2.0) * NormalDist().inv_cdf(auc))


def compute_metrics(targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Every metric at once (what fine-tuning logs per epoch)."""
    auc = mean_auc(targets, scores)
    return {"mAP": mean_average_precision(targets, scores), "acc": accuracy(targets, scores),
            "mAUC": auc, "dprime": d_prime(auc)}


def _weighted_ap(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean average precision of every row of clip ``weights`` [draws, clips] (sklearn's definition: the
    precision at each threshold weighted by the recall gained there; tied scores form one threshold). A
    class whose positives all weigh 0 in a draw is left out of that draw's mean.

    Per class: ``AP = sum over positives i of w_i x precision(end of i's tie group) / sum of positive
    weights``, so only the cumulative weights at the positives' tie-group ends are needed.
    """
    dtype = np.float32 if weights.shape[1] * 16 < 2 ** 24 else np.float64  # sums of small counts stay exact
    weights = weights.astype(dtype)
    draws = weights.shape[0]
    total, used = np.zeros(draws), np.zeros(draws)
    for k in np.flatnonzero((targets > 0.5).any(axis=0)):
        order = np.argsort(-scores[:, k], kind="stable")
        ranked = scores[order, k]
        pos = np.flatnonzero(targets[order, k] > 0.5)
        ends = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last index of each tie group
        end = ends[np.searchsorted(ends, pos)]  # each positive's tie-group end
        w = weights[:, order]
        seen = np.cumsum(w, axis=1)[:, end]
        wpos = w[:, pos]
        tp = np.cumsum(wpos, axis=1)[:, np.searchsorted(pos, end, side="right") - 1]
        precision = np.divide(tp, seen, out=np.zeros_like(tp), where=seen > 0)
        positives = wpos.sum(axis=1, dtype=np.float64)
        has = positives > 0
        ap = np.divide((wpos * precision).sum(axis=1, dtype=np.float64), positives, out=np.zeros(draws), where=has)
        total += ap
        used += has
    return total / np.maximum(used, 1)


def standard_error(metric: str, targets: np.ndarray, scores: np.ndarray, draws: int = 50, seed: int = 0) -> float:
    """The standard error of ``metric`` (``acc`` or ``mAP``) on these clips: how far the same model's score
    would typically move on another set of as many clips.

    Args:
        metric: ``acc`` (binomial, Agresti-Coull) or ``mAP`` (Poisson bootstrap over the clips).
        targets, scores: [clips, classes], as for :func:`compute_metrics`.
        draws, seed: the bootstrap's resamples and seed (mAP).
    """
    targets, scores = _check(targets, scores)
    n = len(targets)
    if metric == "acc":
        p = (accuracy(targets, scores) * n + 2) / (n + 4)
        return float(np.sqrt(p * (1 - p) / (n + 4)))
    if metric == "mAP":
        weights = np.random.default_rng(seed).poisson(1.0, size=(draws, n)).astype(np.float64)
        return float(np.std(_weighted_ap(targets, scores, weights), ddof=1))
    raise ValueError(f"standard_error: no estimate for metric {metric!r} (known: {', '.join(METRICS)})")
