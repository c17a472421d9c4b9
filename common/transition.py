"""Building the model of a phase: from initial weights (phase 1) or from the previous phase's model.

At a phase change the previous model's weights are adapted to the new geometry (the encoder's positional
embedding and patch kernel by ``common.resize``, the objective's heads by the objective itself), a fresh
model is built for the new phase and the adapted weights are loaded into it (paper section 2.2). Both
functions are pure: state dicts and configs in, a model out; the optimizer and learning-rate schedule
restart with the engine the trainer builds around it.
"""

from __future__ import annotations

import torch
from torch import nn

from common.checkpoint import EncoderWeights
from common.model import ASTEncoder, EncoderConfig
from common.phases import PhaseConfig, patch_mode_between
from common.resize import adapt_state_dict, load_adapted

__all__ = ["initial_model", "next_phase_model"]


def initial_model(objective, cfg: EncoderConfig, phase: PhaseConfig, seed: int,
                  init: EncoderWeights | None = None, pos_mode: str = "bilinear") -> nn.Module:
    """The first phase's model: fresh heads around an encoder laid out for ``cfg``.

    Args:
        objective: builds the model around the encoder (``objective.build_model``).
        cfg: the phase's encoder geometry.
        phase: the phase (its patch transfer applies when the initial kernel shape differs).
        seed: seeds the initialisation of everything the weights do not cover.
        init: initial encoder weights (None: from scratch), adapted to ``cfg``.
        pos_mode: how the initial positional embedding is fitted to the phase's grid.
    """
    torch.manual_seed(seed)
    encoder = ASTEncoder(cfg)
    if init is not None:
        load_adapted(encoder, init.state, init.config, cfg, pos_mode, patch_mode_between(None, phase))
    return objective.build_model(encoder)


def next_phase_model(objective, model: nn.Module, old: EncoderConfig, new: EncoderConfig, prev: PhaseConfig,
                     nxt: PhaseConfig, pos_mode: str, seed: int) -> nn.Module:
    """The model of the next phase, carrying ``model``'s weights adapted from geometry ``old`` to ``new``.

    Args:
        objective: adapts the non-encoder weights (``objective.adapt_state``) and builds the new model.
        model: the previous phase's model (``model.encoder`` is its encoder).
        old, new: the encoder geometries of the two phases.
        prev, nxt: the two phases (their patch transfer applies to the patch kernel).
        pos_mode: how the positional embedding follows the grid (the recipe's ``transfer.pos_embed``).
        seed: seeds the initialisation of the new model before the weights are loaded.
    """
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state = adapt_state_dict(state, old, new, pos_mode, patch_mode_between(prev, nxt), prefix="encoder.")
    state = objective.adapt_state(state, old, new)
    torch.manual_seed(seed)
    fresh = objective.build_model(ASTEncoder(new))
    fresh.load_state_dict(state)
    return fresh
