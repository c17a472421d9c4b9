"""When a phase ends by itself: transition criteria, hard bounds and the paper's "surpass the baseline" stop.

A recipe phase may carry ``until: {criterion: ..., min: N, max: N, ...}`` (:class:`UntilConfig`): the phase
then ends at the first *check* at which its criterion is met, never before ``min`` and at the latest at
``max`` (steps or epochs, the phase's own unit; ``max`` defaults to the phase's planned length). A check
is a validation round: every ``train.eval_every`` steps in iteration-based phases, every epoch in
epoch-based ones (runs without a validation set still have the rounds, for the ``loss`` criterion).

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

Evidence, not noise. A validation score measured on a few hundred clips moves by a few points between
equal models, and a phase's first checks fall in its learning-rate warm-up, so (:class:`PhaseEnd`) a
criterion decides nothing

- while the phase is in its warm-up: fewer than ``optim.warmup_steps`` optimiser steps into the phase
  (the schedule restarts with every phase);
- before the phase has shown that it learns: two checks in a row (:data:`EVIDENCE_CHECKS`) whose score
  lies above the phase's first check's by more than ``noise`` standard errors of the difference
  (``loss``: whose training loss lies below the first check's by as much), so not before the third
  check. A phase that has not shown it by its planned length ends there, not at a larger ``max`` (there
  for a criterion to use), and the ledger's ``end_note`` says so (not with ``train.stop_when_surpassing``
  on the same phase, whose rule may run the final phase to ``max``);

and a change counts only beyond the noise: ``plateau`` counts an improvement over its best only beyond
``noise`` standard errors of the difference, and ``efficiency`` takes a slope as the phase's peak only
beyond ``noise`` times the slope's standard error.

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

``train.stop_when_surpassing: RUN_DIR`` (:class:`Surpass`) ends the *final* phase at the first check whose
score strictly exceeds the best per-epoch score in that run's ``ledger.json`` (paper section 3.3; the
target, and when a baseline is comparable, are ``common.phases.baseline``'s); with ``until.max`` above the
planned length the final phase may also run past it until it surpasses. :class:`PhaseEnd` combines the
bounds, the criterion and the surpass rule for one phase; the trainer asks it at every check (rank 0
decides, every rank receives the decision) and checkpoints its state, so a resumed run ends its phase at
the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Literal, Sequence

import torch

__all__ = ["UntilConfig", "Plateau", "Efficiency", "LossSlope", "Surpass", "PhaseEnd", "Decision",
           "make_criterion", "check_schedule", "describe_ends", "END_REASONS", "EVIDENCE_CHECKS"]

Criterion = Literal["plateau", "efficiency", "loss"]

# what a phase's ledger record may give as the reason it ended
END_REASONS = ("length", "cap", "plateau", "efficiency", "loss", "surpassed")

# checks in a row beyond the noise past a phase's first check that show it learns. In ten checks of pure
# noise (300 clips, noise 2), one such check comes by chance in 12 % of phases, two in a row in 2 %
EVIDENCE_CHECKS = 2

# the parameters each criterion reads (the others must keep their defaults)
_PARAMETERS = {
    "plateau": ("patience", "min_delta", "noise"),
    "efficiency": ("window", "fraction", "noise"),
    "loss": ("window", "threshold", "smoothing", "patience", "noise"),
    None: (),
}


@dataclass(frozen=True)
class UntilConfig:
    """How a phase may end before (or after) its planned length.

    Args:
        criterion: ``plateau``, ``efficiency`` or ``loss`` (see the module docstring); none: only the
            bounds and ``train.stop_when_surpassing`` (final phase) end the phase.
        min: the phase never ends before this many steps / epochs.
        max: the phase ends here at the latest (default: its planned ``steps`` / ``epochs``).
        patience: plateau: checks without improvement; loss: checks in a row below ``threshold``.
        min_delta: plateau: the least gain of the score over its best that counts as an improvement.
        window: efficiency / loss: checks spanned by the sliding window.
        fraction: efficiency: end when the slope is below this fraction of the next phase's estimate.
        threshold: loss: relative decrease of the smoothed loss per check below which it has flattened.
        smoothing: loss: weight of the past in the moving average (0: no smoothing).
        noise: a difference between two checks counts only beyond this many standard errors of the score
            (of the training loss for ``loss``): the rise that shows the phase learns, a ``plateau``
            improvement, an ``efficiency`` peak (module docstring; 0: every difference counts).
    """

    criterion: Criterion | None = None
    min: int = 0
    max: int | None = None
    patience: int = 2
    min_delta: float = 0.0
    window: int = 2
    fraction: float = 1.0
    threshold: float = 0.01
    smoothing: float = 0.5
    noise: float = 2.0

    def __post_init__(self) -> None:
        if self.min < 0:
            raise ValueError(f"until.min must be >= 0, got {self.min}")
        if self.max is not None and (self.max < 1 or self.max < self.min):
            raise ValueError(f"until.max must be >= 1 and >= until.min ({self.min}), got {self.max}")
        if self.patience < 1 or self.window < 1:
            raise ValueError(f"until.patience and until.window must be >= 1, got {self.patience}, {self.window}")
        if self.min_delta < 0 or self.fraction <= 0 or self.threshold < 0:
            raise ValueError("until.min_delta and until.threshold must be >= 0 and until.fraction > 0")
        if not self.noise >= 0:  # also catches NaN
            raise ValueError(f"until.noise must be >= 0 (standard errors), got {self.noise}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"until.smoothing must be in [0, 1), got {self.smoothing}")
        used = _PARAMETERS[self.criterion]
        for f in fields(self):
            if f.name in ("criterion", "min", "max") or f.name in used:
                continue
            if getattr(self, f.name) != f.default:
                users = [c for c, names in _PARAMETERS.items() if f.name in names]
                raise ValueError(f"until.{f.name}: not used by criterion {self.criterion!r} (only by "
                                 f"{' and '.join(map(str, users))})")

    def describe(self) -> str:
        """The criterion and its parameters in words, e.g. ``plateau (patience 2, min_delta 0.0)``."""
        if self.criterion is None:
            return "no criterion"
        params = ", ".join(f"{name} {getattr(self, name)}" for name in _PARAMETERS[self.criterion])
        return f"{self.criterion} ({params})"


# ------------------------------------------------------------------------------------------ criteria
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
    needs_score, needs_loss = True, False

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
    needs_score, needs_loss = True, False

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
    needs_score, needs_loss = False, True

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


# ------------------------------------------------------------------------------------- one phase's end
@dataclass(frozen=True)
class Decision:
    """Why and where a phase ended: ``reason`` (one of :data:`END_REASONS`), a sentence, and the count
    (steps or epochs of the phase) at which it ended."""
    reason: str
    note: str
    at: int


class PhaseEnd:
    """Decides, at each check of one phase, whether the phase ends there.

    Args:
        until: the phase's ``until`` section (None: a fixed length).
        length: the phase's planned length (steps or epochs).
        unit: ``steps`` or ``epochs``.
        cost_ratio: ``F_cur / F_next`` (None for the final phase).
        target: the baseline's best score the final phase stops at (``train.stop_when_surpassing``).
        target_source: what ``target`` came from, for the notes.
        index: the phase's 0-based index.
        warmup_steps: the phase's learning-rate warm-up (``optim.warmup_steps``): no criterion decides
            before this many optimiser steps of the phase.
    """

    def __init__(self, until: UntilConfig | None, length: int, unit: str, cost_ratio: float | None = None,
                 target: float | None = None, target_source: str = "the baseline", index: int = 0,
                 warmup_steps: int = 0) -> None:
        self.until, self.length, self.unit, self.index = until, length, unit, index
        self.warmup_steps = warmup_steps
        self.criterion = make_criterion(until, cost_ratio) if until is not None else None
        self.surpass = Surpass(target, target_source) if target is not None else None
        self.loss_sum, self.loss_sq, self.loss_count = 0.0, 0.0, 0
        self.checks = 0
        self.start: list | None = None  # [value, standard error] of the phase's first check (score or loss)
        self.above = 0  # checks in a row beyond the noise past the first one
        self.learned: int | None = None  # the check at which the phase had shown that it learns
        self.decision: Decision | None = None

    @classmethod
    def for_phase(cls, phases: Sequence, index: int, stop_target: dict | None, state: dict,
                  flops_per_sample: Callable[[int], float], warmup_steps: int = 0,
                  pending_losses: bool = True) -> "PhaseEnd":
        """The :class:`PhaseEnd` of phase ``index`` of a run.

        Args:
            phases: the run's :class:`common.phases.config.PhaseConfig` list.
            index: the phase.
            stop_target: the ledger's ``stop_when_surpassing`` record (``run``, ``best``), for the final phase.
            state: the checkpointed state (:meth:`saved_state`; empty for a fresh phase).
            flops_per_sample: training FLOPs per clip of phase ``i`` (asked only for ``efficiency``).
            warmup_steps: as for the constructor.
            pending_losses: take the state's pending training losses (rank 0: they are every rank's, summed
                by :meth:`saved_state`); the other ranks start from none.
        """
        phase, last = phases[index], len(phases) - 1
        ratio = None
        if index < last and phase.until is not None and phase.until.criterion == "efficiency":
            ratio = flops_per_sample(index) / flops_per_sample(index + 1)
        target = stop_target if index == last else None
        end = cls(phase.until, phase.length, "steps" if phase.iteration_based else "epochs", ratio,
                  target["best"] if target else None, target["run"] if target else "the baseline", index,
                  warmup_steps)
        end.load_state_dict(state, pending_losses)
        return end

    def check(self, dist, at: int, score: float | None, flops: float, score_se: float | None = None,
              step: int | None = None) -> Decision | None:
        """A check of the phase on every rank (collective): the training loss and its spread are summed over
        ranks, rank 0 decides (:meth:`observe`) and every rank takes its state.

        Args:
            dist: the :class:`common.system.distributed.Dist` of this process.
            at, score, flops, score_se, step: as :meth:`observe`.

        Returns:
            The decision if the phase ends at this check, else None.
        """
        if not self.adaptive or self.decision is not None:
            return None
        loss = loss_se = None
        if self.needs_loss:

            moments = dist.all_reduce_sum(torch.tensor(self.pending_moments(), dtype=torch.float64,
                                                       device=dist.device)).tolist()
            loss, loss_se = mean_and_error(*moments)
        if dist.is_main:
            self.observe(at, score, flops, loss, score_se=score_se, loss_se=loss_se, step=step)
        self.load_state_dict(dist.broadcast_object(self.state_dict()))
        return self.decision

    @property
    def max_length(self) -> int:
        return self.until.max if self.until is not None and self.until.max is not None else self.length

    @property
    def adaptive(self) -> bool:
        """Whether anything but the length may end the phase."""
        return self.criterion is not None or self.surpass is not None

    @property
    def needs_loss(self) -> bool:
        return getattr(self.criterion, "needs_loss", False)

    def add_loss(self, loss) -> None:
        """A micro-batch's training loss on this rank (a number or a 0-d tensor; the ``loss`` criterion's
        input, ignored by the others)."""
        if self.needs_loss:  # a tensor stays on its device (summed there: no host sync per step)
            value = loss.detach().double() if hasattr(loss, "detach") else float(loss)
            self.loss_sum = self.loss_sum + value
            self.loss_sq = self.loss_sq + value * value
            self.loss_count += 1

    def pending_loss(self) -> tuple[float, int]:
        """This rank's loss sum and count since the previous check (summed over ranks by the caller)."""
        return float(self.loss_sum), self.loss_count

    def pending_moments(self) -> tuple[float, float, int]:
        """This rank's loss sum, sum of squares and count since the previous check (for the loss's spread)."""
        return float(self.loss_sum), float(self.loss_sq), self.loss_count

    def observe(self, at: int, score: float | None = None, flops: float = 0.0, loss: float | None = None, *,
                score_se: float | None = None, loss_se: float | None = None,
                step: int | None = None) -> Decision | None:
        """One check at ``at`` steps / epochs of the phase.

        Args:
            at: the phase's steps (iteration-based) or completed epochs (epoch-based) so far.
            score: the validation score (None without a validation set).
            flops: the phase's cumulative training FLOPs (all ranks).
            loss: the mean training loss since the previous check (all ranks), for ``loss``.
            score_se: the score's standard error on the validation set (None: unknown, taken as 0).
            loss_se: the standard error of ``loss`` (the spread of the micro-batch losses it averages).
            step: the phase's optimiser steps so far (None: past the warm-up).

        Returns:
            The decision if the phase ends here (also kept in :attr:`decision`), else None.
        """
        self.checks += 1
        self.loss_sum, self.loss_sq, self.loss_count = 0.0, 0.0, 0
        if self.decision is not None:
            return self.decision
        met, crit = False, self.criterion
        if isinstance(crit, Plateau) and score is not None:
            met = crit.update(score, score_se)
            self._evidence(score, score_se)
        elif isinstance(crit, Efficiency) and score is not None:
            met = crit.update(score, flops, score_se)
            self._evidence(score, score_se)
        elif isinstance(crit, LossSlope) and loss is not None and math.isfinite(loss):
            met = crit.update(loss)
            self._evidence(loss, loss_se)
        # no decision during the warm-up, nor before the phase has shown that it learns
        met = met and self.learned is not None and not (step is not None and step < self.warmup_steps)
        floor = self.until.min if self.until is not None else 0
        if at < floor:
            return None
        if self.surpass is not None and score is not None and self.surpass.update(score):  # the paper's rule first
            self.decision = Decision("surpassed", self.surpass.note(score), at)
        elif met:
            self.decision = Decision(self.until.criterion, crit.note(), at)
        elif crit is not None and self.surpass is None and self.learned is None and self.length <= at < self.max_length:
            # a phase that has not shown learning runs to its plan, not to a max meant for a criterion to use
            self.decision = Decision("length", f"planned length of {self.length} {self.unit} ({self._no_evidence()})",
                                     at)
        return self.decision

    def _evidence(self, value: float, se: float | None) -> None:
        """The phase's first check sets where it began; :data:`EVIDENCE_CHECKS` later ones in a row, each
        beyond ``noise`` standard errors of the difference past it (above for a score, below for the
        ``loss`` criterion's loss), show that the phase learns."""
        if self.start is None:
            self.start = [value, se]
            return
        gain = self.start[0] - value if self.needs_loss else value - self.start[0]
        self.above = self.above + 1 if gain > margin(self.until.noise, se, self.start[1]) else 0
        if self.learned is None and self.above >= EVIDENCE_CHECKS:
            self.learned = self.checks

    def _no_evidence(self) -> str:
        if self.start is None:
            return "no check to judge it by"
        what = "training loss never fell below" if self.needs_loss else "score never rose above"
        return (f"its {what} its first check's {self.start[0]:.4g} by more than {self.until.noise:g} standard "
                f"errors: no evidence of learning, so the criterion did not decide")

    def end_reason(self, at: int) -> Decision:
        """Why the phase ended at ``at``: its decision, or its length / cap."""
        if self.decision is not None:
            return self.decision
        if not self.adaptive:
            return Decision("length", f"planned length of {self.length} {self.unit}", at)
        rule = self.until.describe() if self.criterion is not None else "no criterion"
        if self.criterion is not None and self.learned is None:
            rule += f"; {self._no_evidence()}"
        if self.surpass is not None:
            rule += f"; did not surpass {self.surpass.source}'s best {self.surpass.target:.4g}"
        return Decision("cap", f"reached its cap of {self.max_length} {self.unit} ({rule})", at)

    def state_dict(self) -> dict:
        """JSON-able state (checkpointed with the trainer's state)."""
        return {"checks": self.checks, "loss_sum": float(self.loss_sum), "loss_sq": float(self.loss_sq),
                "loss_count": self.loss_count, "start": self.start, "above": self.above, "learned": self.learned,
                "criterion": self.criterion.state_dict() if self.criterion is not None else None,
                "decision": None if self.decision is None else [self.decision.reason, self.decision.note,
                                                                 self.decision.at]}

    def saved_state(self, dist) -> dict:
        """:meth:`state_dict` for a checkpoint, with the pending training losses of every rank summed (collective
        where the ``loss`` criterion counts them): only rank 0's state is saved, and a resumed run's rank 0
        carries the sums (``for_phase(..., pending_losses=dist.is_main)``), so that the next check judges the
        losses of all ranks as an uninterrupted run does. The running run takes the same sums (rank 0 all of
        them, the others none), so that its next check adds the same numbers in the same order as a resumed
        one: the two judge bitwise the same."""
        state = self.state_dict()
        if self.needs_loss and self.decision is None:
            total, squares, count = dist.all_reduce_sum(torch.tensor(self.pending_moments(), dtype=torch.float64,
                                                                     device=dist.device)).tolist()
            state.update(loss_sum=total, loss_sq=squares, loss_count=int(round(count)))
            self.loss_sum, self.loss_sq, self.loss_count = \
                (total, squares, state["loss_count"]) if dist.is_main else (0.0, 0.0, 0)
        return state

    def load_state_dict(self, state: dict, pending_losses: bool = True) -> None:
        """Take ``state``; ``pending_losses=False`` leaves out its losses since the last check (see
        :meth:`saved_state`)."""
        if not state:  # a fresh phase
            return
        self.checks, self.loss_sum, self.loss_count = state["checks"], state["loss_sum"], state["loss_count"]
        self.loss_sq, self.start = state.get("loss_sq", 0.0), state.get("start")
        if not pending_losses:
            self.loss_sum, self.loss_sq, self.loss_count = 0.0, 0.0, 0
        self.above, self.learned = state.get("above", 0), state.get("learned")
        if self.criterion is not None and state.get("criterion") is not None:
            self.criterion.load_state_dict(state["criterion"])
        self.decision = Decision(*state["decision"]) if state.get("decision") else None


