"""How a phase's batch stream becomes optimiser steps: micro-batches grouped by accumulation
(:func:`step_groups`), each micro-batch's forward, backward and step (:func:`micro_step`), and what a
micro-batch without a usable clip steps with (:func:`stand_in`, :func:`norms_frozen`), and the running statistics
every rank takes from rank 0 after a step (:func:`broadcast_statistics`)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from common.data.clips import Batch
from common.training.optim import step_engine

__all__ = ["StepGroup", "step_groups", "micro_step", "norms_frozen", "stand_in", "running_statistics",
           "broadcast_statistics"]

log = logging.getLogger(__name__)


class StepGroup(NamedTuple):
    """One optimiser step's micro-batches, or an epoch end (``batches`` empty, ``epoch_end`` set)."""

    batches: list[Batch]
    position: tuple[int, int]  # the data position after these batches: (epoch, batches consumed)
    epoch_end: int | None = None  # the epoch that just ended


def step_groups(stream: Iterator[Batch], accum: int, epoch_based: bool,
                start_epoch: int | None = None) -> Iterator[StepGroup]:
    """Group a batch stream into optimiser steps of ``accum`` micro-batches.

    Every batch takes its place, also one whose clips were all unusable (empty): the trainer runs it as a
    micro-step that contributes nothing (``common.training.loop.Trainer._micro_step``), so that every rank takes the same steps
    whatever its clips and the accumulation groups follow the data positions. In epoch-based phases an
    epoch end is announced as a group of its own, and a partial group left at an epoch end is dropped (as
    a DataLoader with ``drop_last``: a step never mixes two epochs). ``start_epoch``: the epoch the stream starts in, whose
    end is announced even when the stream has no batch left of it (a resume at the end of an epoch).
    """
    group: list[Batch] = []
    current = start_epoch
    for batch in stream:
        if epoch_based and current is not None and batch.epoch != current:
            group = []
            yield StepGroup([], (current + 1, 0), epoch_end=current)
        current = batch.epoch
        group.append(batch)
        if len(group) == accum:
            yield StepGroup(group, (batch.epoch, batch.index + 1))
            group = []
    if epoch_based and current is not None:
        yield StepGroup([], (current + 1, 0), epoch_end=current)


def running_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a training forward changes: BatchNorm's running mean, variance and batch count (HTS-AT's
    ``bn0``; an AST has none)."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


def broadcast_statistics(model: nn.Module, dist) -> None:
    """Rank 0's running statistics of ``model`` on every rank (collective; nothing on one rank).

    Each rank's BatchNorm follows its own clips, and DeepSpeed, unlike DDP (``broadcast_buffers``, which the
    official HTS-AT trainer used), never synchronises buffers: validation would score each rank's share with
    other statistics, and checkpoints and exports, which rank 0 writes, would hold rank 0's alone. Called after
    every optimiser step: no host wait (the broadcasts queue on the device)."""
    if dist.world_size > 1:
        for buffer in running_statistics(model):
            torch.distributed.broadcast(buffer, src=0)


@contextmanager
def norms_frozen(model: nn.Module, frozen: bool = True):
    """BatchNorm layers of ``model`` in eval mode within (their running statistics stay as they are)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training] \
        if frozen else []
    for module in norms:
        module.eval()
    try:
        yield
    finally:
        for module in norms:
            module.train()


def stand_in(batch: Batch, samples: int, classes) -> Batch:
    """One clip of silence (and all-zero targets) in place of ``batch``, which has no usable clip; only its
    graph matters (its loss is multiplied by 0)."""
    return Batch(torch.zeros(1, samples), torch.tensor([samples]),
                 None if classes is None else torch.zeros(1, len(classes)), ["(stand-in)"],
                 epoch=batch.epoch, index=batch.index)


def micro_step(engine, batch: Batch, pipeline: nn.Module, objective, generator: torch.Generator,
               device: torch.device, autocast_dtype, clip_samples: int, check: Callable[[torch.Tensor], None],
               rank: int = 0) -> dict[str, torch.Tensor]:
    """Forward, backward and (at the end of an accumulation group) the optimiser step of one micro-batch;
    ``check`` sees the loss before the backward (it raises to stop before the update). Returns the logs.

    A micro-batch without a usable clip (all bad audio, left out and listed) still takes its micro-step
    with a zero gradient, so that every rank takes the same steps and its gradients reach the step's
    all-reduce: a stand-in clip (:func:`stand_in`) goes through the same objective, model and backward
    with its loss multiplied by 0 (the same graph, because ZeRO-2 reduces the gradients in the order the
    backward makes them); BatchNorm layers see it in eval mode, so their statistics learn nothing from
    it; it counts as no sample and no logged loss. The step averages over the ``n`` micro-batches of all
    ranks, so with ``e`` empty its gradient is the others' times ``(n - e) / n``. That is not rescaled:
    rescaling needs ``e`` before the backward (a collective per micro-batch), a partly bad micro-batch
    already weighs as much as a full one, and the event is rare (the run stops past
    ``data.max_bad_fraction``). One rank alone does the same, so that the steps of a phase follow the data
    positions on any number of ranks (a step whose micro-batches are all empty has a zero gradient, and
    Adam still moves the weights by its momentum).
    """
    empty = not len(batch)
    if empty:
        log.warning("batch %d of epoch %d (rank %d) has no usable clip: it takes its step with a zero gradient",
                    batch.index, batch.epoch, rank)
        batch = stand_in(batch, clip_samples, objective.classes)
    batch.waveforms = batch.waveforms.to(device, non_blocking=True)
    batch.lengths = batch.lengths.to(device, non_blocking=True)
    if batch.targets is not None:
        batch.targets = batch.targets.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None), \
            norms_frozen(engine.module, empty):
        loss, logs = objective.train_step(engine, batch, pipeline, generator)
    if empty:
        loss = loss * 0.0
    check(loss)
    engine.backward(loss)
    step_engine(engine)
    return {"loss": loss.detach(), **logs}
