"""HTS-AT training FLOPs per clip, counted (forward + backward) with :mod:`common.models.flops` on the meta device.

A training step is the model on a log-mel batch and a BCE loss on the clipwise logits. Counted are the
matmuls and convolutions (the Swin, the patch embedding, the token-semantic head); the STFT, the
bicubic stretch and element-wise work are not, as is usual (and as the reference count of 35.9 GFLOPs
per 10 s clip at 256 x 256, 9.0 at 128 x 128, counted with ``torch.utils.flop_counter``).

``python -m common.models.htsat`` prints the geometry and training FLOPs of every compression method.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from common.models.flops import train_step_flops
from common.models.htsat.config import HTSATConfig
from common.models.htsat.geometry import Geometry, geometry
from common.models.htsat.model import HTSAT

__all__ = ["train_flops"]


def train_flops(cfg: HTSATConfig, geom: Geometry | None = None, batch: int = 2) -> int:
    """FLOPs per clip of one training step (forward + backward) of HTS-AT in geometry ``geom``."""

    geom = geom if geom is not None else geometry(cfg)

    def step(model: HTSAT, n: int) -> torch.Tensor:
        logits = model(torch.randn(n, 1, geom.stft_frames, cfg.mel_bins))["clipwise_output"]
        return F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))

    return train_step_flops(lambda: HTSAT(cfg, geom), step, batch)
