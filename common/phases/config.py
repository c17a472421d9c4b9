"""Training phases: what a recipe's ``phases:`` list holds, and how a phase sets up the model.

A run is a list of phases, each with a compression method and factor, a length (``steps`` for
iteration-based pretraining, ``epochs`` for fine-tuning) and optional global-batch / learning-rate
overrides. The paper's SSAST schedule is two phases: Fshift x4 for 100K steps, then full resolution for
500K; three-phase runs (4 -> 2 -> 1) are written the same way. At every phase change the grid-dependent
weights are adapted (``common.models.ast.resize``, ``common.phases.transition``) and the optimiser and learning-rate schedule
restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.audio.compression import Compression
from common.models.ast.resize import PatchResize, PosResize
from common.models.htsat.adapt import BiasTransfer
from common.phases.until import UntilConfig

__all__ = ["PhaseConfig", "TransferConfig", "patch_mode_between"]


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase.

    Args:
        compression: ``none``, ``fshift``, ``avgpool``, ``maxpool`` or ``patch``.
        factor: the compression factor C (1 for full resolution).
        patch_transfer: ``pi`` or ``bilinear``: how the patch kernel is carried into / out of a patch phase.
        steps: length in optimiser steps (iteration-based runs).
        epochs: length in epochs (epoch-based runs).
        batch_size: this phase's global batch, clips per optimiser step over every rank (default: the data
            section's); each launch splits it over its ranks (``common.training.batch``).
        lr: peak learning rate of this phase (default: the optim section's).
        name: a label for logs and the ledger.
        until: end the phase by a criterion within bounds instead of at its planned length
            (``common.phases.until``); ``steps`` / ``epochs`` stay the planned length (the plan, the cosine
            schedule) and the default ``until.max``.
    """

    compression: str = "none"
    factor: int = 1
    patch_transfer: PatchResize = "pi"
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    name: str | None = None
    until: UntilConfig | None = None

    def __post_init__(self) -> None:
        self.as_compression()  # validates method and factor
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("a phase needs exactly one of steps (iteration-based) or epochs (epoch-based)")
        length = self.steps if self.steps is not None else self.epochs
        if length < 1:
            raise ValueError(f"phase length must be >= 1, got {length}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"phase batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not 0 < self.lr < math.inf:  # also NaN
            raise ValueError(f"phase lr must be positive and finite, got {self.lr}")
        if self.until is not None and not self.until.min <= length <= self.max_length:
            raise ValueError(f"until: the planned length ({length}) must lie within until.min ({self.until.min}) "
                             f"and until.max ({self.max_length})")

    def as_compression(self) -> Compression:
        """The phase's compression method and factor as a :class:`Compression`."""
        return Compression(self.compression, self.factor, self.patch_transfer)

    @property
    def iteration_based(self) -> bool:
        return self.steps is not None

    @property
    def length(self) -> int:
        """Steps (iteration-based) or epochs (epoch-based)."""
        return self.steps if self.steps is not None else self.epochs

    @property
    def max_length(self) -> int:
        """The most steps / epochs the phase may run: ``until.max``, or its planned length."""
        if self.until is not None and self.until.max is not None:
            return self.until.max
        return self.length

    def batch_size_or(self, default: int) -> int:
        """The phase's global batch, or ``default`` (the data section's) when it sets none."""
        return self.batch_size or default

    def label(self, index: int) -> str:
        return self.name or f"phase{index + 1} ({self.as_compression().describe()})"


@dataclass(frozen=True)
class TransferConfig:
    """How weights move between phases.

    Args:
        pos_embed: ``bilinear`` (the paper, section 3.3; antialiased where an axis shrinks, as the
            authors' FlexiAST resampling: the coarse-to-fine changes only grow the grid, where it makes no
            difference) or ``cut`` (centre cut where the grid shrinks, SSAST's choice for shorter inputs):
            the AST family's positional embedding.
        rel_pos_bias: HTS-AT's relative-position bias tables of the stages whose attention window changes:
            ``timm`` (timm's ``resize_rel_pos_bias_table``, what ``SwinTransformer.set_input_size`` does),
            or ``bilinear`` / ``bicubic`` resizing of the table as an image (bicubic: Swin's
            ``load_pretrained``).
    """

    pos_embed: PosResize = "bilinear"
    rel_pos_bias: BiasTransfer = "timm"


def patch_mode_between(old: PhaseConfig | None, new: PhaseConfig) -> str:
    """Patch-kernel transfer into ``new`` from ``old`` (None: from initial weights): that of the patch phase
    involved, PI-resize otherwise."""
    if new.compression == "patch":
        return new.patch_transfer
    if old is not None and old.compression == "patch":
        return old.patch_transfer
    return "pi"
