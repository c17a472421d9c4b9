"""Where a task's encoder starts: loading ``--init`` and fitting its geometry to the task.

Shared by fine-tuning and linear probing. The transformer and the patch shape come from the checkpoint;
the input length from the task; the stride from the recipe (default: the patch, no overlap, as the paper).

The positional embedding of the init is fitted to the first phase's grid as the code the weights come
from would fit it: official SSAST / AST checkpoints and ImageNet weights with their rule (``cut``: the
centre of the grid where the task's is smaller, e.g. ESC-50's 512 frames or any coarse phase, bilinear
where it is larger); this package's exports with ``transfer.pos_embed`` (the paper's bilinear,
antialiased when it shrinks). ``transfer.init_pos_embed`` overrides the choice.

The classifier pools the tokens as the init's code does (``head.pool: auto``, :func:`init_pool`): AST
(ImageNet / DeiT weights, official AST checkpoints) takes the mean of the prefix tokens, ``(cls + dist)
/ 2`` (the cls token with one prefix token); SSAST (its pretrained checkpoints and this package's
pretraining exports) the mean of the patch tokens, ``ft_avgtok``, which SSAST's fine-tuning recipes use
for patch and frame models alike; a fine-tuned export keeps the pooling it was trained with; a model
trained from scratch (``--init none``) pools as AST, the paper's model, whose head does not depend on
its initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.checkpoint import EncoderWeights
from common.model import ASTEncoder, EncoderConfig, ModelSpec
from common.phases import TransferConfig
from common.resize import load_adapted

__all__ = ["InitTransferConfig", "load_init", "task_encoder_config", "init_pos_mode", "init_pool", "resolve_pool",
           "task_encoder"]


@dataclass(frozen=True)
class InitTransferConfig(TransferConfig):
    """The fine-tuning recipe's ``transfer`` section: the phase changes, and the init.

    Args:
        pos_embed: see :class:`common.phases.TransferConfig` (phase changes).
        init_pos_embed: how ``--init``'s positional embedding is fitted to the first phase: ``auto``
            (follow the init, see the module docstring), ``bilinear`` or ``cut``.
    """

    init_pos_embed: Literal["auto", "bilinear", "cut"] = "auto"


def load_init(init: str) -> EncoderWeights | None:
    """The encoder weights of ``--init``, or None for ``none``."""
    if init.lower() == "none":
        return None
    from common.checkpoint import load_encoder_state

    return load_encoder_state(init)


def task_encoder_config(init: EncoderWeights | None, model: ModelSpec, num_mel_bins: int,
                        target_frames: int) -> EncoderConfig:
    """The full-resolution encoder geometry for a task."""
    if init is None:
        return model.encoder_config(num_mel_bins, target_frames)
    cfg = init.config
    fstride, tstride = model.stride or (cfg.fshape, cfg.tshape)
    mel = num_mel_bins if init.meta.get("source") == "imagenet" else cfg.num_mel_bins
    return cfg.replace(num_mel_bins=mel, input_tdim=target_frames, fstride=fstride, tstride=tstride,
                       drop_path_rate=model.drop_path_rate)


def init_pos_mode(init: EncoderWeights | None, default: str, choice: str = "auto") -> str:
    """How ``init``'s positional embedding is fitted to the task's grid.

    Args:
        init: as returned by :func:`load_init`.
        default: the mode for this package's exports (``transfer.pos_embed``).
        choice: ``auto`` (official SSAST / AST checkpoints and ImageNet weights: ``cut``, the rule of
            SSAST's and AST's fine-tuning code; exports: ``default``), or the mode to use.
    """
    if choice != "auto":
        return choice
    return "cut" if init is not None and init.meta.get("source") in ("official", "imagenet") else default


def init_pool(init: EncoderWeights | None, cfg: EncoderConfig) -> str:
    """The token pooling of the code ``init`` comes from (see the module docstring).

    Args:
        init: as returned by :func:`load_init` (None: from scratch).
        cfg: the task's encoder geometry (without prefix tokens the mean of the patch tokens is the only
            choice).
    """
    if cfg.num_prefix_tokens == 0:
        return "mean"
    if init is None:
        return "prefix"
    meta = init.meta
    if isinstance(meta.get("classifier"), dict) and meta["classifier"].get("pool") in ("mean", "prefix"):
        return meta["classifier"]["pool"]
    if meta.get("objective") == "ssast":
        return "mean"
    return "prefix"


def resolve_pool(pool: str, init: EncoderWeights | None, cfg: EncoderConfig) -> str:
    """``pool`` itself, or for ``auto`` :func:`init_pool`; ``prefix`` needs prefix tokens."""
    if pool == "auto":
        return init_pool(init, cfg)
    if pool == "prefix" and cfg.num_prefix_tokens == 0:
        raise ValueError("head.pool: 'prefix' pooling needs prefix tokens, and this encoder has none")
    return pool


def task_encoder(init: EncoderWeights | None, cfg: EncoderConfig, pos_mode: str = "bilinear") -> ASTEncoder:
    """An encoder laid out as ``cfg`` carrying ``init``'s weights (for a frozen use such as probing)."""
    if init is None:
        raise ValueError("a frozen encoder needs weights: --init none gives a random encoder")
    encoder = load_adapted(ASTEncoder(cfg), init.state, init.config, cfg, init_pos_mode(init, pos_mode))
    return encoder.eval()
