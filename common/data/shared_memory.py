"""The shared memory that the loader's worker processes hand their batches through (``/dev/shm`` on Linux).

A worker's batch reaches the training process as tensors in shared memory. A container's ``/dev/shm`` is small
unless it is given more (Docker's default is 64 MiB), and the batches in flight are many: each worker decodes
``prefetch_factor`` batches ahead, on every rank of the node, and a batch of 10 s clips at 16 kHz is 640 KB a
clip (1.3 MB at HTS-AT's 32 kHz). Two things here:

- :func:`share`: a worker moves its batch into shared memory itself, in its own thread, as PyTorch's default
  collation does. Left to the queue that carries the batch, the move happens in the queue's feeder thread,
  which prints the failure of a full ``/dev/shm`` and drops the batch: the training process then waits for it
  for ever. Here the failure is the worker's error (:class:`SharedMemoryFull`), which the loader hands to the
  training process, and the command ends with one line (``common.data.workers.describe_worker_failure``).
- :func:`check_room`: before the workers start, a warning where ``/dev/shm`` is smaller than the batches the
  node's ranks would keep in flight, with what to change.
- :func:`check_socket_dir`: a batch's shared memory is handed over as file descriptors, through a UNIX socket that
  ``multiprocessing`` makes under the temporary folder (``$TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX``). A socket's
  path holds 107 bytes (103 on macOS): under a longer ``TMPDIR`` (a job scheduler's per-job folder) the hand-over
  fails in the queue's feeder thread, which prints it and drops the batch, and the training process waited for it
  for ever.
  Refused before the workers start, naming the folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["SHM", "ADVICE", "SharedMemoryFull", "shm_space", "shm_words", "in_flight_bytes", "check_room", "share",
           "check_socket_dir"]

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")
ADVICE = ("give the machine or container more shared memory (docker run --shm-size=8g, a larger /dev/shm) or "
          "lower data.num_workers")
_warned: set[tuple[int, int]] = set()  # (need, total) already said in this process


class SharedMemoryFull(RuntimeError):
    """A loader worker found no room in shared memory for its batch."""


def mib(size: float) -> str:
    return f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size / 2**20:.2f} MiB"


def shm_space(path: Path = SHM) -> tuple[int, int] | None:
    """``(total, free)`` bytes of the shared-memory file system; None where there is none (not Linux)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return usage.total, usage.free


def shm_words(path: Path = SHM) -> str:
    """``/dev/shm: 3 MiB free of 64 MiB`` (``no /dev/shm`` where there is none)."""
    space = shm_space(path)
    return f"{path}: {mib(space[1])} free of {mib(space[0])}" if space else f"no {path}"


def in_flight_bytes(batch_bytes: int, workers: int, prefetch_factor: int, ranks: int) -> int:
    """The shared memory a node's loaders keep busy: every worker's ``prefetch_factor`` batches, plus the two the
    training process holds (the one it trains on, the one being copied to the device), on each of ``ranks``."""
    return batch_bytes * (workers * prefetch_factor + 2) * ranks if workers > 0 else 0


def check_room(batch_bytes: int, workers: int, prefetch_factor: int, ranks: int, path: Path = SHM) -> bool:
    """Warn (once per process and size) where the shared-memory file system is smaller than what the node's
    loaders keep in flight (:func:`in_flight_bytes`). Returns whether there is room (True where unknown)."""
    space = shm_space(path)
    need = in_flight_bytes(batch_bytes, workers, prefetch_factor, ranks)
    if space is None or need <= space[0]:
        return True
    if (need, space[0]) not in _warned:
        _warned.add((need, space[0]))
        log.warning("%s holds %s, less than the batches the loaders keep in flight: about %s (%d worker(s) x %d "
                    "batches ahead + 2, of %s each, on %d rank(s) of this machine); a worker that finds it full "
                    "stops the run: %s", path, mib(space[0]), mib(need), workers, prefetch_factor, mib(batch_bytes),
                    ranks, ADVICE)
    return False


# bytes of an AF_UNIX socket's path: sun_path holds 108 on Linux, 104 on macOS, with its closing NUL
SOCKET_PATH_MAX = 103 if sys.platform == "darwin" else 107
_SOCKET_NAMES = len("/pymp-XXXXXXXX/listener-XXXXXXXX")  # what multiprocessing adds to the temporary folder


def check_socket_dir(folder: str | None = None) -> None:
    """Refuse a temporary folder (``folder``, default ``tempfile.gettempdir()``: ``TMPDIR``) too long for the
    sockets the loader's workers hand their batches through (see the module docstring).

    Raises:
        ValueError: naming the folder, its length and what to do.
    """
    folder = folder or tempfile.gettempdir()
    length = len(os.fsencode(folder)) + _SOCKET_NAMES
    if length > SOCKET_PATH_MAX:
        raise ValueError(f"the temporary folder {folder} (TMPDIR) is too long for the sockets the loader's workers "
                         f"hand their batches through ({length} bytes of a socket's path, at most "
                         f"{SOCKET_PATH_MAX}): set TMPDIR to a folder of at most {SOCKET_PATH_MAX - _SOCKET_NAMES} "
                         f"characters (e.g. /tmp), or data.num_workers: 0")


def share(*tensors: torch.Tensor | None, path: Path = SHM) -> None:
    """In a loader worker: move ``tensors`` (None skipped) into shared memory, in place.

    Raises:
        SharedMemoryFull: no room for them (the sizes and ``path``'s space in the message).
    """
    try:
        for tensor in tensors:
            if tensor is not None:
                tensor.share_memory_()
    except RuntimeError as err:
        if "shared memory" not in str(err) and "shm" not in str(err):
            raise
        size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        raise SharedMemoryFull(f"a loader worker (pid {os.getpid()}) found no room in shared memory for a batch of "
                               f"{mib(size)} ({shm_words(path)}): {ADVICE}") from err
