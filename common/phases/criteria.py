"""The criteria by which a phase ends itself, and the paper's "surpass the baseline" stop.

Criteria (each a small pure class with ``update``, ``state_dict`` and ``load_state_dict``):

- ``plateau`` (:class:`Plateau`): the validation score (the objective's ``score_name``, higher is better)
  has not improved on its best by more than ``min_delta`` for ``patience`` checks (Keras' early-stopping
  rule: a smaller gain does not move the best).
- ``efficiency`` (:class:`Efficiency`): the phase's gain of validation score per training FLOP, the
  least-squares slope over the last ``window + 1`` checks, has fallen below ``fraction`` times what the
  same FLOPs are expected to buy at the next phase's resolution. That expectation is the phase's own
  peak windowed slope times ``F_cur / F_next``, the ratio of training FLOPs per clip of this phase and
  the next. Why this estimate and not a probe of the next phase: (1) after a phase change the optimiser
  and the learning-rate schedule restart (paper section 2.2), so the next phase starts in the regime of
  a phase's early checks, where a clip of training moves the score about as much as it did early in this
  phase; a clip then costs ``F_next`` instead of ``F_cur``; (2) a probe (training a copy at the next
  resolution for a few steps) would spend FLOPs the saving must pay back, its first steps are warm-up
  noise, and it would have to be checkpointed for exact resume; the estimate is free, deterministic and
  a function of the recorded checks alone. The estimate is optimistic for the next phase when the model
  is already far along its learning curve; ``fraction`` below 1 keeps the coarse phase longer.
  The final phase has no next phase, so ``efficiency`` is for initial phases only.
- ``loss`` (:class:`LossSlope`): for runs without a validation set. The mean training loss since the
  previous check (all ranks) is smoothed (exponential moving average with weight ``smoothing`` on the
  past); the phase ends when the smoothed loss's relative decrease per check, over the last ``window``
  checks, stays below ``threshold`` for ``patience`` checks in a row.

A change counts only beyond the noise: ``plateau`` counts an improvement over its best only beyond
``noise`` standard errors of the difference, and ``efficiency`` takes a slope as the phase's peak only
beyond ``noise`` times the slope's standard error (:func:`margin`).

The standard errors come from the validation set itself, each time it is scored: the objective reports
one next to the score as ``<score>_se`` (accuracy: binomial on the clips scored; mAP: a bootstrap over
the clips; :func:`common.metrics.standard_error`; SSAST pretraining: the spread of its accuracy between
validation batches). Two checks' scores are taken as independent, so their difference has the error
``sqrt(se_a^2 + se_b^2)``. The ``loss`` criterion takes the standard error of the mean training loss over
the check's micro-batches (all ranks). ``noise`` defaults to 2 (a recipe parameter; 0 makes every
difference count). With 300 clips at 50 % accuracy a score's error is 2.9 points, so the first check
must be beaten by 8 points, twice; ten checks of pure noise show "learning" in 2 % of phases (one
check beyond the margin would in 12 %). An objective that reports no error makes every margin 0: then
only the warm-up and two checks strictly above the first gate a decision.

``train.stop_when_surpassing`` ends the final phase by :class:`Surpass` (``common.phases.phase_end``, which also
says when a criterion may decide). A phase's ``until:`` section is ``common.phases.until``'s.
"""

from __future__ import annotations

import math
from typing import Sequence

from common.phases.until import UntilConfig

__all__ = ["Plateau", "Efficiency", "LossSlope", "Surpass", "make_criterion", "margin", "mean_and_error"]


def margin(noise: float, a: float | None, b: float | None) -> float:
    """``noise`` x the standard error of the difference of two checks whose scores have standard errors
    ``a`` and ``b`` (None: unknown, taken as 0)."""
    return noise * math.hypot(a or 0.0, b or 0.0)


