"""Several gloo ranks for one test: functions (:func:`spawn_ranks`) or the job scripts ``tests/*_job.py``
(:func:`launch_ranks`, :func:`launch_cases`), each rank in a process of its own, a hang turned into a failure.

The ranks are forked from a fork server that has imported torch, DeepSpeed, timm, Lhotse and scikit-learn once
(``multiprocessing``'s ``forkserver``, one per pytest worker): a rank then starts in about a second (it imports
the package) instead of the 5-8 s of CPU that those imports take in a fresh interpreter, the largest cost of the
multi-rank tests on the 2-core machine. The server imports and runs nothing else (no thread pool, no process group,
no device), so each rank begins as a fresh process would, with its own environment (the launchers' variables),
session, log file, exit code, exit hooks (run as an interpreter's exit runs them) and Python and numpy generators
seeded from the system. One difference is kept in mind: a fresh interpreter draws its own string-hash seed, and
ranks forked from one server share theirs (it still differs between test sessions). The tests that start
ranks through the deepspeed launcher (tests/training/test_failures.py, tests/pretrain/, tests/system/test_run_lock.py)
keep fresh interpreters.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import random
import runpy
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers import ROOT, _free_port

# The libraries a rank needs, imported once by the fork server (a module that fails to import is imported by the
# rank). Not the package: a rank imports it itself (a second or less once these are loaded), so that the exit hooks
# it registers at import (common.data.workers) are the rank's: a forked process starts without the server's.
PRELOAD = ["torch", "torchaudio", "deepspeed", "deepspeed.runtime.zero.muon.original_muon", "timm", "lhotse",
           "sklearn.metrics", "safetensors.torch", "torch.utils.tensorboard"]
# Every rank runs on the CPU, one thread: OpenMP reads its thread count when torch loads, in the server.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
              "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}


def _context() -> multiprocessing.context.BaseContext:
    """The fork server's context; the server starts (with :data:`PRELOAD` and :data:`SERVER_ENV`) at its first
    use in this process."""
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts; nothing once it runs
    saved = {key: os.environ.get(key) for key in SERVER_ENV}
    os.environ.update(SERVER_ENV)
    try:
        forkserver.ensure_running()  # starts it in this environment the first time, else checks it is alive
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return context


def _spawned(rank: int, target: Callable, world_size: int, port: int, out: str) -> None:
    """One rank of :func:`spawn_ranks`: its gloo group, ``target(dist)``, and what it returned in ``out``."""
    import torch
    import torch.distributed as torch_dist

    from common.system.distributed import Dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _fresh_draws()
    torch_dist.init_process_group("gloo", rank=rank, world_size=world_size)
    result = target(Dist(rank, world_size, rank, torch.device("cpu")))
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch_dist.destroy_process_group()


def spawn_ranks(target: Callable, world_size: int, out: Path, timeout: float = 120) -> list:
    """Run ``target(dist)`` (a module-level function returning JSON-able data) on ``world_size`` gloo ranks;
    returns what each rank returned, in rank order (kept in ``out``). A rank that fails fails the test; ranks
    still running after ``timeout`` seconds (a hang) are killed and fail it."""
    import torch.multiprocessing as mp

    _context()
    context = mp.start_processes(_spawned, args=(target, world_size, _free_port(), str(out)), nprocs=world_size,
                                 join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} gloo ranks did not finish in {timeout:.0f} s")
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world_size)]


def _script_rank(script: str, argv: list[str], env: dict[str, str], log: str) -> None:
    """One rank of :func:`launch_ranks`, as ``python SCRIPT ARGV`` would run it in a session of its own with
    ``env`` as its whole environment and its output in ``log``."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for stream in (1, 2):
        os.dup2(fd, stream)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    _fresh_draws()
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")  # its sys.exit(code) is the process's exit code
    finally:
        atexit._run_exitfuncs()  # what an interpreter's exit runs (multiprocessing's own exit does not)


def _fresh_draws() -> None:
    """Seed Python's and numpy's global generators from the system, as a fresh interpreter does: forked from one
    server, every rank of every launch would otherwise draw the same numbers."""
    import numpy as np

    random.seed()
    np.random.seed()


def launch_ranks(world_size: int, script: str, job: Path, out: Path, timeout: float, **env_extra: str) -> None:
    """Run ``tests/SCRIPT JOB`` in ``world_size`` processes on gloo, with the environment torchrun and the
    deepspeed launcher set (and ``env_extra``). A rank that fails, or still runs after ``timeout`` seconds (a
    hang), fails the test; every rank is killed, with the processes it started. Each rank logs to
    ``out/rankN.log``."""
    context, procs = _context(), []
    deadline = time.monotonic() + timeout
    try:
        for rank in range(world_size):
            env = {**os.environ, **SERVER_ENV, "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", **env_extra}
            proc = context.Process(target=_script_rank, args=(str(ROOT / "tests" / script), [str(job)], env,
                                                               str(out / f"rank{rank}.log")), daemon=False)
            proc.start()
            procs.append(proc)
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:  # (a rank that could not start leaves the started ones to this too)
        hung = [p for p in procs if p.exitcode is None]
        for proc in hung:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the rank's session: its loader workers too
            except ProcessLookupError:
                pass
            proc.join()
    tails = "\n".join(f"--- rank {r}:\n" + (out / f"rank{r}.log").read_text()[-2500:] for r in range(world_size))
    assert not hung, f"{len(hung)} of {world_size} ranks still running after {timeout:.0f} s (a hang)\n{tails}"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{tails}"


def launch_cases(world_size: int, cases: list[tuple[str, str, list[str]]], out: Path, timeout: float,
                 expect: dict[str, int] | None = None, remove: dict[str, Path] | None = None) -> dict[str, list]:
    """Run ``cases`` (name, entry, argv) one after another in ``world_size`` processes on gloo
    (:func:`launch_ranks`); a case ending with another exit code than ``expect`` says (default 0) fails the test;
    ``remove``: a folder rank 0 deletes before a case, all ranks past the case before it.
    Returns per case the ranks' reports (tests/shard_job.py)."""
    out.mkdir(parents=True)
    job = out / "job.json"
    job.write_text(json.dumps({"out": str(out), "cases": [
        {"name": n, "entry": e, "argv": a, "port": _free_port(), "expect": (expect or {}).get(n, 0),
         "remove": str((remove or {}).get(n, ""))} for n, e, a in cases]}))
    launch_ranks(world_size, "shard_job.py", job, out, timeout)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    return {name: [report[name] for report in reports] for name, _, _ in cases}
