"""Loader workers: they never collect their parent's garbage, and they end when their iteration, their kept loader
or the process does (``common.data.workers``)."""
import gc
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.data.clips import ClipDataset
from common.data.loader import ClipLoader
from common.data.manifests import open_cuts
from common.data.workers import forking


def loader(corpus, keep):
    return ClipLoader(open_cuts([corpus / "synth_train.jsonl.gz"]), ClipDataset(16000, seed=1), 4, seed=7, rank=0,
                      world_size=1, num_workers=2, keep_workers=keep, shuffle=True, drop_last=True)


def children_end(timeout=15.0):
    end = time.monotonic() + timeout
    while multiprocessing.active_children() and time.monotonic() < end:
        time.sleep(0.1)
    return not multiprocessing.active_children()


class _Cycle:
    """Garbage in a reference cycle whose destructor notes the process it runs in (a gloo process group's
    destructor hangs in a forked worker)."""

    def __init__(self, note):
        self.note, self.me = note, self

    def __del__(self):
        if os.getpid() != self.note[1]:
            self.note[0].write_text(str(os.getpid()))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keep", [False, True])
def test_workers_do_not_destroy_their_parents_garbage(synth_corpus, tmp_path, monkeypatch, keep):
    collect_first = ClipDataset.__getitem__

    def getitem(self, item):  # a worker's collector runs (as it does under a worker's own allocations)
        gc.collect()
        return collect_first(self, item)

    monkeypatch.setattr(ClipDataset, "__getitem__", getitem)
    note = tmp_path / "destroyed_in_a_worker"
    garbage = _Cycle((note, os.getpid()))
    gc.collect()  # it survives into the oldest generation, which the parent seldom collects
    del garbage
    clips = loader(synth_corpus, keep)
    for _, batch in zip(range(4), clips.batches(epochs=1)):
        assert batch.waveforms.shape == (4, 16000)
    clips.close()
    assert not note.exists(), f"a worker (pid {note.read_text()}) destroyed an object its parent left as garbage"
    gc.collect()  # the parent does, in the parent
    assert gc.isenabled()
    assert children_end()


def test_the_parent_collects_again_after_forking():
    with forking():
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.mark.timeout(120)
def test_kept_workers_end_when_the_loader_is_closed(synth_corpus):
    clips = loader(synth_corpus, keep=True)
    for phase in range(2):  # the same workers serve both iterations
        next(clips.batches())
        assert len(multiprocessing.active_children()) == clips.num_workers
    clips.close()
    assert children_end()


@pytest.mark.timeout(120)
def test_an_iterations_workers_end_when_it_is_dropped_in_a_cycle(synth_corpus):
    batches = loader(synth_corpus, keep=False).batches()
    next(batches)
    cycle = [batches]
    cycle.append(cycle)  # only the collector can free it: PyTorch's own shutdown then reached no worker
    assert multiprocessing.active_children()
    del batches, cycle
    gc.collect()
    assert children_end()


EXIT_SCRIPT = """
import multiprocessing, os, sys, time
from common.data.clips import ClipDataset
from common.data.loader import ClipLoader
from common.data.manifests import open_cuts
manifest, mode = sys.argv[1], sys.argv[2]


class Stuck(ClipDataset):  # every batch after the first decodes for ever (a dead network mount)
    def __getitem__(self, item):
        if item[1] > 0:
            time.sleep(1000)
        return super().__getitem__(item)


def loader(keep=False, dataset=ClipDataset):
    return ClipLoader(open_cuts([manifest]), dataset(16000, seed=1), 4, seed=7, rank=0, world_size=1, num_workers=2,
                      keep_workers=keep, shuffle=True, drop_last=True)


def alive_at_exit():
    global batches  # alive at exit, its workers too
    batches = loader(keep=mode == "keep", dataset=Stuck if mode == "stuck" else ClipDataset).batches()
    print(tuple(next(batches).waveforms.shape), flush=True)


if mode == "child":  # a process multiprocessing started ends through multiprocessing's exit, not atexit
    child = multiprocessing.get_context("fork").Process(target=alive_at_exit)
    child.start()
    child.join(60)
    sys.exit(child.exitcode if child.exitcode is not None else 3)
elif mode == "fork":  # a plain fork of the loader's owner leaves the owner's workers alone when it exits
    batches = loader().batches(epochs=1)
    next(batches)
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # atexit hooks run here
    os.waitpid(pid, 0)
    print(1 + sum(1 for _ in batches), flush=True)  # the rest of the epoch: 6 batches in all
else:
    alive_at_exit()
"""


@pytest.mark.parametrize("mode,out", [("keep", "(4, 16000)"), ("new", "(4, 16000)"), ("stuck", "(4, 16000)"),
                                      ("child", "(4, 16000)"), ("fork", "6")])
def test_a_script_ends_while_its_loader_is_alive(synth_corpus, tmp_path, mode, out):
    # the workers ignore the SIGTERM that multiprocessing sends them at exit (and PyTorch's last resort too): the
    # script, or a process multiprocessing started, waited for ever; a worker stuck in a decode as well
    script = tmp_path / "script.py"
    script.write_text(EXIT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(synth_corpus / "synth_train.jsonl.gz"), mode],
                          env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == out


