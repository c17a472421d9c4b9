"""Building the model of a phase: from initial weights (phase 1) or from the previous phase's model.

At a phase change the previous model's weights are adapted to the new geometry (the encoder's
grid-dependent weights by the architecture: AST's positional embedding and patch kernel, HTS-AT's
relative-position tables; the objective's own heads by the objective), a fresh model is built for the new
phase and the adapted weights are loaded into it (paper section 2.2). Both functions are pure: state dicts
and configs in, a model out; the optimizer and learning-rate schedule restart with the engine the trainer
builds around it.
"""

from __future__ import annotations

import torch
from torch import nn

from common.audio.compression import Compression
from common.models.arch import Architecture
from common.models.weights import EncoderWeights
from common.phases.config import PhaseConfig, TransferConfig, patch_mode_between
from common.phases.init import CUT_AT_FULL, init_patch_mode

__all__ = ["initial_model", "next_phase_model"]


def initial_model(arch: Architecture, objective, geometry, phase: PhaseConfig, seed: int,
                  init: EncoderWeights | None = None, pos_mode: str = "bilinear",
                  transfer: TransferConfig = TransferConfig()) -> nn.Module:
    """The first phase's model (``objective.build_model``), its encoder from ``init`` if given (and, where the
    objective has ``load_initial_heads(model)``, what it keeps of the init beside the encoder).

    Args:
        arch: the run's architecture (it fits the initial weights to the phase's geometry).
        objective: builds the model for a geometry.
        geometry: the phase's model geometry.
        phase: the phase (its patch transfer applies when the initial kernel shape differs).
        seed: seeds the initialisation of everything the weights do not cover.
        init: initial encoder weights (None: from scratch).
        pos_mode: how an initial positional embedding is fitted to the phase's grid (AST family):
            ``bilinear``, ``cut``, or ``cut_at_full`` (``common.phases.init.CUT_AT_FULL``: cut to the
            full-resolution grid, then carried to a compressed phase's as a phase change carries weights).
        transfer: the recipe's transfer settings (HTS-AT: ``rel_pos_bias`` fits initial relative-position
            tables to the phase's windows; the second step of ``cut_at_full``).
    """
    torch.manual_seed(seed)
    model = objective.build_model(geometry)
    if init is not None:
        if pos_mode == CUT_AT_FULL and geometry != (full := arch.geometry(Compression())):
            # as a full-resolution start, then a phase change (the AST family: the spare encoder's state loads
            # strictly into the phase's, heads apart; init_pos_mode gives HTS-AT plain cut)
            encoder = arch.build_encoder(full)
            arch.load_weights(encoder, init, full, "cut", init_patch_mode(init), transfer.rel_pos_bias)
            state = arch.adapt_state(encoder.state_dict(), full, geometry, transfer, patch_mode_between(None, phase))
            model.encoder.load_state_dict(state)
        else:
            arch.load_weights(model.encoder, init, geometry, "cut" if pos_mode == CUT_AT_FULL else pos_mode,
                              init_patch_mode(init, phase), transfer.rel_pos_bias)
        load_heads = getattr(objective, "load_initial_heads", None)  # an objective's own parts of the init
        if load_heads is not None:
            load_heads(model)
    return model


def next_phase_model(arch: Architecture, objective, model: nn.Module, old, new, prev: PhaseConfig,
                     nxt: PhaseConfig, transfer: TransferConfig, seed: int) -> nn.Module:
    """The model of the next phase, carrying ``model``'s weights adapted from geometry ``old`` to ``new``.

    Args:
        arch: adapts the encoder's weights (``model.encoder``).
        objective: adapts the non-encoder weights (``objective.adapt_state``) and builds the new model.
        model: the previous phase's model.
        old, new: the geometries of the two phases.
        prev, nxt: the two phases (their patch transfer applies to the patch kernel).
        transfer: the recipe's transfer settings (positional embedding, relative-position tables).
        seed: seeds the initialisation of the new model before the weights are loaded.
    """
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state = arch.adapt_state(state, old, new, transfer, patch_mode_between(prev, nxt), prefix="encoder.")
    state = objective.adapt_state(state, old, new)
    torch.manual_seed(seed)
    fresh = objective.build_model(new)
    fresh.load_state_dict(state)
    return fresh
