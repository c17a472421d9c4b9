"""The interface through which pretraining and fine-tuning plug into the one training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch
from torch import nn

from common.audio.augment import SpecAugmentConfig
from common.data.clips import Batch
from common.models.memory import MemoryEstimate
from common.system.distributed import Dist

__all__ = ["Objective"]


class Objective(Protocol):
    """What pretraining and fine-tuning plug into the trainer.

    A *geometry* is a phase's model layout as the architecture describes it (``common.models.arch``); the model
    an objective builds holds the architecture's encoder as ``model.encoder`` and may name its task
    head's parameters in ``model.head_prefixes`` (they get ``optim.head_lr_scale``). One that holds a thread between
    steps (SSAST's mask draws) has a ``close()``, which the trainer calls when a run ends.
    """

    specaug: SpecAugmentConfig  # SpecAugment of training features
    score_name: str  # the validation metric that drives plateau schedules and "best" (higher is better)
    classes: Sequence[str] | None  # target classes (None: unlabeled data)

    def build_model(self, geometry) -> nn.Module:
        """The full model for a phase geometry, heads freshly initialised."""

    def adapt_state(self, state: dict, old, new) -> dict:
        """Adapt the non-encoder weights of a state dict at a phase change (the encoder is done)."""

    def train_step(self, model: nn.Module, batch: Batch, pipeline: nn.Module,
                   generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch on the device, and detached values to log."""

    def evaluate(self, model: nn.Module, batches: Iterator[Batch], pipeline: nn.Module, dist: Dist,
                 generator: torch.Generator) -> dict[str, float]:
        """Validation metrics, identical on every rank."""

    def flops_per_sample(self, geometry) -> int:
        """Training FLOPs (forward + backward) per sample at a phase geometry."""

    def memory_estimate(self, geometry, batch: int, **setting) -> MemoryEstimate:
        """Bytes per rank to train at a phase geometry and micro-batch ``batch``
        (``common.models.memory.training_setting``)."""

    def export(self, model: nn.Module, path: Path, meta: dict) -> None:
        """Write the deliverable of a phase (rank 0 only)."""

    def score_settings(self, geometry) -> dict:
        """What sets the validation score's scale at a phase geometry besides the clips scored (empty: nothing),
        so that runs are compared only on like scores (``common.phases.baseline.evaluation_settings``)."""
