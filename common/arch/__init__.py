"""Architectures: everything the trainer, the objectives and the tools ask of a model family, per family.

- ``ast`` (:mod:`common.arch.ast`): the ViT family of AST and SSAST, on the Kaldi fbank at 16 kHz;
- ``htsat`` (:mod:`common.arch.htsat`): HTS-AT, a Swin-T with a token-semantic head on its own 32 kHz
  front end (:mod:`common.htsat`).

An :class:`~common.arch.base.Architecture` is made from a run's full-resolution model config (and, for
AST, its audio settings) by :func:`architecture_for`, or from an export's metadata by
:func:`architecture_from_meta`. Nothing outside these modules branches on an architecture's name.
"""

from __future__ import annotations

from common.arch.base import ARCHS, Architecture, architecture_for, architecture_from_meta

__all__ = ["ARCHS", "Architecture", "architecture_for", "architecture_from_meta"]
