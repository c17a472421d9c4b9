"""Weight averaging (AST's "WA"): the mean of the final phase's epoch weights, from a chosen epoch on.

AST averages the state dicts of epochs ``wa_start..wa_end`` of a run (its ``src/traintest.py``); HTS-AT
averages its best checkpoints by validation mAP (the paper: the top 15). Here the epochs of the final phase
from ``train.weight_average_from`` on are kept as they end (one safetensors file each, under
``RUN/average/``) and averaged (in float64) when the run ends, all of them or the ``weight_average_top``
best by validation score; the trainer then evaluates and exports the average as the run's model.

A final phase that may end early (an ``until`` section, ``train.stop_when_surpassing``) takes
``weight_average_top``: the best K of the epochs that ran (all of them if fewer than K ran), every epoch up to
the phase's cap being kept until K others rank above it (then it cannot be among the best any more). A range from
``weight_average_from`` on needs the phase's length in advance and is refused there
(``common.phases.until.check_schedule``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from common.models.exports import read_weights, save_weights
from common.phases.config import PhaseConfig

__all__ = ["averaged_epochs", "average_state_dicts", "WeightAverage"]


def averaged_epochs(start: int | None, phases: Sequence[PhaseConfig]) -> list[int]:
    """The final phase's epochs (1-based) that weight averaging may use: ``start`` to its last epoch (its cap,
    ``until.max``, when it may run past its planned length).

    Empty when averaging is off (``start`` None) or the run is iteration-based.
    """
    last = phases[-1]
    if start is None or last.iteration_based:
        return []
    return list(range(start, last.max_length + 1))


def average_state_dicts(states: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts with the same keys, computed in float64, returned in float32."""
    total, count = None, 0
    for state in states:
        if total is not None and state.keys() != total.keys():
            raise ValueError(f"cannot average state dicts with different keys: {sorted(state.keys() ^ total.keys())[:5]}")
        total = {k: v.double() for k, v in state.items()} if total is None else \
            {k: total[k] + state[k].double() for k in total}
        count += 1
    if total is None:
        raise ValueError("no state dicts to average")
    return {k: (v / count).float() for k, v in total.items()}


def _ranking(scores: dict[int, float]):
    """Sort key of epochs by score, best first, the earlier epoch first in a tie, an undefined (NaN) score last: a
    NaN compares with nothing, and would leave the order, so which epochs are averaged and which removed, to chance."""
    return lambda e: (-scores[e] if math.isfinite(scores[e]) else math.inf, e)


class WeightAverage:
    """Keeps the epoch weights weight averaging needs and averages them.

    Args:
        folder: where the epoch weights go (``RUN/average``).
        epochs: the final phase's epochs to keep (:func:`averaged_epochs`).
        top: average only the ``top`` best of them by validation score (None: all).
    """

    def __init__(self, folder: Path, epochs: Sequence[int], top: int | None = None) -> None:
        self.folder = Path(folder)
        self.epochs = list(epochs)
        self.top = top

    def _file(self, epoch: int) -> Path:
        return self.folder / f"epoch{epoch:03d}.safetensors"

    def keep(self, model: nn.Module, epoch: int) -> None:
        """Save the final phase's ``epoch`` weights if the average uses them (call on one rank)."""
        if epoch in self.epochs:
            save_weights(self._file(epoch), model.state_dict(), {})

    def chosen(self, scores: dict[int, float], ran: int | None = None, kept_only: bool = False) -> list[int]:
        """The epochs to average: all kept ones, or the ``top`` best by ``scores`` (epoch -> validation score;
        the earlier epoch wins a tie), in epoch order.

        Args:
            scores: the final phase's validation score per epoch.
            ran: the epochs the final phase ran (None: all of :attr:`epochs`); an early end averages the best
                ``top`` of those, or all of them when fewer ran.
            kept_only: the best ``top`` of the epochs whose weights are still kept: :meth:`prune` removed those
                that ``top`` others outscored, and a resume from an older checkpoint that went otherwise (not
                bitwise: another number of ranks, a GPU's kernels) may rank one of them among the best now.
        """
        epochs = [e for e in self.epochs if ran is None or e <= ran]
        if not epochs:
            raise ValueError(f"weight averaging: the final phase ended after {ran} epochs, before the first epoch "
                             f"to average ({self.epochs[0]})")
        if self.top is None:
            return epochs
        if kept_only:
            epochs = [e for e in epochs if self._file(e).is_file()] or epochs
        missing = [e for e in epochs if e not in scores]
        if missing:
            raise ValueError(f"weight averaging of the top {self.top} epochs: no validation score for epochs {missing}")
        ranked = sorted(epochs, key=_ranking(scores))
        return sorted(ranked[: self.top])

    def prune(self, scores: dict[int, float]) -> list[int]:
        """Remove the kept weights of the epochs that can no longer be among the ``top`` best (call on one rank,
        after a validation): ``top`` scored epochs already rank above each of them (by :meth:`chosen`'s rule), and
        later epochs only add rivals. A run of hundreds of epochs kept every epoch's weights to its end (300 files
        for 5 averaged). Returns the epochs removed; nothing without ``top`` (a range averages every kept epoch)."""
        if self.top is None:
            return []
        ranked = sorted((e for e in self.epochs if e in scores), key=_ranking(scores))
        gone = [e for e in ranked[self.top:] if self._file(e).is_file()]
        for epoch in gone:
            self._file(epoch).unlink(missing_ok=True)
        return gone

    def average(self, epochs: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """The mean of the kept weights of ``epochs`` (default: every kept epoch)."""
        files = [self._file(e) for e in (self.epochs if epochs is None else epochs)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"weight averaging: epoch weights missing: {', '.join(missing)}")
        return average_state_dicts(read_weights(f)[0] for f in files)
