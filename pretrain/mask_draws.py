"""SSAST's training masks, drawn off the step: one batch ahead on a worker thread, copied without a host wait.

Drawn inside the step, a mask costs the host several milliseconds a draw (two draws a step with separate
passes), and its copy to the device (``idx.to(device)`` from pageable memory) waits for the device: the GPU
idles while the next mask is drawn. Here the masks of the batch after the current one are drawn on a thread
while the current step runs, into pinned memory on CUDA, and reach the device with ``non_blocking=True``.

Each batch's masks come from a generator seeded by its position: the run's seed and rank (the trainer's
generator's seed), the data position ``(epoch, index)`` of the batch and the token grid. So they do not
depend on what was drawn before, a resumed run draws the masks an uninterrupted one draws (bitwise), and a
guess about the next batch that turns out wrong (an epoch end, a shorter last batch) only costs a draw in
the step. The algorithm is ``pretrain.masking.sample_mask``'s, unchanged: the same distribution.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pretrain.masking import sample_mask

__all__ = ["MaskDraws", "clip_seed", "position_seed"]


def _seed(digest: bytes) -> int:
    """A generator seed (63 bits) from a hash digest."""
    return int.from_bytes(digest[:8], "little") >> 1


def position_seed(base: int, epoch: int, index: int, grid: tuple[int, int]) -> int:
    """A generator seed for the masks of batch ``(epoch, index)`` at ``grid`` (``base``: run seed and rank)."""
    return _seed(hashlib.sha256(f"ssast-mask/{base}/{epoch}/{index}/{grid[0]}x{grid[1]}".encode()).digest())


def clip_seed(base: int, clip: str) -> int:
    """A generator seed for the validation masks of clip ``clip`` (``base``: the run's validation seed): its own,
    whatever clips share its batch and however many ranks validate."""
    return _seed(hashlib.blake2b(f"{base}:{clip}".encode(), digest_size=8).digest())


class MaskDraws:
    """Masks ``[B, M]`` (``passes`` of them) per batch position, the next batch's drawn ahead.

    Args:
        grid: the token grid.
        count: patches masked per clip.
        method, sizes: ``pretrain.masking.sample_mask``'s masking and cluster sides.
        passes: masks per batch (2 with separate passes for MPC and MPG).
        base: the run's seed for this rank.
        pin: draw into pinned memory (the device is CUDA).
    """

    def __init__(self, grid: tuple[int, int], count: int, method: str, sizes: tuple[int, int], passes: int,
                 base: int, pin: bool) -> None:
        self.grid, self.count, self.method, self.sizes = tuple(grid), count, method, sizes
        self.passes, self.base, self.pin = passes, base, pin
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ssast-masks")
        self._ahead: dict[tuple[int, int, int], Future] = {}

    def draw(self, epoch: int, index: int, batch: int) -> list[torch.Tensor]:
        """The masks of batch ``(epoch, index)`` of ``batch`` clips, on the host."""
        generator = torch.Generator().manual_seed(position_seed(self.base, epoch, index, self.grid))
        masks = [sample_mask(batch, self.grid, self.count, self.method, generator, self.sizes)
                 for _ in range(self.passes)]
        return [m.pin_memory() for m in masks] if self.pin else masks

    def take(self, epoch: int, index: int, batch: int, device: torch.device) -> list[torch.Tensor]:
        """The masks of batch ``(epoch, index)`` on ``device`` (copied without waiting for it); starts drawing
        those of the batch after it."""
        ahead = self._ahead.pop((epoch, index, batch), None)
        for stale in self._ahead.values():
            stale.cancel()
        masks = ahead.result() if ahead is not None else self.draw(epoch, index, batch)
        self._ahead = {(epoch, index + 1, batch): self._pool.submit(self.draw, epoch, index + 1, batch)}
        return [m.to(device, non_blocking=True) for m in masks]

    def close(self) -> None:
        """Stop drawing ahead and end the drawing thread (a phase change, the run's end)."""
        for pending in self._ahead.values():
            pending.cancel()
        self._ahead = {}
        self._pool.shutdown(wait=True)  # a draw under way takes milliseconds
