"""One run per run directory: a lock that the kernel releases when its holder ends.

``RUN/run.lock`` is locked with ``flock`` by the main process (rank 0) of the job that trains in ``RUN``,
before the job writes anything there, and for as long as it runs; the other ranks of the job run under
it. A second command on the same run directory stops at once with one line naming the process that holds
it (pid, host, start time, command, recorded in the lock file). The kernel drops the lock when its process
ends, however it ends: a killed run (even by SIGKILL) never blocks its own resume. The lock file itself
stays (deleting it would let two processes lock two different files of the same name). A lock file that is a
symbolic link is refused, never followed (``common.system.paths.open_nofollow``).

Processes the holder forked (data-loader workers) share its lock and outlive it by a few seconds after a
SIGKILL; a lock still held for a holder that has exited on this host is therefore waited for, briefly.

``flock`` works on local file systems and on NFS (Linux emulates it with NFS byte-range locks); on a
file system without lock support the run goes on with a warning, unprotected. On NFS the server releases the
lock of a host that died when its lease ends (NFSv4), or when the host comes back (NFSv3): a lock whose host is
gone for good is cleared by deleting the file (docs/pretraining.md). A ``local_lock=flock`` mount keeps locks
per host, so hosts do not see each other's.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from common.system.paths import open_nofollow

__all__ = ["LOCK_FILE", "RunDirBusy", "run_dir_lock", "job_lock"]

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# how long a lock whose recorded holder has exited (on this host) is waited for: its forked data-loader
# workers notice their parent's death within 5 s (PyTorch's watchdog interval) and exit
ORPHAN_WAIT_S = 30.0


class RunDirBusy(RuntimeError):
    """Another process is running in the run directory (or its lock cannot be taken at all)."""


def _holder(fd: int) -> dict:
    """The holder's record, read from the lock file this process opened (not through its name again)."""
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _exited(record: dict) -> bool:
    """Whether the recorded holder is a process of this host that no longer exists."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def _describe(record: dict) -> str:
    if not record:
        return "a process that has not recorded itself yet"
    text = f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"
    command = str(record.get("command") or "")
    return text + (f" ({command[:200]}{' ...' if len(command) > 200 else ''})" if command else "")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def run_dir_lock(run_dir: Path, flag: str = "--run-dir", *, name: str = LOCK_FILE, what: str = "run",
                 advice: str = "wait for it to end (or stop it: running the same command again resumes it)"
                 ) -> Iterator[bool]:
    """Hold ``run_dir``'s lock while the block runs (this process only); ``flag``: the option that named the folder,
    ``name``: the lock file's, ``what``: the kind of command that holds it, ``advice``: what to do but use another
    folder (all said in the refusal). Yields whether it holds the lock: False on a file system without locks
    (warned: the block runs unlocked).

    The lock file is opened without following a symbolic link: it is truncated (its holder's record is rewritten),
    and a link planted in the folder would truncate the file it points to.

    Raises:
        RunDirBusy: another process holds it; the message names that process.
        common.system.paths.LinkRefused: the lock file is a symbolic link (named, in one line).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT, 0o644, "a lock file")
    try:
        try:
            locked = _try_lock(fd)
        except OSError as err:  # ENOLCK, EOPNOTSUPP: a file system without locks
            log.warning("cannot lock %s (%s): nothing stops a second run on %s from running at the same time",
                        path, err, run_dir)
            locked = None
        if locked is None:
            yield False
            return
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while not locked and _exited(_holder(fd)) and time.monotonic() < deadline:
            time.sleep(0.2)  # the holder was killed; processes it forked still hold the lock for a moment
            locked = _try_lock(fd)
        if not locked:
            record = _holder(fd)
            gone = " (it has exited, but processes it started still hold the lock)" if _exited(record) else ""
            raise RunDirBusy(f"{run_dir} is in use by another {what}: {_describe(record)}{gone}; {advice} or use "
                             f"another {flag}")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": " ".join([sys.executable, *sys.argv])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        try:
            yield True
        finally:
            os.ftruncate(fd, 0)  # still locked: nobody reads a half-cleared record
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def job_lock(run_dir: Path, dist) -> Iterator[None]:
    """Hold ``run_dir``'s lock for a whole job (collective): its main rank takes it, and every rank stops
    with :class:`RunDirBusy` when it is taken by another job."""
    with ExitStack() as stack:
        refusal = None
        if dist.is_main:
            try:
                stack.enter_context(run_dir_lock(run_dir))
            except RunDirBusy as err:
                refusal = str(err)
            except OSError as err:  # every rank must learn of it, not only this one
                refusal = f"cannot take the lock of run directory {run_dir} ({err})"
        refusal = dist.broadcast_object(refusal)
        if refusal is not None:
            raise RunDirBusy(refusal)
        yield
