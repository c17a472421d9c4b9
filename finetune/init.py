"""Where a task's encoder starts: loading ``--init`` and fitting its geometry to the task.

Shared by fine-tuning and linear probing. The transformer and the patch shape come from the checkpoint;
the input length from the task; the stride from the recipe (default: the patch, no overlap, as the paper).
"""

from __future__ import annotations

import logging

from common.model import ASTEncoder, EncoderConfig, ModelSpec
from common.resize import adapt_state_dict

__all__ = ["load_init", "task_encoder_config", "task_encoder"]

log = logging.getLogger(__name__)


def load_init(init: str):
    """``(EncoderConfig, state dict, metadata)`` of ``--init``, or None for ``none``."""
    if init.lower() == "none":
        return None
    from common.checkpoint import load_encoder_state

    return load_encoder_state(init)


def task_encoder_config(init, model: ModelSpec, num_mel_bins: int, target_frames: int) -> EncoderConfig:
    """The full-resolution encoder geometry for a task (``init`` as returned by :func:`load_init`)."""
    if init is None:
        return model.encoder_config(num_mel_bins, target_frames)
    cfg, _, meta = init
    fstride, tstride = model.stride or (cfg.fshape, cfg.tshape)
    if meta.get("source") in ("hf", "export") and (fstride, tstride) != (cfg.fstride, cfg.tstride):
        log.warning("the init was trained with patch stride %dx%d; this run uses %dx%d (model.stride; default: the "
                    "patch, no overlap); --set model.stride=[%d,%d] keeps it", cfg.fstride, cfg.tstride, fstride,
                    tstride, cfg.fstride, cfg.tstride)
    mel = num_mel_bins if meta.get("source") == "imagenet" else cfg.num_mel_bins
    return cfg.replace(num_mel_bins=mel, input_tdim=target_frames, fstride=fstride, tstride=tstride,
                       drop_path_rate=model.drop_path_rate)


def init_pos_mode(init, default: str) -> str:
    """ImageNet weights are fitted with AST's rule (centre cut / bilinear); others with ``default``."""
    return "cut" if init is not None and init[2].get("source") == "imagenet" else default


def task_encoder(init, cfg: EncoderConfig, pos_mode: str = "bilinear") -> ASTEncoder:
    """An encoder laid out as ``cfg`` carrying ``init``'s weights (for a frozen use such as probing)."""
    if init is None:
        raise ValueError("a frozen encoder needs weights: --init none gives a random encoder")
    state = adapt_state_dict(init[1], init[0], cfg, init_pos_mode(init, pos_mode))
    encoder = ASTEncoder(cfg)
    encoder.load_state_dict({k: v.float() for k, v in state.items()})
    return encoder.eval()
