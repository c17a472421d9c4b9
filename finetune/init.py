"""Where a task's encoder starts: loading ``--init`` and fitting its geometry to the task.

Shared by fine-tuning and linear probing. The transformer and the patch shape come from the checkpoint;
the input length from the task; the stride from the recipe (default: the patch, no overlap, as the paper).
"""

from __future__ import annotations

from common.checkpoint import EncoderWeights
from common.model import ASTEncoder, EncoderConfig, ModelSpec
from common.resize import load_adapted

__all__ = ["load_init", "task_encoder_config", "init_pos_mode", "task_encoder"]


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


def init_pos_mode(init: EncoderWeights | None, default: str) -> str:
    """ImageNet weights are fitted with AST's rule (centre cut / bilinear); others with ``default``."""
    return "cut" if init is not None and init.meta.get("source") == "imagenet" else default


def task_encoder(init: EncoderWeights | None, cfg: EncoderConfig, pos_mode: str = "bilinear") -> ASTEncoder:
    """An encoder laid out as ``cfg`` carrying ``init``'s weights (for a frozen use such as probing)."""
    if init is None:
        raise ValueError("a frozen encoder needs weights: --init none gives a random encoder")
    encoder = load_adapted(ASTEncoder(cfg), init.state, init.config, cfg, init_pos_mode(init, pos_mode))
    return encoder.eval()
