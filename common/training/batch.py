"""The global batch a recipe states, split over the ranks and gradient accumulation of one launch.

A recipe states the *global* batch (``data.batch_size``, or a phase's ``batch_size``): the clips of one
optimiser step over every rank and accumulated micro-batch, the number the paper's sources train with
(AST and SSAST: ``nn.DataParallel`` over one loader, so their ``batch_size`` is already global; HTS-AT:
32 per GPU x 4 GPUs = 128). Where the run lands decides how it is split:

    per-rank micro-batch = global batch / (world size x gradient accumulation)

The accumulation is ``optim.grad_accum`` (default 1), raised where ``data.max_batch_per_rank`` caps the
clips one rank takes in one forward / backward pass: the smallest accumulation at or above
``optim.grad_accum`` that splits the global batch exactly with a micro-batch within the cap. So the same
recipe trains the same optimiser steps on any number of GPUs that divides its batch (24 clips per step: 24 x
1 rank, 6 x 4 ranks, 1 x 24 ranks, or, with a cap of 12 on one GPU, 12 x 2 accumulation). A split that cannot be made exactly (12 clips on 8
ranks) is refused before any compute, naming the global batch, the world size and the accumulation: an
uneven split would change the batch or drop clips.

Validation batches (``data.eval_batch_size``) are per rank and do not change the method; by default they
are the phase's training micro-batch, so a partial validation round (``train.eval_batches`` batches on every
rank) scores as many clips on any launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from common.config.recipe import RecipeError
from common.system import launcher

__all__ = ["BatchSplit", "split_batch", "phase_splits", "launch_world_size", "stated_batch", "plan_lines"]


@dataclass(frozen=True)
class BatchSplit:
    """How one phase's global batch is computed.

    Attributes:
        global_batch: clips per optimiser step over every rank and accumulated micro-batch.
        world_size: ranks.
        grad_accum: micro-batches per rank per optimiser step.
        per_rank: clips per rank per micro-batch (what one forward / backward pass takes).
    """

    global_batch: int
    world_size: int
    grad_accum: int
    per_rank: int

    def describe(self) -> str:
        """E.g. ``24 clips per step = 6 per rank x 4 rank(s) x 1 accumulation``."""
        return (f"{self.global_batch} clips per step = {self.per_rank} per rank x {self.world_size} rank(s) x "
                f"{self.grad_accum} accumulation")


def split_batch(global_batch: int, world_size: int, grad_accum: int = 1, max_per_rank: int | None = None,
                key: str = "data.batch_size") -> BatchSplit:
    """Split ``global_batch`` over ``world_size`` ranks and at least ``grad_accum`` micro-batches.

    Args:
        global_batch: clips per optimiser step.
        world_size: ranks.
        grad_accum: the accumulation to start from (``optim.grad_accum``).
        max_per_rank: the most clips of a micro-batch (``data.max_batch_per_rank``), or None: no cap, the
            accumulation is ``grad_accum``.
        key: the recipe key the global batch came from (for the error).

    Raises:
        RecipeError: one line naming ``key``, the global batch, the world size and the accumulation, when no
            exact split exists.
    """
    if global_batch < 1 or world_size < 1 or grad_accum < 1:
        raise ValueError(f"a batch split needs positive numbers, got {global_batch} clips, {world_size} rank(s), "
                         f"{grad_accum} accumulation")
    if max_per_rank is None:
        if global_batch % (world_size * grad_accum):
            raise RecipeError(
                f"{key}: a global batch of {global_batch} clips does not split over {world_size} rank(s) x "
                f"{grad_accum} accumulation ({global_batch} is not a multiple of {world_size * grad_accum}); "
                f"{_remedy(global_batch, grad_accum, key)}")
        return BatchSplit(global_batch, world_size, grad_accum, global_batch // (world_size * grad_accum))
    for accum in range(grad_accum, global_batch // world_size + 1):
        if global_batch % (world_size * accum) == 0 and global_batch // (world_size * accum) <= max_per_rank:
            return BatchSplit(global_batch, world_size, accum, global_batch // (world_size * accum))
    raise RecipeError(
        f"{key}: a global batch of {global_batch} clips does not split over {world_size} rank(s) x {grad_accum} or "
        f"more accumulation into micro-batches of at most {max_per_rank} clips (data.max_batch_per_rank); "
        f"{_remedy(global_batch, 1, key)}")


def _remedy(global_batch: int, grad_accum: int, key: str) -> str:
    """What to do instead: the rank counts that split the batch, or another global batch."""
    ranks = [n for n in range(1, global_batch + 1) if global_batch % (n * grad_accum) == 0]
    listed = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
    return (f"launch {listed} rank(s), or state another global batch (--set {key}=N)" if ranks
            else f"state another global batch (--set {key}=N) or accumulation (optim.grad_accum)")


def phase_splits(phases: Sequence, data, optim, world_size: int, resumes=None) -> list[BatchSplit]:
    """The split of every phase (a phase's ``batch_size``, else ``data.batch_size``, is its global batch).
    ``resumes``: the run directory of the run this launch resumes (None: a new run, or ``--restart``): a split that
    fails then says that the run cannot go on with these ranks (a resume keeps its global batch) and with which it
    can, instead of offering another global batch that the resume would refuse.

    Raises:
        RecipeError: naming ``phases.N.batch_size`` or ``data.batch_size`` of the first phase that does not split.
    """
    splits = []
    for i, phase in enumerate(phases):
        key = f"phases.{i}.batch_size" if phase.batch_size else "data.batch_size"
        batch = phase.batch_size_or(data.batch_size)
        try:
            splits.append(split_batch(batch, world_size, optim.grad_accum, data.max_batch_per_rank, key))
        except RecipeError:
            if resumes is None:
                raise
            ranks = [n for n in range(1, batch + 1) if _splits(batch, n, optim.grad_accum, data.max_batch_per_rank)]
            listed = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
            raise RecipeError(
                f"{resumes} holds a run whose global batch of {batch} clips ({key}) does not split over {world_size} "
                f"rank(s): the run cannot go on with {world_size} rank(s) (a resumed run keeps its global batch); "
                f"resume it on {listed} rank(s), or start another run with another global batch (a new --run-dir, "
                f"or --restart)") from None
    return splits


def _splits(global_batch: int, world_size: int, grad_accum: int, max_per_rank: int | None) -> bool:
    """Whether :func:`split_batch` splits ``global_batch`` over ``world_size`` ranks."""
    try:
        split_batch(global_batch, world_size, grad_accum, max_per_rank)
    except RecipeError:
        return False
    return True


def launch_world_size(planned: int | None = None) -> int:
    """The ranks a run is launched on: ``planned`` (``--world-size`` of a ``--dry-run``), else the
    launcher's ``WORLD_SIZE`` (deepspeed, torchrun), else 1 (plain ``python``)."""
    if planned is not None:
        return planned
    try:
        return launcher.world_size()
    except ValueError as err:
        raise RecipeError(str(err)) from None


def stated_batch(mapping: dict) -> int | None:
    """The global batch a recipe mapping states (``data.batch_size``), before ``--set``; None if it states none."""
    data = mapping.get("data") if isinstance(mapping, dict) else None
    value = data.get("batch_size") if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def plan_lines(splits: Sequence[BatchSplit], effective: int, stated: int | None, source: str) -> list[str]:
    """What ``--dry-run`` says about the batch: the global batch and its split on the planned launch (one line
    per distinct split), and whether the global batch is the one ``source`` (the recipe) states.

    Args:
        splits: every phase's split.
        effective: the run's ``data.batch_size`` (after ``--set``).
        stated: what the recipe states (:func:`stated_batch`), or None.
        source: the recipe's name for the message.
    """
    distinct = list(dict.fromkeys(splits))
    lines = []
    for split in distinct:
        phases = ", ".join(f"phase{i + 1}" for i, s in enumerate(splits) if s == split)
        lines.append(f"batch: {split.describe()}" + (f" ({phases})" if len(distinct) > 1 else ""))
    lines[-1] += " (--world-size N plans N ranks)"
    if stated is not None and stated != effective:
        lines.append(f"global batch {effective} differs from the {stated} that {source} states (the source's batch); "
                     f"the learning rate and schedule are still the recipe's")
    return lines
