"""No host waits in a training step: outside the log window a step neither reads a device value on the host
nor copies host data to the device with a blocking copy (SSAST's masks are drawn a batch ahead and copied with
``non_blocking=True``, ``pretrain.mask_draws``), and the masks stay SSAST's, drawn by batch position so that a
resume draws what an uninterrupted run draws."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.mask_draws import MaskDraws, position_seed
from pretrain.masking import sample_mask
from tests.helpers import MASK_DRAWER, blocking_copies, host_reads, package_reader, run

pytestmark = pytest.mark.slow  # end-to-end: every test here trains, launches or exports

def _in_drawer() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == MASK_DRAWER:
            return True
        frame = frame.f_back
    return False


class _ScalarReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: every read of a tensor's value by the host (``.item()``, ``bool()``,
    ``float()``), by any code, which on a GPU waits for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not _in_drawer():
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_has_no_blocking_copy_and_no_host_read(tmp_path, synth_corpus, monkeypatch):
    from common.training.loop import Trainer

    counts = {"package reads": 0, "scalar reads": 0}
    real_step = Trainer._micro_step

    def micro_step(self, *args, **kwargs):
        mode = _ScalarReads()
        try:
            with mode, host_reads(package_reader) as reads:
                return real_step(self, *args, **kwargs)
        finally:
            counts["scalar reads"] += mode.reads
            counts["package reads"] += len(reads)

    monkeypatch.setattr(Trainer, "_micro_step", micro_step)
    with blocking_copies(monkeypatch, (Trainer, "_micro_step")) as found:
        assert run(tmp_path / "r", synth_corpus, "train.log_every=100", "train.save_every=100") == 0
    assert found == {"calls": 6, "copies": []} and counts == {"package reads": 0, "scalar reads": 0}


def test_masks_are_drawn_by_batch_position_with_ssasts_algorithm():
    grid, count = (8, 4), 25
    draws = MaskDraws(grid, count, "cluster", (3, 5), passes=2, base=3001, pin=False)
    try:
        first = draws.take(0, 5, 4, torch.device("cpu"))  # drawn in the step (nothing ahead yet)
        ahead = draws.take(0, 6, 4, torch.device("cpu"))  # drawn ahead while batch 5 ran
        again = MaskDraws(grid, count, "cluster", (3, 5), 2, 3001, False).draw(0, 6, 4)  # a resumed run's
        assert all(torch.equal(a, b) for a, b in zip(ahead, again))
        assert not torch.equal(first[0], ahead[0]) and not torch.equal(first[0], first[1])  # per batch, per pass
        other_rank = MaskDraws(grid, count, "cluster", (3, 5), 2, 3002, False).draw(0, 6, 4)
        assert not torch.equal(other_rank[0], ahead[0])
        # the next epoch's batch at the same index is masked anew (else an epoch draws only as many masks as it
        # has batches, the same every epoch), and so is another grid's (the next phase's)
        assert position_seed(3001, 1, 6, grid) != position_seed(3001, 0, 6, grid) != position_seed(3001, 0, 6, (4, 8))
        next_epoch = draws.draw(1, 6, 4)
        assert not any(torch.equal(a, b) for a, b in zip(next_epoch, ahead))
        # the masks are sample_mask's own (the same algorithm and distribution), from the position's generator
        generator = torch.Generator().manual_seed(position_seed(3001, 0, 6, grid))
        assert all(torch.equal(m, sample_mask(4, grid, count, "cluster", generator, (3, 5))) for m in ahead)
        assert ahead[0].shape == (4, count) and bool((ahead[0].diff(dim=1) > 0).all())
    finally:
        draws.close()
