"""One phase's end: its bounds, its criterion and the paper's "surpass the baseline" stop, decided across ranks.

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
  on the same phase, whose rule may run the final phase to ``max``).

How far beyond the noise a change must be to count, and where the noise comes from: ``common.phases.criteria``.

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
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from common.phases.criteria import Efficiency, LossSlope, Plateau, Surpass, make_criterion, margin, mean_and_error
from common.phases.until import EVIDENCE_CHECKS, UntilConfig

__all__ = ["PhaseEnd", "Decision", "END_REASONS"]

# what a phase's ledger record may give as the reason it ended
END_REASONS = ("length", "cap", "plateau", "efficiency", "loss", "surpassed")


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