def test_workers_forked_by_an_iteration_that_fails_to_start_are_ended():
    """PyTorch's iterator forks its workers, then draws its first indices from the sampler in this process: a
    sampler that raises there (a damaged Shar tar) left workers that no iterator held and that ignore the SIGTERM
    of multiprocessing's exit, which then joined them for ever (the process hung after its traceback)."""
    import torch
    from torch.utils.data import DataLoader, Sampler

    from common.data.workers import start_worker, start_workers

    class Broken(Sampler):
        def __iter__(self):
            raise ValueError("Shar tar x.tar cannot be read")
            yield 0

        def __len__(self):
            return 1

    before = set(multiprocessing.active_children())
    broken = DataLoader(torch.arange(8), sampler=Broken(), num_workers=2, worker_init_fn=start_worker)
    with pytest.raises(ValueError, match="cannot be read") as caught:
        start_workers(broken)
    # while the error is alive (its traceback holds the half-built iterator: a run reports it, an uncaught one
    # stays in sys.last_traceback until the exit), the workers are already gone
    assert set(multiprocessing.active_children()) - before == set() and caught.traceback


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_workers_log_into_the_runs_log_however_they_start(synth_corpus, tmp_path, start):
    """A spawned worker (macOS's start method; Python 3.14's forkserver on Linux) is a fresh interpreter: its lines
    went to logging's last resort, without time or level, and never into ``train.log``."""
    import logging

    from common.data.cache import ClipCache
    from common.system.logger import setup_logging

    cache = tmp_path / "cache"
    for _ in range(2):  # filled, then read
        run = ClipLoader(open_cuts([synth_corpus / "synth_valid.jsonl.gz"]),
                         ClipDataset(16000, seed=1, cache=ClipCache("disk", cache)), 4, seed=7, rank=0, world_size=1,
                         num_workers=1, shuffle=False, drop_last=False)
        if _ == 1:
            for file in cache.rglob("*.npy"):
                file.write_bytes(b"junk")  # damaged: each worker says so, and decodes again
            setup_logging(tmp_path / "run", level=logging.INFO)
            before = multiprocessing.get_start_method(allow_none=True)
            multiprocessing.set_start_method(start, force=True)
            try:
                next(iter(run.batches(epochs=1)))
            finally:
                multiprocessing.set_start_method(before, force=True)
        else:
            for _batch in run.batches(epochs=1):
                pass
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    damaged = [line for line in lines if "clip cache:" in line and "is unreadable" in line]
    assert damaged and all(" WARNING common.data.cache: clip cache: " in line for line in damaged), lines


def test_a_forked_worker_logs_through_its_callers_own_handlers_alone(synth_corpus, tmp_path, capfd):
    """A caller's own logging (a notebook's handler, no run of this package's): a forked worker has it already, and a
    console of the package's beside it printed every worker line twice."""
    import logging

    from common.data.cache import ClipCache

    cache = tmp_path / "cache"
    dataset = ClipDataset(16000, seed=1, cache=ClipCache("disk", cache))
    cuts = open_cuts([synth_corpus / "synth_valid.jsonl.gz"])
    for _batch in ClipLoader(cuts, dataset, 4, seed=7, rank=0, world_size=1, num_workers=0, shuffle=False,
                             drop_last=False).batches(epochs=1):
        pass
    for file in cache.rglob("*.npy"):
        file.write_bytes(b"junk")
    own = logging.FileHandler(tmp_path / "own.log")
    own.setFormatter(logging.Formatter("USER %(message)s"))
    root = logging.getLogger()
    root.addHandler(own)
    try:
        capfd.readouterr()
        loader = ClipLoader(cuts, ClipDataset(16000, seed=1, cache=ClipCache("disk", cache)), 4, seed=7, rank=0,
                            world_size=1, num_workers=1, shuffle=False, drop_last=False)
        assert multiprocessing.get_start_method() == "fork"
        next(iter(loader.batches(epochs=1)))
    finally:
        root.removeHandler(own)
        own.close()
    lines = [line for line in (tmp_path / "own.log").read_text().splitlines() if "is unreadable" in line]
    assert lines and len(lines) == len(set(lines)), lines
    assert "WARNING common.data.cache" not in capfd.readouterr().err  # no console of the package's beside it


def _spawned_with_own_console(state: dict, own_log: str) -> None:
    """A spawned worker whose script made a console of its own at its top level (run again in the child)."""
    import logging

    from common.system.logger import join_logging

    own = logging.FileHandler(own_log)
    own.setFormatter(logging.Formatter("USER %(message)s"))
    logging.getLogger().addHandler(own)
    join_logging(state)
    logging.getLogger("common.data.cache").warning("clip cache: a line from the worker")


def test_a_spawned_worker_with_a_console_of_its_own_still_writes_the_runs_log(tmp_path, capfd):
    """Its script's own console (a top-level basicConfig, run again in a spawned child) kept the worker's lines out
    of train.log: the package's console is not added beside it, the run's log is."""
    from common.system.logger import logging_for_workers, setup_logging

    setup_logging(tmp_path / "run")
    state = logging_for_workers()
    capfd.readouterr()
    child = multiprocessing.get_context("spawn").Process(target=_spawned_with_own_console,
                                                          args=(state, str(tmp_path / "own.log")))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert "USER clip cache: a line from the worker" in (tmp_path / "own.log").read_text()
    assert " WARNING common.data.cache: clip cache: a line from the worker" in (tmp_path / "run" / "train.log"
                                                                               ).read_text()
    assert "a line from the worker" not in capfd.readouterr().err  # its own console is the console
