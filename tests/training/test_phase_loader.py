"""One training loader across a run's phases: its worker processes start once, before the first phase's clock,
serve every phase (the clips are the same; the front end on the device makes each phase's resolution) and
stop when the run does; the run trains on exactly the batches a run without workers trains on. Validation's
loader likewise starts its workers once, at the first round."""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import run, weights

pytestmark = pytest.mark.slow  # end-to-end: every test here trains


@pytest.mark.timeout(300)
def test_a_run_starts_its_loader_workers_once_and_stops_them(tmp_path, synth_corpus, monkeypatch):
    started: list[bool] = []
    get_iterator = DataLoader._get_iterator

    def counted(self):  # a DataLoader builds a new iterator (and, with workers, new processes) here only
        if self.num_workers > 0:
            started.append(self.persistent_workers)
        return get_iterator(self)

    monkeypatch.setattr(DataLoader, "_get_iterator", counted)
    before = set(multiprocessing.active_children())
    assert run(tmp_path / "workers", synth_corpus, "data.num_workers=1", "train.eval_every=2", steps=(3, 3)) == 0
    rounds = json.loads((tmp_path / "workers" / "ledger.json").read_text())["evals"]
    assert len(rounds) >= 3 and {e["phase"] for e in rounds} == {0, 1}
    # training's loader and validation's, each started once for every phase and round (validation's workers
    # forked afresh each round cost their start-up every time, and each fork of a process running threads risks
    # a worker's rare crash at start-up)
    assert started == [True, True]
    assert not set(multiprocessing.active_children()) - before
    assert run(tmp_path / "inline", synth_corpus, "data.num_workers=0", steps=(3, 3)) == 0
    a, b = weights(tmp_path / "workers"), weights(tmp_path / "inline")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(300)
def test_a_run_stopped_early_stops_its_workers(tmp_path, synth_corpus):
    before = set(multiprocessing.active_children())
    assert run(tmp_path / "run", synth_corpus, "data.num_workers=1", steps=(3, 3), stop=4) == 0
    assert not set(multiprocessing.active_children()) - before
