"""What the training loader's worker processes do at start, how the parent forks them, and how they end.

A forked worker inherits a copy of everything its parent held, garbage included: objects in reference cycles that
the parent's collector has not reached yet. The worker's own collector would then destroy them in the worker,
where the threads their destructors wait for do not exist. A gloo process group left in a cycle by a finished run
(a notebook, the tests) hung a worker for ever that way: ``~ProcessGroupGloo`` waits on a condition variable for
threads that only the parent has. So the parent's collector is paused while it forks its workers (they inherit
it paused), and each worker freezes what it inherited (``gc.freeze``: never collected in the worker; the parent
collects its own garbage) before it resumes collecting. Freezing also keeps the worker from touching the
inherited objects' pages (less copy-on-write memory per worker).

Ending them is explicit, not left to the collector. PyTorch's iterator shuts its workers down in its ``__del__``;
when the iterator is in a reference cycle (a kept loader's is: through the stream of cut batches back to its
``ClipLoader``), the collector first runs the weakref callbacks of the cycle, closing the iterator's queues'
feeder threads, then ``__del__``, whose stop sentinels then never reach the workers, which wait for ever. And the
workers ignore the stop signals (:func:`ignore_stop_signals`), the SIGTERM included that ``multiprocessing`` sends
its daemonic children when the parent exits before it joins them: a script that ended while a loader's iterator
was alive (a module-level ``batches = loader.batches()``, kept workers) waited for ever. So every iterator with
workers is held here from :func:`start_workers` until :func:`end_workers` (a kept loader's ``close``, an
iteration's owner going: :func:`end_with`, or the process's exit).

A worker that dies (the out-of-memory killer, a bus error, no room in shared memory) stops the run with one line
that names it and the likely cause (:func:`describe_worker_failure`, from the signal PyTorch reports or the
held worker's exit status).
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import multiprocessing
import os
import re
import signal
import traceback
import weakref
from multiprocessing import util
from typing import Iterator

from torch.utils.data import DataLoader

from common.data.shared_memory import ADVICE, SharedMemoryFull, shm_words
from common.system.logger import join_logging
from common.system.signals import STOP_SIGNALS

_LIVE: dict[int, Iterator] = {}  # this process's iterators whose workers have not been ended, by id
_EXIT_HOOKED: set[int] = set()  # the processes (pids) whose multiprocessing exit runs _end_all (start_workers)
os.register_at_fork(after_in_child=_LIVE.clear)  # a forked process does not own its parent's workers


def start_workers(loader: DataLoader) -> Iterator:
    """``iter(loader)``, its workers forked with the collector paused (:func:`forking`) and held until
    :func:`end_workers` (a kept loader's iterator is the same object each time). Where ``iter`` fails after it
    forked them (PyTorch's iterator draws its first indices from the sampler, in this process: a damaged Shar tar
    raises there), the workers it started are ended before the error goes on: the half-built iterator, which only
    the error's traceback holds, would have kept them alive, ignoring the SIGTERM of ``multiprocessing``'s exit,
    which then joined them for ever."""
    before = set(multiprocessing.active_children())
    try:
        with forking():
            iterator = iter(loader)
    except BaseException as err:
        half = _iterator_of(err)
        if half is not None:  # its own shutdown (stop sentinels, joins), then a kill of its workers left
            _LIVE[id(half)] = half
            end_workers(half)
        else:  # not found in the traceback (another PyTorch): the children started meanwhile, which were its
            for child in set(multiprocessing.active_children()) - before:
                child.kill()
                child.join()
        raise
    if hasattr(iterator, "_shutdown_workers"):
        _LIVE[id(iterator)] = iterator
        if os.getpid() not in _EXIT_HOOKED:
            # a process that multiprocessing started (a Pool's, a Process's) ends without the atexit hooks, through
            # multiprocessing's own exit, which runs its finalizers of priority >= 0 before it terminates and joins
            # its children; the registry is per process (a child starts with it empty)
            _EXIT_HOOKED.add(os.getpid())
            util.Finalize(None, _end_all, exitpriority=100)
    return iterator


def _iterator_of(err: BaseException):
    """The DataLoader iterator whose construction raised ``err`` (the innermost ``self`` of its traceback's frames
    that has workers to shut down), or None."""
    found = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        candidate = frame.f_locals.get("self")
        if hasattr(candidate, "_shutdown_workers") and hasattr(candidate, "_workers"):
            found = candidate
    return found


def end_workers(iterator: Iterator) -> None:
    """Shut ``iterator``'s workers down now and let it go (idempotent): PyTorch's own shutdown (a stop sentinel to
    every worker, a join of up to 5 s each), then a worker still alive (a decode stuck on a dead network mount) is
    killed: PyTorch's last resort, SIGTERM, is one the workers ignore (:func:`ignore_stop_signals`)."""
    if _LIVE.pop(id(iterator), None) is not None:
        iterator._shutdown_workers()
        for worker in getattr(iterator, "_workers", ()):
            if worker.is_alive():
                worker.kill()
                worker.join()


def end_with(owner: object, iterator: Iterator) -> None:
    """:func:`end_workers` when ``owner`` is collected (by reference count or in a cycle: ``iterator`` is held
    here, so its queues still work then). ``owner`` must not be reachable from ``iterator``."""
    if id(iterator) in _LIVE:
        weakref.finalize(owner, end_workers, iterator).atexit = False  # at exit: _end_all, before multiprocessing


@atexit.register
def _end_all() -> None:
    """At exit, before ``multiprocessing`` terminates and joins its children (its hook was registered before this
    one; hooks run last-registered first), and before PyTorch's own hook marks the interpreter as exiting (also
    registered before: ``torch.utils.data`` is imported above), after which its shutdown does nothing. In a process
    that ``multiprocessing`` started: its exit's finalizer (:func:`start_workers`)."""
    for iterator in list(_LIVE.values()):
        end_workers(iterator)


# what a worker ignores (:func:`ignore_stop_signals`), held back from the moment it is forked until it does
_WORKER_IGNORES = (*STOP_SIGNALS, signal.SIGINT)


@contextlib.contextmanager
def forking() -> Iterator[None]:
    """Pause the parent's garbage collector while worker processes are forked (``iter(DataLoader)``); the
    workers inherit it paused and resume it in :func:`start_worker`, after freezing what they inherited. The
    signals a worker ignores are held back meanwhile (a signal mask, which a forked process inherits): one that
    came between a worker's fork and its :func:`start_worker` reached it with Python's default handling (a
    Ctrl-C's traceback, a scheduler's SIGTERM killing it); the parent gets it when the block ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_IGNORES)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if was_enabled:
            gc.enable()


def start_worker(worker_id: int, logs: dict | None = None) -> None:
    """A loader worker's ``worker_init_fn``: freeze the parent's objects (see the module's docstring), then
    collect the worker's own garbage as usual; ignore the stop signals (:func:`ignore_stop_signals`) and let
    through those :func:`forking` held back (ignored now); log as the parent does (``logs``: its
    ``common.system.logger.logging_for_workers``, for a worker that did not inherit its handlers: spawned)."""
    gc.freeze()
    gc.enable()
    ignore_stop_signals()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_IGNORES)
    join_logging(logs)


def ignore_stop_signals() -> None:
    """In a loader worker process: a scheduler's SIGTERM or SIGUSR1 is not for it, nor a terminal's Ctrl-C (SIGINT).
    SLURM, torchrun and the deepspeed launcher signal every process of a job, a terminal every process of its
    foreground group; PyTorch's workers die of a SIGTERM that their parent did not send, and the training process
    would then fail on the lost worker (while it saves its stop checkpoint) instead of checkpointing and stopping
    (``common.system.signals``); a SIGINT met in a worker's exit hooks printed their traceback and left the worker's
    multiprocessing folder (``/tmp/pymp-*``) behind. The workers end when their loader shuts them down, or when their
    parent is gone."""
    for signum in _WORKER_IGNORES:
        signal.signal(signum, signal.SIG_IGN)


_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited "
                          r"unexpectedly)")


def _exit_signal(pids: list[int]) -> str | None:
    """The signal that ended one of the workers ``pids`` of an iteration held here (None: unknown)."""
    for iterator in _LIVE.values():
        for worker in getattr(iterator, "_workers", ()):
            if worker.pid in pids and worker.exitcode is not None and worker.exitcode < 0:
                return signal.Signals(-worker.exitcode).name
    return None


def describe_worker_failure(err: BaseException) -> str | None:
    """One line for a loader worker's failure that stops a run (the training process learns of it from the
    loader): no room in shared memory (``common.data.shared_memory``), a worker killed (the out-of-memory killer's
    SIGKILL, a bus error) or gone; None for anything else."""
    text = str(err)
    if isinstance(err, SharedMemoryFull):
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1].split("SharedMemoryFull: ", 1)[-1]  # the worker's own message, after its traceback
    if "unable to allocate shared memory" in text or "unable to write to file </torch_" in text:
        return f"the loader's workers ran out of shared memory ({shm_words()}): {ADVICE}"
    died = _WORKER_DIED.search(text)
    if died is None:
        return None
    pids = [int(pid) for pid in died[1].replace(",", " ").split()]
    # PyTorch's words (Killed, Bus error) or the signal's (SIGKILL, SIGBUS)
    name = died[2].strip() if died[2] else _exit_signal(pids)
    which = f"a data loader worker (pid {', '.join(map(str, pids))})"
    if name is None:
        return f"{which} exited unexpectedly; the output above may say why ({shm_words()})"
    if name in ("Killed", "SIGKILL"):
        return (f"{which} was killed (signal {name}): by the kernel's out-of-memory killer? The machine's "
                f"memory, not the GPU's, ran out: lower data.num_workers or the batch")
    if name in ("Bus error", "SIGBUS"):
        return f"{which} was killed (signal {name}): shared memory full? ({shm_words()}): {ADVICE}"
    return f"{which} was killed by signal {name}"
