"""A task head's scores in float32 where they are compared, whatever the autocast around the model.

Under bf16 autocast (``train.precision: auto`` on a GPU) a head's ``Linear`` or ``Conv2d`` returns bf16 logits: 8
bits of mantissa, so a validation set's scores of one class take a few thousand distinct values instead of one per
clip, and the ties move a ranking metric (AudioSet-size mAP by about 0.05 points, the size of the paper's smallest
differences). Evaluation (the module in eval mode) runs the head in float32 on float32 inputs; training keeps the
autocast (its loss is computed in float32 from the logits either way).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["scored_head"]


def scored_head(head: nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor:
    """``head(x)``; outside training and under an autocast, in float32 with the autocast off."""
    if training or not torch.is_autocast_enabled(x.device.type):
        return head(x)
    with torch.autocast(x.device.type, enabled=False):
        return head(x.float())
