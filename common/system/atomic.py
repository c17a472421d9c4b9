"""Atomic file writes: readers see the old file or the new one, never a mix, and a crash leaves no half file.

Every file this package writes that something later reads back (exports, checkpoint metadata, ledgers,
resolved recipes) goes through :func:`atomic_path`: the content is written to a temporary file in the
same folder (``.NAME.c2f-XXXXXXXX.tmp``: the ``c2f-`` marker tells this package's temporary files from another
program's, e.g. ``tempfile``'s ``.NAME.XXXXXXXX.tmp``), flushed, and renamed over the target. The file is created as
``open()`` creates one (mode ``0o666`` less the umask), so a colleague can read an export wherever the
umask lets them. A write that does not fit fails naming the file and the space it needed
(:class:`common.system.disk.NoSpace`); a process killed while writing leaves its temporary file, which the next
run in that folder removes (:func:`remove_orphans`: only names with the marker, only in the folders the package
writes into).
"""

from __future__ import annotations

import logging
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

# the temporary files atomic_path and the clip cache make: marked, so that the clean-up never takes another program's
# (tempfile's ``.NAME.XXXXXXXX.tmp``, which earlier versions of this package made too: those are said, left alone)
MARKER = "c2f-"
_OURS = rf"{MARKER}[0-9a-f]{{8}}\.tmp"  # what follows ".NAME."
ORPHAN = re.compile(rf"\..+\.{_OURS}")
# what earlier versions named them (tempfile's 8 characters; the clip cache's 16 hex digits): said, never removed
_EARLIER = r"(?:[a-z0-9_]{8}|[0-9a-f]{16})\.tmp"

log = logging.getLogger(__name__)


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
        tmp = path.parent / f".{path.name}.{MARKER}{secrets.token_hex(4)}.tmp"
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


def remove_orphans(folder: str | os.PathLike, within: tuple[str, ...] = (),
                   older_than: float | None = None, names: str | None = None) -> list[Path]:
    """Remove the temporary files (:data:`ORPHAN`: this package's marked names) that processes killed in
    :func:`atomic_path` left in ``folder``, and in its sub-folders that match a glob pattern of ``within``
    (relative to ``folder``, e.g. ``checkpoints/*``): the folders the package writes into, never a whole tree (a
    folder the user named may hold a corpus, a home, other programs' files). A sub-folder reached through a
    symbolic link is left alone, and so is a link with an orphan's name. ``older_than``: only files nothing has
    written for that many seconds, in a folder others may be writing into without a lock (a shared cache, several
    jobs): a file that goes meanwhile, or is not ours to remove, is left. ``names``: only the temporaries of the
    files whose names match this regular expression (a command's own files in a folder other commands write into
    too; ``re.escape(NAME)`` for one file, such as an ``--out`` file in a folder of the user's: a write of the same
    file meanwhile would race to replace it anyway), earlier versions' alike. Returns what was removed."""
    target = rf"\.(?:{names if names is not None else '.+'})\."
    ours, theirs = re.compile(target + _OURS), re.compile(target + _EARLIER)
    top = Path(folder)
    folders = [top] + sorted({sub for pattern in within for sub in top.glob(pattern)
                              if sub.is_dir() and not _through_link(top, sub)})
    removed, legacy, now = [], [], time.time()
    for root in folders:
        try:
            files = [e for e in os.scandir(root) if e.is_file(follow_symlinks=False)]
        except OSError:  # gone meanwhile, not readable
            continue
        entries = []
        for entry in files:  # ours, or named as earlier versions named theirs (said, not removed)
            if ours.fullmatch(entry.name):
                entries.append(entry)
            elif theirs.fullmatch(entry.name) and not ORPHAN.fullmatch(entry.name):
                legacy.append(entry)
        for entry in entries:
            path = root / entry.name
            try:
                if older_than is not None and now - entry.stat(follow_symlinks=False).st_mtime <= older_than:
                    continue
                path.unlink()
            except FileNotFoundError:
                if older_than is not None:
                    continue
            except OSError:
                continue
            removed.append(path)
    if legacy:
        _say_legacy(top, legacy)
    return sorted(removed)


def _say_legacy(top: Path, entries: list) -> None:
    """Say (once per clean-up) the files named as earlier versions named their temporaries (``_EARLIER``), which
    the clean-up leaves: another program's temporary files are named so too, and some of ours are large (a
    probe's features, a model's export)."""
    size = 0
    for entry in entries:
        try:
            size += entry.stat(follow_symlinks=False).st_size
        except OSError:
            pass
    log.info("%d file(s) under %s are named as this package's temporary files were before it marked them (%.1f MB "
             "in all, e.g. %s): left alone, as other programs name theirs so too; delete them if a killed run of an "
             "earlier version left them", len(entries), top, size / 1e6, entries[0].path)


def _through_link(top: Path, sub: Path) -> bool:
    """Whether ``sub`` (under ``top``) or a folder between them is a symbolic link."""
    path = top
    for part in sub.relative_to(top).parts:
        path = path / part
        if path.is_symlink():
            return True
    return False
