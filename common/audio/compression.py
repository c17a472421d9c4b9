"""Temporal compression: how a training phase reduces the number of time tokens by a factor C.

The paper's three families (section 2.3), plus ``none`` for full-resolution phases:

- ``fshift``: the fbank's frame shift is multiplied by C, so the front end makes T/C frames (Eq. 1).
- ``avgpool`` / ``maxpool``: a 1 x C pooling with stride C on the full-resolution fbank (Eq. 2).
- ``patch``: the patch becomes p x Cp and the time stride C times larger (Eq. 3); the patch-embedding
  kernel is transferred between phases bilinearly (``bilinear``) or by PI-resize (``pi``).

A :class:`Compression` answers every question the rest of the package asks about a phase: the frame
shift, the frames the model sees, the encoder geometry, and the resulting token grid.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

if typing.TYPE_CHECKING:  # annotations only: the encoder geometry is a model's, a layer above this one
    from common.models.ast.encoder import EncoderConfig

__all__ = ["Compression", "METHODS", "PatchResize", "PATCH_MODES"]

METHODS = ("none", "fshift", "avgpool", "maxpool", "patch")
PatchResize = Literal["pi", "bilinear"]  # how the patch kernel follows a patch-shape change
PATCH_MODES: tuple[str, ...] = typing.get_args(PatchResize)


@dataclass(frozen=True)
class Compression:
    """A time-compression method and factor.

    Args:
        method: one of :data:`METHODS`.
        factor: the compression factor C (a positive integer; 1 means full resolution).
        patch_transfer: for ``patch`` phases, how the patch-embedding kernel is carried into and out of
            the phase: one of :data:`PATCH_MODES` (``pi``: PI-resize, or ``bilinear``).
    """

    method: str = "none"
    factor: int = 1
    patch_transfer: str = "pi"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"compression: unknown method {self.method!r}; choose one of {list(METHODS)}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"factor: a compression factor must be a positive integer, got {self.factor!r}")
        if self.method == "none" and self.factor != 1:
            raise ValueError(f"factor: compression 'none' takes factor 1, got {self.factor}")
        if self.patch_transfer not in PATCH_MODES:
            raise ValueError(f"patch_transfer: unknown patch transfer {self.patch_transfer!r}; choose one of "
                             f"{list(PATCH_MODES)}")

    @property
    def is_full_resolution(self) -> bool:
        """Whether this is no compression at all (factor 1): the model's own input."""
        return self.factor == 1

    def describe(self) -> str:
        """In words, as logs and plans name a phase: ``full resolution``, ``fshift x4``, ``patch x2 (pi)``."""
        if self.is_full_resolution:
            return "full resolution"
        extra = f" ({self.patch_transfer})" if self.method == "patch" else ""
        return f"{self.method} x{self.factor}{extra}"

    def frame_shift_ms(self, base_ms: float) -> float:
        """Frame shift of the front end in this phase."""
        return base_ms * self.factor if self.method == "fshift" else base_ms

    def fbank_frames(self, base_frames: int) -> int:
        """Frames the front end is padded / cut to (before any pooling).

        Fshift divides the target length by C; ``round``, not ``int``, so that e.g. 1024 / 3 -> 341.
        """
        return max(1, round(base_frames / self.factor)) if self.method == "fshift" else base_frames

    @property
    def pooled_frames(self) -> int:
        """Front-end frames one encoder frame stands for: C where the phase pools them (:meth:`pool`), else 1."""
        return self.factor if self.method in ("avgpool", "maxpool") else 1

    def model_frames(self, base_frames: int) -> int:
        """Frames the encoder sees. Pooling pads an incomplete last window instead of dropping it."""
        if self.pooled_frames > 1:
            return -(-base_frames // self.factor)
        return self.fbank_frames(base_frames)

    def encoder_config(self, base: EncoderConfig) -> EncoderConfig:
        """The encoder geometry of this phase, given the full-resolution geometry ``base``."""
        if self.method == "patch":
            return base.replace(tshape=base.tshape * self.factor, tstride=base.tstride * self.factor)
        return base.replace(input_tdim=self.model_frames(base.input_tdim))

    def token_grid(self, base: EncoderConfig) -> tuple[int, int]:
        """``(f_dim, t_dim)`` token grid this method gives for an input laid out as ``base``."""
        return self.encoder_config(base).grid

    def check(self, base: EncoderConfig) -> None:
        """Raise ``ValueError`` if the phase cannot be built for ``base``.

        The phase's encoder must fit the input, and with non-overlapping patches (stride = patch) the
        factor must divide the full-resolution time grid, so that every coarse token stands for exactly
        C fine ones.
        """
        try:
            cfg = self.encoder_config(base)
        except ValueError as err:
            raise ValueError(f"{self.describe()} is impossible for this model: {err}") from None
        full_t = base.grid[1]
        if base.tstride == base.tshape and full_t % self.factor:
            raise ValueError(
                f"compression factor {self.factor} does not divide the time grid of {full_t} tokens "
                f"({base.input_tdim} frames / patch {base.tshape})"
            )
        if cfg.grid[1] < 1:
            raise ValueError(f"{self.describe()} leaves no time tokens for {base.input_tdim} frames")

    def pool(self, fbank: torch.Tensor) -> torch.Tensor:
        """Apply the 1 x C pooling of ``avgpool`` / ``maxpool`` to ``[B, T, F]`` (identity otherwise).

        ``T`` need not be a multiple of C: the last window covers the frames that are left
        (``ceil_mode``), so no frame is dropped.
        """
        if self.pooled_frames == 1:
            return fbank
        x = fbank.transpose(1, 2)  # [B, F, T]
        pool = F.avg_pool1d if self.method == "avgpool" else F.max_pool1d
        x = pool(x, kernel_size=self.factor, stride=self.factor, ceil_mode=True)
        return x.transpose(1, 2)
