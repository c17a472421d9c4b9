"""A phase's log window: losses summed on the device, reduced over every rank at its end and at a checkpoint,
where rank 0 keeps the folded sums that a resumed run starts from."""

import json

import pytest
import torch

from common.system.distributed import Dist
from common.training.log_window import LogWindow

ONE = Dist(0, 1, 0, torch.device("cpu"))


def _logs(loss: float, mpg: float | None = None) -> dict:
    return {"loss": torch.tensor(loss), **({"mpg": torch.tensor(mpg)} if mpg is not None else {})}


def test_the_means_are_over_the_micro_batches_and_the_window_empties():
    window = LogWindow(ONE)
    window.add(_logs(1.0, 4.0))
    window.add(_logs(2.0, 6.0))
    assert window.means() == {"loss": 1.5, "mpg": 5.0}
    assert window.means() == {}  # emptied
    window.add(_logs(3.0))
    assert window.means() == {"loss": 3.0}


def test_a_window_folded_at_a_checkpoint_and_resumed_logs_what_the_uninterrupted_one_does():
    values = [0.1, 0.7, 1.3]
    whole = LogWindow(ONE)
    for v in values:
        whole.add(_logs(v))
    stopped = LogWindow(ONE)
    for v in values[:2]:
        stopped.add(_logs(v))
    saved = json.loads(json.dumps(stopped.fold()))  # as the checkpoint's trainer state holds it
    assert saved["_n"] == 2
    resumed = LogWindow(ONE, saved)
    resumed.add(_logs(values[2]))
    assert resumed.means() == whole.means()  # bitwise: the same additions in the same order
    assert LogWindow(Dist(1, 2, 1, torch.device("cpu")), saved).n == 0  # the other ranks start empty


def _rank(dist: Dist) -> dict:
    rank = dist.rank
    window = LogWindow(dist)
    if rank != 2:  # rank 2's micro-batches were all empty: it has no keys at all
        window.add(_logs(float(rank + 1), 10.0 * (rank + 1) if rank == 1 else None))
        window.add(_logs(float(rank + 2)))
    saved = window.fold()
    kept = window.n
    window.add(_logs(100.0))
    means = window.means()
    return {"saved": saved, "kept": kept, "means": means}


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_every_ranks_micro_batches_are_reduced_and_only_rank_0_keeps_the_fold(tmp_path, world):
    from tests.ranks import spawn_ranks

    results = spawn_ranks(_rank, world, tmp_path)
    # ranks 0 and 1 add 2 micro-batches each: losses 1, 2 and 2, 3; rank 1 also logs mpg 20 once
    assert all(r["saved"] == {"loss": 8.0, "mpg": 20.0, "_n": 4.0} for r in results)
    assert [r["kept"] for r in results] == [4] + [0] * (world - 1)
    # after the fold every rank adds 100 once: rank 0's window holds the fold besides
    assert all(r["means"] == {"loss": (8.0 + 100.0 * world) / (4 + world), "mpg": 20.0 / (4 + world)}
               for r in results)
