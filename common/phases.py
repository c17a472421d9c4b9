"""Training phases: what a recipe's ``phases:`` list holds, and how a phase sets up the model.

A run is a list of phases, each with a compression method and factor, a length (``steps`` for
iteration-based pretraining, ``epochs`` for fine-tuning) and optional batch-size / learning-rate
overrides. The paper's SSAST schedule is two phases: Fshift x4 for 100K steps, then full resolution for
500K; three-phase runs (4 -> 2 -> 1) are written the same way. At every phase change the grid-dependent
weights are adapted (``common.resize``) and the optimiser and learning-rate schedule restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from common.compression import Compression
from common.model import EncoderConfig

__all__ = ["PhaseConfig", "TransferConfig", "phase_encoder_configs", "patch_mode_between"]


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase.

    Args:
        compression: ``none``, ``fshift``, ``avgpool``, ``maxpool`` or ``patch``.
        factor: the compression factor C (1 for full resolution).
        patch_transfer: ``pi`` or ``bilinear``: how the patch kernel is carried into / out of a patch phase.
        steps: length in optimiser steps (iteration-based runs).
        epochs: length in epochs (epoch-based runs).
        batch_size: per-rank micro-batch size of this phase (default: the data section's).
        lr: peak learning rate of this phase (default: the optim section's).
        name: a label for logs and the ledger.
    """

    compression: str = "none"
    factor: int = 1
    patch_transfer: Literal["pi", "bilinear"] = "pi"
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        self.spec  # validates method and factor
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("a phase needs exactly one of steps (iteration-based) or epochs (epoch-based)")
        length = self.steps if self.steps is not None else self.epochs
        if length < 1:
            raise ValueError(f"phase length must be >= 1, got {length}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"phase batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"phase lr must be positive, got {self.lr}")

    @property
    def spec(self) -> Compression:
        return Compression(self.compression, self.factor, self.patch_transfer)

    @property
    def iteration_based(self) -> bool:
        return self.steps is not None

    def label(self, index: int) -> str:
        return self.name or f"phase{index + 1} ({self.spec.describe()})"


@dataclass(frozen=True)
class TransferConfig:
    """How weights move between phases.

    Args:
        pos_embed: ``bilinear`` (the paper, section 3.3; antialiased where an axis shrinks, as the
            authors' FlexiAST resampling: the coarse-to-fine changes only grow the grid, where it makes no
            difference) or ``cut`` (centre cut where the grid shrinks, SSAST's choice for shorter inputs).
    """

    pos_embed: Literal["bilinear", "cut"] = "bilinear"


def phase_encoder_configs(base: EncoderConfig, phases: Sequence[PhaseConfig]) -> list[EncoderConfig]:
    """The encoder geometry of every phase; raises ``ValueError`` naming the phase if one is impossible."""
    if not phases:
        raise ValueError("phases: at least one phase is needed")
    kinds = {p.iteration_based for p in phases}
    if len(kinds) > 1:
        raise ValueError("phases: mix of steps and epochs; a run is either iteration-based or epoch-based")
    out = []
    for i, phase in enumerate(phases):
        try:
            phase.spec.check(base)
        except ValueError as err:
            raise ValueError(f"phases.{i}: {err}") from None
        out.append(phase.spec.encoder_config(base))
    return out


def patch_mode_between(old: PhaseConfig, new: PhaseConfig) -> str:
    """Patch-kernel transfer at a change from ``old`` to ``new``: that of the patch phase involved."""
    if new.compression == "patch":
        return new.patch_transfer
    if old.compression == "patch":
        return old.patch_transfer
    return "pi"
