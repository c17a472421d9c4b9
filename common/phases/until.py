"""A phase's ``until:`` section (:class:`UntilConfig`, validated) and the rules of a recipe's phase ends.

A recipe phase may carry ``until: {criterion: ..., min: N, max: N, ...}`` (:class:`UntilConfig`): the phase
then ends at the first *check* at which its criterion is met, never before ``min`` and at the latest at
``max`` (steps or epochs, the phase's own unit; ``max`` defaults to the phase's planned length). A check
is a validation round: every ``train.eval_every`` steps in iteration-based phases, every epoch in
epoch-based ones (runs without a validation set still have the rounds, for the ``loss`` criterion).

The criteria are ``common.phases.criteria``'s; :class:`common.phases.phase_end.PhaseEnd` applies them at each
check, after the phase's warm-up and once the phase has shown that it learns (:data:`EVIDENCE_CHECKS`).
:func:`check_schedule` checks the rules that span the phases and the train section, :func:`describe_ends` says how
a recipe's phases end (``--dry-run``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, Sequence

__all__ = ["UntilConfig", "check_schedule", "describe_ends", "EVIDENCE_CHECKS"]

Criterion = Literal["plateau", "efficiency", "loss"]

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
        criterion: ``plateau``, ``efficiency`` or ``loss`` (see ``common.phases.criteria``); none: only the
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
            improvement, an ``efficiency`` peak (``common.phases.criteria``; 0: every difference counts).
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
        if not (0 <= self.min_delta < math.inf and 0 < self.fraction < math.inf and 0 <= self.threshold < math.inf):
            raise ValueError(f"until.min_delta and until.threshold must be >= 0 and until.fraction > 0, all finite, "
                             f"got {self.min_delta}, {self.threshold}, {self.fraction}")  # (written so: NaN too)
        if not 0 <= self.noise < math.inf:  # also catches NaN
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
