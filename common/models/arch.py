"""The architecture interface: one object per run that answers every model-family question.

A *geometry* is what one phase's model looks like (the AST family: an
:class:`~common.models.ast.encoder.EncoderConfig`; HTS-AT: an :class:`~common.models.htsat.arch.HTSATPhase`); every
geometry has ``grid`` (the token grid of the first stage), ``num_patches`` and ``num_tokens``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from common.audio.compression import Compression
from common.audio.fbank import NormStats, resolve_norm_stats
from common.audio.pipeline import AudioConfig
from common.config.recipe import build
from common.models.ast.arch import ASTArch
from common.models.ast.encoder import EncoderConfig
from common.models.htsat import HTSATConfig
from common.models.htsat.arch import HTSATArch

__all__ = ["ARCHS", "Architecture", "architecture_for", "architecture_from_meta", "export_norm_stats", "family",
           "official_channels"]

ARCHS = ("ast", "htsat")


class Architecture(Protocol):
    """What a model family answers.

    Attributes:
        name: ``ast`` or ``htsat``, stored in every checkpoint and export (``arch``).
        base: the full-resolution model config.
        sample_rate: clips are resampled to this.
        clip_samples: clips are cropped / zero-padded to this many samples.
        channels: how the family's official code reads a multi-channel file: ``first`` or ``mean``
            (``data.channels: auto``).
        normalises_input: the model normalises its input itself (HTS-AT's BatchNorm); False: the front end
            normalises it with a corpus's statistics (``audio.norm``, ``task.norm``), which must suit the input.
        nondeterministic_on_cuda: what of the family's training step PyTorch has no deterministic CUDA kernel for
            (``train.deterministic`` then warns instead of stopping the run at it), or "".
    """

    name: str
    channels: str
    normalises_input: bool
    nondeterministic_on_cuda: str
    base: Any
    sample_rate: int
    clip_samples: int

    def geometry(self, compression: Compression) -> Any:
        """The model geometry of a phase compressed by ``compression`` (``ValueError`` if impossible)."""
    def frontend(self, geometry: Any, compression: Compression, specaug) -> nn.Module:
        """Waveforms ``[B, S]`` (+ lengths, + a generator for training augmentation) -> model input."""

    def build_encoder(self, geometry: Any) -> nn.Module:
        """The encoder of a geometry (the AST family's ViT, what SSAST pretrains; HTS-AT's whole model)."""
    def features(self, encoder: nn.Module, x: torch.Tensor, pool: str, layer: int | None = None) -> torch.Tensor:
        """A frozen encoder's clip embedding ``[B, D]`` of model input ``x`` (linear probing)."""

    def build_classifier(self, geometry: Any, num_classes: int, pool: str) -> nn.Module:
        """A classifier: ``model(x, mixup_lambda=None) -> logits``, ``model.embedding(x) -> [B, D]``, the
        encoder as ``model.encoder``, its pooling as ``model.pool`` and its task head's parameter prefixes as
        ``model.head_prefixes``."""
    def resolve_pool(self, pool: str, init) -> str:
        """The classifier's pooling: ``pool`` checked, or for ``auto`` the one the init's code uses."""

    def adapt_state(self, state: dict, old: Any, new: Any, transfer, patch_mode: str, prefix: str = "") -> dict:
        """Encoder weights (under ``prefix``) carried from geometry ``old`` to ``new`` at a phase change."""
    def load_weights(self, encoder: nn.Module, weights, geometry: Any, pos_mode: str, patch_mode: str,
                     table_mode: str = "timm") -> None:
        """Load initial weights (a :class:`~common.models.weights.EncoderWeights`) into ``encoder``; ``table_mode``:
        how relative-position tables are fitted (``transfer.rel_pos_bias``; architectures that have them)."""

    def example_input(self, geometry: Any, batch: int) -> torch.Tensor:
        """A random model input of ``batch`` clips (for counting FLOPs on the meta device)."""
    def export_meta(self, geometry: Any) -> dict:
        """What an export records besides the weights to rebuild the model and its front end."""

    def export_geometry(self, meta: dict) -> Any:
        """The geometry an export's weights are laid out for (its metadata: config and phase)."""


def geometries(arch: Architecture, phases: Sequence) -> list:
    """The geometry of every phase; ``ValueError`` naming the phase (``phases.N: ...``) if one is impossible."""
    if not phases:
        raise ValueError("phases: at least one phase is needed")
    if len({p.iteration_based for p in phases}) > 1:
        raise ValueError("phases: mix of steps and epochs; a run is either iteration-based or epoch-based")
    out = []
    for i, phase in enumerate(phases):
        try:
            out.append(arch.geometry(phase.as_compression()))
        except ValueError as err:
            raise ValueError(f"phases.{i}: {err}") from None
    return out


def architecture_for(base, audio=None) -> Architecture:
    """The architecture of a model config or geometry (``EncoderConfig``: AST family; ``HTSATConfig`` or a
    phase's ``HTSATPhase``: HTS-AT); ``audio`` is the AST family's front end (default: derived)."""
    if hasattr(base, "cfg") and isinstance(base.cfg, HTSATConfig):  # an HTS-AT phase geometry
        base = base.cfg
    if isinstance(base, HTSATConfig):

        return HTSATArch(base)
    if isinstance(base, EncoderConfig):

        return ASTArch(base, audio or AudioConfig(num_mel_bins=base.num_mel_bins, target_frames=base.input_tdim))
    raise TypeError(f"no architecture for a model config of type {type(base).__name__}")


def family(name: str) -> type[ASTArch] | type[HTSATArch]:
    """The architecture class of ``name`` (``ast``, ``htsat``), for what it answers without a model config at hand
    (a recipe, an export's metadata): ``channels``, ``normalises_input``."""
    return {ASTArch.name: ASTArch, HTSATArch.name: HTSATArch}[name]


def official_channels(name: str) -> str:
    """How the official code of architecture ``name`` (``ast``, ``htsat``) reads a multi-channel file
    (``Architecture.channels``: ``first`` or ``mean``)."""
    return family(name).channels


def export_norm_stats(meta: dict) -> NormStats | None:
    """The normalisation statistics an AST-family export recorded by value (None: an older export, whose
    ``audio.norm`` names them)."""
    stats = meta.get("norm_stats")
    return None if stats is None else resolve_norm_stats(stats)


def architecture_from_meta(meta: dict) -> Architecture:
    """The architecture an export was trained with (``meta["arch"]``; exports without it are AST family)."""
    name = meta.get("arch", "ast")
    if name == "htsat":

        return architecture_for(HTSATConfig.from_dict(meta["encoder_config"], prefix="encoder_config"))
    if name == "ast":

        audio = build(AudioConfig, meta["audio"], "audio") if "audio" in meta else None
        arch = architecture_for(EncoderConfig.from_dict(meta["encoder_config"]), audio)
        stats = export_norm_stats(meta)
        return arch if stats is None else replace(arch, norm_stats=stats)
    raise ValueError(f"unknown architecture {name!r} in the export's metadata; known: {list(ARCHS)}")
