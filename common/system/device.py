"""Host tensors to the device without the host waiting for it.

A training step draws its random numbers (mixup partners and weights, SpecAugment's stripes, masks) on the
host's generator, so that a resumed run draws what an uninterrupted one does. A plain ``.to("cuda")`` of such a
tensor copies from pageable memory and waits for the device to reach the copy; from pinned memory with
``non_blocking=True`` the host goes on (the caching host allocator keeps the pinned block until the copy has
run)."""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on ``device`` (as ``dtype``), copied without a host wait: pinned first when it goes from the host
    to a CUDA device; the same tensor where nothing moves."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device=device, dtype=dtype, non_blocking=True)
