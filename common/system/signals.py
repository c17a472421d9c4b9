"""Stopping on a signal: a scheduler's notice (SIGTERM, or SIGUSR1 ahead of time: SLURM's ``--signal``) ends a
training run with a checkpoint instead of losing the steps since the last one.

While a run trains (:func:`stop_on_signals`, entered by ``common.cli.training_session``), SIGTERM and SIGUSR1
only record that a stop was asked for; the trainer checkpoints after the step it is taking and stops
(:class:`StoppedBySignal`, exit status 128 + the signal's number, as a shell reports a process the signal
ended). On several ranks the ranks agree at the end of a log window (``train.log_every`` steps, where they
synchronise anyway), so that every rank saves the same step; one process stops after its current step. More
signals change nothing (a scheduler signals every process of a job, and the ``deepspeed`` launcher signals its
ranks again): the run still checkpoints, within the grace period the sender gives before SIGKILL (the launcher's
is 30 s). A signal that comes while a command starts (reading its data, an index of a large corpus, its
``--init``, building the engine: minutes on AudioSet) stops it before its first step, with nothing to save,
instead of after a step and a checkpoint that might not finish within the grace period.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["STOP_SIGNALS", "StoppedBySignal", "stop_on_signals", "stop_requested", "request_stop", "stdout_closed",
           "reader_gone", "piped"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []  # the signal that asked for a stop (empty: none)


class StoppedBySignal(Exception):
    """The run stopped, checkpointed, because a signal asked it to."""

    def __init__(self, signum: int, where: str, saved: bool = True) -> None:
        self.signum = signum
        done = "the checkpoint is saved" if saved else "nothing was trained since the last checkpoint (if any)"
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; {done}: run the same command again to "
                         f"resume")


def stop_requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _received[0] if _received else None


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Record a stop request as the signal handler does (the handler, and tests that stand for a scheduler)."""
    if not _received:
        _received.append(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: :data:`STOP_SIGNALS` ask for a stop (:func:`stop_requested`), the first one recorded. Outside the main
    thread (where Python cannot handle signals) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def handler(signum, frame) -> None:
        request_stop(signum)

    _received.clear()
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()


def stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader went away (``command | head``; another pipe that broke, a
    socket's or a child process's, is not this): polling its end reports an error."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor, or no poll on this system
        return False


def reader_gone() -> int:
    """The reader of standard output went away (:func:`stdout_closed`): nothing more is said; standard output is
    pointed at /dev/null so that the interpreter's last flush does not fail again. Returns the shell's status for
    a process ended by SIGPIPE (141)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor to point elsewhere
        pass
    return 128 + signal.SIGPIPE


def piped(body: Callable[[], int]) -> int:
    """Run a command's body and flush its output; a reader of standard output that went away (``command | head``)
    ends it quietly with :func:`reader_gone`'s status. Another broken pipe (a socket's, a child's) is raised: a
    failure like any other."""
    try:
        code = body()
        sys.stdout.flush()  # a reader that went away is met here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        if not stdout_closed():
            raise
        return reader_gone()
