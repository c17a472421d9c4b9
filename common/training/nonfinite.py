"""Watching the loss for NaN / inf without a host synchronisation per step (``train.nonfinite_check``).

Reading a device value on the host (``loss.item()``) makes the host wait until the device has finished
the step so far; the host then cannot prepare the next batch or queue the next kernels while the device
works. On a GPU that wait is paid at every step, and it weighs most where the steps are cheapest (the
coarse phases). So the check runs on the device:

- ``window`` (default): each micro-batch's ``isfinite(loss)`` is folded into a flag on the device; the
  host reads it (and all ranks agree on it) once per log window, before every checkpoint and every
  validation, and at every epoch end. A non-finite loss stops the run at the next of those points with the step where it first
  appeared; the updates since the last check were applied in memory but nothing after the non-finite
  loss is ever saved, so the last good checkpoint is intact.
- ``step``: read at every micro-batch, before the update, so the run stops before applying it (one host
  synchronisation and, on several ranks, one all-reduce per micro-batch). On the CPU this costs nothing
  measurable; on a GPU it stalls the queue.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["NonFiniteCheck", "NonFiniteWatch", "NonFiniteLoss"]

NonFiniteCheck = Literal["window", "step"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped before applying the update."""


class NonFiniteWatch:
    """The non-finite-loss flag of the micro-batches since the last check.

    Args:
        dist: this process's :class:`common.system.distributed.Dist` (checks are collective).
        mode: ``window`` or ``step`` (see the module docstring).
        grad_accum: micro-batches per optimiser step (to name the step of a micro-batch).
    """

    def __init__(self, dist, mode: NonFiniteCheck, grad_accum: int = 1) -> None:
        if mode not in ("window", "step"):
            raise ValueError(f"train.nonfinite_check: expected 'window' or 'step', got {mode!r}")
        self.dist, self.mode, self.grad_accum = dist, mode, grad_accum
        self._seen = None  # device bool: a non-finite loss since the last check
        self._clean = None  # device int: micro-batches before the first non-finite one
        self._since = 0  # micro-batches since the last check
        self._from_step = 0  # optimiser steps done at the last check

    def restart(self, step: int, grad_accum: int | None = None) -> None:
        """Start watching at optimiser step ``step`` of a phase (done at a phase start or resume; ``grad_accum``:
        the phase's micro-batches per step, if it changes)."""
        if grad_accum is not None:
            self.grad_accum = grad_accum
        self._seen = self._clean = None
        self._since, self._from_step = 0, step

    def observe(self, loss: torch.Tensor) -> bool:
        """Note one micro-batch's loss. ``step`` mode: True (on every rank) if any rank's loss is not
        finite; ``window`` mode: always False (read later by :meth:`check`)."""
        bad = ~torch.isfinite(loss.detach())
        if self.mode == "step":
            return self.dist.any(bool(bad.item()))
        self._seen = bad if self._seen is None else self._seen | bad
        clean = (~self._seen).long()
        self._clean = clean if self._clean is None else self._clean + clean
        self._since += 1
        return False

    def check(self, step: int) -> int | None:
        """At optimiser step ``step``: the step where a non-finite loss first appeared since the last
        check (on any rank), or None; the watch then starts afresh (collective)."""
        if self.mode == "step" or self._seen is None:
            self.restart(step)
            return None
        flags = torch.stack([self._seen.long().reshape(()), self._clean.reshape(())]).cpu().tolist()
        bad = self.dist.any(bool(flags[0]))
        first = None
        if bad:
            clean = flags[1] if flags[0] else self._since
            if self.dist.world_size > 1:  # the earliest over the ranks
                earliest = torch.tensor([clean], device=self.dist.device)
                torch.distributed.all_reduce(earliest, op=torch.distributed.ReduceOp.MIN)
                clean = int(earliest.item())
            first = self._from_step + clean // self.grad_accum + 1
        self.restart(step)
        return first
