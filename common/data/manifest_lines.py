"""A manifest's lines: where a recipe's path points, opening a ``.jsonl`` or ``.jsonl.gz`` manifest (or a Shar cuts
shard) for its lines, counting its clips without parsing them, and what to say of one cut short."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

__all__ = ["manifest_path", "open_lines", "count_lines", "truncated_manifest", "CUT_SHORT"]


def manifest_path(path: str | os.PathLike) -> Path:
    """A manifest or Shar folder as a recipe names it, ``~`` and ``$VARS`` expanded (as every reader reads it)."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def open_lines(path: Path):
    """A ``.jsonl`` or ``.jsonl.gz`` manifest (or Shar shard) opened for its lines, as bytes."""
    path = Path(path)
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


# what reading a gzipped manifest cut short raises (an interrupted copy), as :func:`truncated_manifest` says it
CUT_SHORT = (EOFError, zlib.error, gzip.BadGzipFile)


def truncated_manifest(path: Path, err: Exception) -> str:
    """What to say of a manifest that cannot be read to its end (a gzip stream cut short: an interrupted copy)."""
    return (f"manifest {path} cannot be read to its end ({type(err).__name__}: {err}): a truncated or damaged copy? "
            f"Copy or prepare it again")


# a manifest's clips by (path, size, modification time): a start's checks count each manifest once, not once per
# check (AudioSet-2M's holds 2 million lines, counted on every rank)
_COUNTED: dict[tuple[str, int, int], int] = {}


def count_lines(path: Path, limit: int | None = None) -> int:
    """The non-empty lines (clips) of a ``.jsonl(.gz)`` manifest or Shar cuts shard, none parsed; ``limit + 1`` as
    soon as the count exceeds ``limit``. A whole count is kept for the file as it is (its size and time).

    Raises:
        ValueError: a gzipped file cut short (:func:`truncated_manifest`).
    """
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    except OSError:  # open_lines says why
        key = None
    if key in _COUNTED:
        whole = _COUNTED[key]
        return whole if limit is None or whole <= limit else limit + 1
    count = 0
    try:
        with open_lines(path) as handle:
            for line in handle:
                count += bool(line.strip())
                if limit is not None and count > limit:
                    break
    except CUT_SHORT as err:
        raise ValueError(truncated_manifest(path, err)) from None
    if key is not None and (limit is None or count <= limit):  # counted to the end
        _COUNTED[key] = count
    return count