# ------------------------------------------------------------------------------- recipe-level checks
def check_schedule(phases: Sequence, stop_when_surpassing: str | None, has_valid: bool,
                   weight_average_from: int | None = None, eval_every: int | None = None) -> None:
    """Rules that span phases and the train section; raises ``ValueError`` naming the key.

    Args:
        phases: the recipe's :class:`common.phases.config.PhaseConfig` list.
        stop_when_surpassing: ``train.stop_when_surpassing``.
        has_valid: whether the run has a validation set.
        weight_average_from: ``train.weight_average_from``.
        eval_every: ``train.eval_every`` (iteration-based phases are judged at its multiples).
    """
    last = len(phases) - 1
    for i, phase in enumerate(phases):
        until = phase.until
        if until is None:
            continue
        key = f"phases.{i}.until"
        if until.criterion == "efficiency" and i == last:
            raise ValueError(f"{key}.criterion: efficiency compares with the next phase and the final phase has "
                             "none; use plateau or loss")
        if until.criterion in ("plateau", "efficiency") and not has_valid:
            raise ValueError(f"{key}.criterion: {until.criterion} reads the validation score and the run has no "
                             "validation set; use loss")
        if phase.iteration_based and eval_every is not None and eval_every > phase.max_length:
            raise ValueError(f"{key}: the phase is judged every train.eval_every = {eval_every} steps, after its "
                             f"max ({phase.max_length}); lower train.eval_every")
        if until.criterion is None and (i != last or not stop_when_surpassing):
            raise ValueError(f"{key}: no criterion, so the phase would simply run to its max; give "
                             f"until.criterion{' or train.stop_when_surpassing' if i == last else ''}")
    if stop_when_surpassing and not has_valid:
        raise ValueError("train.stop_when_surpassing: the run has no validation set to compare with")
    if weight_average_from is not None and phases and (phases[-1].until is not None or stop_when_surpassing):
        raise ValueError("train.weight_average_from: averaging a range of epochs needs the final phase's length in "
                         "advance; it cannot be combined with an until section on the final phase or "
                         "train.stop_when_surpassing (train.weight_average_top can: the best K of the epochs that "
                         "ran)")


def describe_ends(phases: Sequence, stop_when_surpassing: str | None = None) -> list[str]:
    """How the phases of a recipe end, in words (for ``--dry-run``); empty when every phase has a fixed length."""
    lines = []
    last = len(phases) - 1
    for i, phase in enumerate(phases):
        unit = "steps" if phase.iteration_based else "epochs"
        rule = []
        if phase.until is not None and phase.until.criterion:
            rule.append(phase.until.describe())
        if i == last and stop_when_surpassing:
            rule.append(f"the first evaluation above the best of {stop_when_surpassing}")
        if rule:
            lo = phase.until.min if phase.until is not None else 0
            line = (f"{phase.label(i)}: ends at {' or '.join(rule)}, after {lo} to {phase.max_length} {unit} "
                    f"(planned {phase.length})")
            early = not phase.iteration_based and phase.length <= EVIDENCE_CHECKS  # shorter than the evidence
            if early and phase.until is not None and phase.until.criterion and not (i == last and stop_when_surpassing):
                line += (f"; a phase shows learning at its round {EVIDENCE_CHECKS + 1} at the earliest, so this one "
                         f"ends at its plan")
            lines.append(line)
    return lines