class Plateau:
    """No improvement of the validation score beyond ``min_delta`` and the noise for ``patience`` checks.

    Args:
        patience: checks without an improvement before the score counts as flat.
        min_delta: the least gain over the best that counts as an improvement.
        noise: a gain must also exceed this many standard errors of the difference between the new score
            and the best (so neither a lucky check raises the best nor an unlucky one resets the count).
    """
    needs_loss = False

    def __init__(self, patience: int, min_delta: float = 0.0, noise: float = 2.0) -> None:
        self.patience, self.min_delta, self.noise = patience, min_delta, noise
        self.best: float | None = None
        self.best_se: float | None = None
        self.bad = 0
        self.bar = min_delta  # the gain the last check had to beat

    def update(self, score: float, se: float | None = None) -> bool:
        """One check's score and its standard error; True when the score has plateaued."""
        self.bar = max(self.min_delta, margin(self.noise, se, self.best_se))
        if self.best is None or score > self.best + self.bar:
            self.best, self.best_se, self.bad = score, se, 0
        else:
            self.bad += 1
        return self.bad >= self.patience

    def note(self) -> str:
        return f"no gain over {self.best:.4g} by more than {self.bar:.3g} in {self.bad} checks"

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad, "best_se": self.best_se, "bar": self.bar}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad = state["best"], state["bad"]
        self.best_se, self.bar = state.get("best_se"), state.get("bar", self.min_delta)


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ``ys`` against ``xs`` (at least two distinct ``xs``)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0


def _slope_error(xs: Sequence[float], errors: Sequence[float | None]) -> float:
    """The standard error of :func:`_slope` when the ``ys`` have independent standard errors ``errors``."""
    mx = sum(xs) / len(xs)
    var = sum((x - mx) ** 2 for x in xs)
    return math.sqrt(sum((x - mx) ** 2 * (e or 0.0) ** 2 for x, e in zip(xs, errors))) / var if var > 0 else 0.0


class Efficiency:
    """The score gained per training FLOP has fallen below ``fraction`` of the next phase's estimate.

    The estimate rests on the phase's peak slope, and a slope becomes the peak only when it shows
    learning: positive and beyond ``noise`` times its own standard error (that of a least-squares slope
    through checks with the scores' standard errors). Before the phase has such a peak there is nothing to
    compare with and the criterion is not met, whatever the slope does.

    Args:
        window: checks spanned by the slope (its least-squares fit uses ``window + 1`` points).
        fraction: the share of the next phase's estimated gain per FLOP below which the phase ends.
        cost_ratio: ``F_cur / F_next``, training FLOPs per clip of this phase over the next one's.
        noise: standard errors of the slope a peak must exceed.
    """
    needs_loss = False

    def __init__(self, window: int, fraction: float, cost_ratio: float, noise: float = 2.0) -> None:
        if not cost_ratio > 0:
            raise ValueError(f"efficiency: the FLOPs ratio to the next phase must be positive, got {cost_ratio}")
        self.window, self.fraction, self.cost_ratio, self.noise = window, fraction, cost_ratio, noise
        # (phase FLOPs, score, its standard error) of the last window + 1 checks
        self.points: list[tuple[float, float, float | None]] = []
        self.peak: float | None = None  # the steepest windowed slope that showed learning (score per FLOP)
        self.slope: float | None = None

    def update(self, score: float, flops: float, se: float | None = None) -> bool:
        """One check's score (and its standard error) at the phase's cumulative training FLOPs; True when
        the phase should end."""
        self.points = (self.points + [(float(flops), float(score), se)])[-(self.window + 1):]
        if len(self.points) <= self.window:
            return False
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        self.slope = _slope(xs, ys)
        if self.slope > 0 and self.slope > self.noise * _slope_error(xs, [p[2] for p in self.points]):
            self.peak = self.slope if self.peak is None else max(self.peak, self.slope)
        return self.peak is not None and self.slope < self.threshold()

    def threshold(self) -> float:
        """``fraction`` x the gain per FLOP expected at the next phase: peak slope x ``F_cur / F_next``."""
        return self.fraction * (self.peak or 0.0) * self.cost_ratio

    def note(self) -> str:
        return (f"gain per FLOP {self.slope:.3g} below {self.fraction:g} x the next phase's estimate "
                f"{(self.peak or 0.0) * self.cost_ratio:.3g} (peak {self.peak:.3g} x FLOPs ratio "
                f"{self.cost_ratio:.3g})")

    def state_dict(self) -> dict:
        return {"points": [list(p) for p in self.points], "peak": self.peak, "slope": self.slope}

    def load_state_dict(self, state: dict) -> None:
        self.points = [(p[0], p[1], p[2] if len(p) > 2 else None) for p in state["points"]]
        self.peak, self.slope = state["peak"], state["slope"]


