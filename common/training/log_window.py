"""A phase's open log window: each logged loss summed over this rank's micro-batches, on the device.

The loop adds every micro-batch's losses without reading them (a host read per step would make the host wait
for the device). At the window's end every rank's sums are reduced in one collective and read once
(:meth:`LogWindow.means`). At a checkpoint they are reduced into rank 0's window and saved with it
(:meth:`LogWindow.fold`): a run resumed there starts its window from them on rank 0, so its next log adds the
same numbers in the same order as the run that was not stopped.
"""

from __future__ import annotations

import torch

from common.system.distributed import Dist

__all__ = ["LogWindow"]


class LogWindow:
    """The open log window on this rank of ``dist``, from ``saved`` (a checkpoint's :meth:`fold`, on rank 0)."""

    def __init__(self, dist: Dist, saved: dict | None = None) -> None:
        self.dist = dist
        self._start(saved)

    def _start(self, saved: dict | None = None) -> None:
        """The window as ``saved`` holds it on rank 0; empty elsewhere, and without ``saved``."""
        self.sums: dict[str, torch.Tensor] = {}  # float64, on the device
        self.n = 0  # micro-batches added
        if saved and self.dist.is_main and saved.get("_n"):
            self.n = int(round(saved["_n"]))
            self.sums = {k: torch.tensor(v, dtype=torch.float64, device=self.dist.device)
                         for k, v in saved.items() if k != "_n"}

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        """One micro-batch's losses (tensors on the device), summed without a host read."""
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().double()
        self.n += 1

    def _reduced(self) -> tuple[list[str], list[float]]:
        """The keys of every rank's window and their sums over the ranks, the count last (collective)."""
        keys = sorted(self.sums)
        if self.dist.world_size > 1:  # every rank's micro-batches (a rank whose were all empty has no keys)
            keys = sorted(set().union(*self.dist.gather_objects(keys)))
        device = self.dist.device
        sums = torch.stack([torch.as_tensor(self.sums.get(k, 0.0), dtype=torch.float64, device=device)
                            for k in keys] + [torch.tensor(float(self.n), dtype=torch.float64, device=device)])
        return keys, self.dist.all_reduce_sum(sums).tolist()  # one host read for the window

    def fold(self) -> dict:
        """At a checkpoint: the sums over every rank, ``{key: sum, "_n": count}`` (saved with it), which rank
        0's window now holds and the others' no longer do (collective)."""
        keys, sums = self._reduced()
        saved = dict(zip([*keys, "_n"], sums))
        self._start(saved)
        return saved

    def means(self) -> dict[str, float]:
        """At the window's end: each loss's mean over every rank's micro-batches; the window empties
        (collective)."""
        keys, (*sums, n) = self._reduced()
        self._start()
        return {k: v / max(n, 1) for k, v in zip(keys, sums)}
