"""AST's balanced sampling (``data.balanced``): each clip drawn with a weight summed over its labels of 1000 over
the label's clip count (:func:`balanced_weights`, the official ``gen_weight_file``), an epoch being as many draws,
with replacement, as the set has clips (:class:`WeightedCutSampler`)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

import numpy as np

from common.data.manifest_index import ManifestIndex

__all__ = ["clip_labels", "balanced_weights", "WeightedCutSampler"]

log = logging.getLogger(__name__)


def clip_labels(cuts) -> list[tuple[str, ...]]:
    """Each clip's labels, in order, read once: from an on-disk index's cache of them (:meth:`ManifestIndex.labels`:
    AudioSet-2M's records are read once per manifest, about a minute), the cuts otherwise; equal labels share one
    string."""
    if isinstance(cuts, ManifestIndex):
        return cuts.labels()
    shared: dict[str, str] = {}
    return [tuple(shared.setdefault(label, label) for label in (cut.custom or {}).get("labels", [])) for cut in cuts]


def balanced_weights(cuts, classes: Sequence[str]) -> list[float]:
    """AST's balanced-sampling weights: a clip weighs ``sum(1000 / (count(label) + 0.01))`` over its labels
    (``cuts``: a CutSet held in memory or a :class:`~common.data.manifest_index.ManifestIndex`)."""
    labels = clip_labels(cuts)
    counts = Counter(label for row in labels for label in row)
    missing = [c for c in classes if c not in counts]
    if missing:
        log.info("balanced sampler: %d classes have no clip (e.g. %s)", len(missing), missing[0])
    return [sum(1000.0 / (counts[label] + 0.01) for label in row) or 1e-3 for row in labels]


class WeightedCutSampler:
    """Balanced sampling as AST: each epoch draws ``len(cuts)`` clips *with replacement*, with
    probability proportional to their weights, reproducibly from ``(seed, epoch)``, in batches of
    ``batch_size`` (the global stream: :func:`common.data.shards.equal_shards` deals it to the ranks).

    (Lhotse's ``WeightedSimpleCutSampler`` draws without replacement from numpy's global random state,
    which neither matches AST nor can be resumed exactly.) From an on-disk index its batches are clip numbers
    (``yields_numbers``), read only for the batches a rank keeps, as
    :class:`common.data.manifest_index.IndexShuffleSampler`'s.
    """
    def __init__(self, cuts, weights: Sequence[float], batch_size: int, *, drop_last: bool, seed: int) -> None:
        self.cuts = cuts if not cuts.is_lazy else cuts.to_eager()
        self.yields_numbers = isinstance(self.cuts, ManifestIndex)
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.cuts),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"need one non-negative weight per clip ({len(self.cuts)}), got {w.shape}")
        self.p = w / w.sum()
        self.batch_size, self.drop_last, self.seed = batch_size, drop_last, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        draw = np.random.default_rng([self.seed, self.epoch]).choice(len(self.p), size=len(self.p), p=self.p)
        for start in range(0, len(draw), self.batch_size):
            chunk = draw[start : start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield chunk.tolist() if self.yields_numbers else [self.cuts[int(i)] for i in chunk]