class LossSlope:
    """The smoothed training loss has stopped falling: relative decrease per check below ``threshold``.

    Args:
        window: checks between the two smoothed values compared.
        threshold: relative decrease per check below which the loss counts as flat.
        smoothing: weight of the past in the exponential moving average.
        patience: flat checks in a row before the phase ends.
    """
    needs_loss = True

    def __init__(self, window: int, threshold: float, smoothing: float, patience: int = 1) -> None:
        self.window, self.threshold, self.smoothing, self.patience = window, threshold, smoothing, patience
        self.smoothed: list[float] = []  # the last window + 1 smoothed losses
        self.flat = 0
        self.decrease: float | None = None

    def update(self, loss: float) -> bool:
        """The mean training loss since the previous check; True when the loss has flattened."""
        ema = loss if not self.smoothed else self.smoothing * self.smoothed[-1] + (1 - self.smoothing) * loss
        self.smoothed = (self.smoothed + [ema])[-(self.window + 1):]
        if len(self.smoothed) <= self.window:
            return False
        old = self.smoothed[0]
        self.decrease = (old - ema) / (self.window * max(abs(old), 1e-12))
        self.flat = self.flat + 1 if self.decrease < self.threshold else 0
        return self.flat >= self.patience

    def note(self) -> str:
        return (f"smoothed training loss fell {self.decrease:.3%} per check (< {self.threshold:.3%}) for "
                f"{self.flat} checks")

    def state_dict(self) -> dict:
        return {"smoothed": list(self.smoothed), "flat": self.flat, "decrease": self.decrease}

    def load_state_dict(self, state: dict) -> None:
        self.smoothed, self.flat, self.decrease = list(state["smoothed"]), state["flat"], state["decrease"]


class Surpass:
    """The paper's stop (section 3.3): the first score strictly above the baseline run's best."""
    def __init__(self, target: float, source: str = "the baseline") -> None:
        self.target, self.source = target, source

    def update(self, score: float) -> bool:
        return score > self.target

    def note(self, score: float) -> str:
        return f"score {score:.4g} surpassed {self.source}'s best {self.target:.4g}"


def mean_and_error(total: float, squares: float, count: float) -> tuple[float | None, float | None]:
    """The mean of ``count`` values from their sum and sum of squares, and its standard error (None for no
    values; 0 for one, whose spread is unknown)."""
    if not count:
        return None, None
    mean = total / count
    if count < 2:
        return mean, 0.0
    var = max(0.0, (squares - total * mean) / (count - 1))
    return mean, math.sqrt(var / count)


def make_criterion(until: UntilConfig, cost_ratio: float | None = None):
    """The criterion object of ``until`` (``cost_ratio``: ``F_cur / F_next``, for ``efficiency``)."""
    if until.criterion == "plateau":
        return Plateau(until.patience, until.min_delta, until.noise)
    if until.criterion == "efficiency":
        if cost_ratio is None:
            raise ValueError("until.criterion: efficiency compares with the next phase; the final phase has none")
        return Efficiency(until.window, until.fraction, cost_ratio, until.noise)
    if until.criterion == "loss":
        return LossSlope(until.window, until.threshold, until.smoothing, until.patience)
    return None
