"""Evaluation metrics, computed with scikit-learn as AST does (``src/utilities/stats.py``).

- ``mAP``: the mean over classes of ``sklearn.metrics.average_precision_score`` on per-class scores
  (AudioSet). Classes without a positive example in the evaluation set have no defined AP and are left
  out of the mean (AST would average a meaningless value for them).
- ``acc``: top-1 accuracy, ``accuracy_score(argmax(target), argmax(score))``.
- ``mAUC``: mean ROC AUC over classes with both positives and negatives.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["METRICS", "mean_average_precision", "accuracy", "mean_auc", "compute_metrics"]

METRICS = ("mAP", "acc")


def _check(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    targets, scores = np.asarray(targets, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if targets.shape != scores.shape or targets.ndim != 2:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} must both be [clips, classes]")
    if not len(targets):
        raise ValueError("no clips to evaluate")
    return targets, scores


def mean_average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Mean average precision over the classes that have at least one positive clip."""
    from sklearn.metrics import average_precision_score

    targets, scores = _check(targets, scores)
    positive = (targets > 0.5).any(axis=0)
    if not positive.any():
        raise ValueError("mAP is undefined: no class has a positive clip")
    aps = [average_precision_score(targets[:, k] > 0.5, scores[:, k]) for k in np.flatnonzero(positive)]
    return float(np.mean(aps))


def accuracy(targets: np.ndarray, scores: np.ndarray) -> float:
    """Top-1 accuracy: the highest-scoring class against the (first) highest target."""
    from sklearn.metrics import accuracy_score

    targets, scores = _check(targets, scores)
    return float(accuracy_score(targets.argmax(axis=1), scores.argmax(axis=1)))


def mean_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC AUC over classes with positives and negatives (NaN if there is none)."""
    from sklearn.metrics import roc_auc_score

    targets, scores = _check(targets, scores)
    binary = targets > 0.5
    usable = [k for k in range(targets.shape[1]) if 0 < binary[:, k].sum() < len(binary)]
    if not usable:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(np.mean([roc_auc_score(binary[:, k], scores[:, k]) for k in usable]))


def compute_metrics(targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Every metric at once (what fine-tuning logs per epoch)."""
    return {"mAP": mean_average_precision(targets, scores), "acc": accuracy(targets, scores),
            "mAUC": mean_auc(targets, scores)}
