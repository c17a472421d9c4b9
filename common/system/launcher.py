"""What the launcher (``deepspeed``, ``torchrun``, ``srun``/``mpirun`` via their variables) says about this process:
its ``RANK`` and the job's ``WORLD_SIZE``; plain ``python`` sets neither (one process, rank 0).

One reader of each, so that a malformed value is the same one-line error wherever it is first read, and the code that
reports a failure (which must not fail itself) reads it leniently (:func:`several`)."""

from __future__ import annotations

import os

__all__ = ["world_size", "rank", "local_rank", "several", "rank_name"]


def _whole(key: str, default: int, least: int) -> int:
    text = os.environ.get(key, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise ValueError(f"{key}: expected a whole number{' of ranks' if key == 'WORLD_SIZE' else ''} "
                         f"({least} or more), got {os.environ[key]!r}")
    return value


def world_size() -> int:
    """The job's ranks: ``WORLD_SIZE``, 1 without one. Raises ValueError naming the variable on another value."""
    return _whole("WORLD_SIZE", 1, 1)


def rank() -> int:
    """This process's rank: ``RANK``, 0 without one. Raises ValueError naming the variable on another value."""
    return _whole("RANK", 0, 0)


def local_rank() -> int:
    """This process's place on its host: ``LOCAL_RANK``, 0 without one. Raises ValueError naming the variable on
    another value."""
    return _whole("LOCAL_RANK", 0, 0)


def several() -> bool:
    """Whether this process is one of several ranks; never raises (a malformed ``WORLD_SIZE`` counts as one process:
    for the code that reports an error)."""
    try:
        return world_size() > 1
    except ValueError:
        return False


def rank_name() -> str:
    """``RANK`` as the launcher wrote it, ``?`` without one: for messages."""
    return os.environ.get("RANK", "?")
