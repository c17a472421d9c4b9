"""Atomic file writes: readers see the old file or the new one, never a mix, and a crash leaves no half file.

Every file this package writes that something later reads back (exports, checkpoint metadata, ledgers,
resolved recipes) goes through :func:`atomic_path`: the content is written to a temporary file in the
same folder (``.NAME.XXXXXXXX.tmp``), flushed, and renamed over the target. The file is created as
``open()`` creates one (mode ``0o666`` less the umask), so a colleague can read an export wherever the
umask lets them. A write that does not fit fails naming the file and the space it needed
(:class:`common.system.disk.NoSpace`); a process killed while writing leaves its temporary file, which the next
run in that folder removes (:func:`remove_orphans`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.system.disk import NoSpace, ensure_space, free_bytes, out_of_space

__all__ = ["atomic_path", "atomic_write_text", "atomic_copy", "file_mode", "remove_orphans", "temporary_file",
           "ORPHAN"]

# the temporary files atomic_path and the clip cache make (mkstemp's 8 characters in earlier versions, 8 hex digits
# now; the clip cache's were 16 hex digits before)
ORPHAN = re.compile(r"\..+\.(?:[a-z0-9_]{8}|[0-9a-f]{16})\.tmp")


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process's umask."""
    try:  # Linux says it without changing it
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it (briefly)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_file(path: Path) -> Path:
    """A new empty file next to ``path`` under a name no other process or host shares (an :data:`ORPHAN` name),
    created with the umask's mode (mkstemp's would be 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


@contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` (flushed to disk first, then the
    rename), on failure it is removed.

    Args:
        path: the file to write.
        size: the bytes it will take, if known: a file system with less free space is refused before
            anything is written.

    Raises:
        NoSpace: the file does not fit (the target is untouched).

    Example::

        with atomic_path("model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if size is not None:
        ensure_space(path, size)
    tmp = temporary_file(path)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # writers that replace the file (safetensors) create it 0600
        _fsync(tmp)  # on disk before its name is: a crash leaves the old file or the whole new one
        os.replace(tmp, path)
        _fsync(path.parent)  # and the rename itself
    except BaseException as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, NoSpace) and out_of_space(err, path.parent):
            raise NoSpace(path, size if size is not None else written, free_bytes(path.parent),
                          at_least=size is None) from err
        raise


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to disk; a file system that cannot is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. a folder on a file system without directory fsync
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    data = text.encode()
    with atomic_path(path, size=len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    with atomic_path(dst, size=os.path.getsize(src)) as tmp:
        shutil.copyfile(src, tmp)


def remove_orphans(folder: str | os.PathLike, skip: tuple[str, ...] = ("discarded-",),
                   older_than: float | None = None, recursive: bool = True) -> list[Path]:
    """Remove the temporary files (:data:`ORPHAN`) that processes killed in :func:`atomic_path` left under
    ``folder``; sub-folders whose names start with ``skip`` are left alone (all of them unless ``recursive``: a
    folder the user named may hold a corpus). ``older_than``: only files nothing has written for that many seconds,
    in a folder others may be writing into without a lock (a shared cache): a file that goes meanwhile, or is not
    ours to remove, is left. Returns what was removed."""
    removed, now = [], time.time()
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if recursive and not d.startswith(skip)]
        for name in files:
            if ORPHAN.fullmatch(name):
                path = Path(root) / name
                if older_than is None:
                    path.unlink(missing_ok=True)
                else:
                    try:
                        if now - path.stat().st_mtime <= older_than:
                            continue
                        path.unlink()
                    except OSError:
                        continue
                removed.append(path)
    return sorted(removed)
