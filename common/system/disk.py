"""Running out of disk space, said as such: which file, how much it needed, how much was free.

A write that fills the disk fails in many voices: ``OSError: [Errno 28]`` from Python, ``SafetensorError``
wrapping ``os error 28``, and from torch's zip writer (``torch.save``, DeepSpeed's checkpoints) only
``unexpected pos 128 vs 0`` or ``iostream error``, with no errno at all. :func:`out_of_space` recognises
them (the last by the free space left on the file system after the failure), and :class:`NoSpace` is the
one-line error the entry points print (``common.cli.run_main``). :func:`ensure_space` refuses a write
whose size is known before it starts, so that nothing is half written. :func:`output_folder` makes a command's
output folder, refusing a file in its place by name (``mkdir`` would say only "File exists").
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["NoSpace", "error_chain", "out_of_space", "ensure_space", "free_bytes", "tree_size", "human_size",
           "describe_os_error", "output_folder"]

# below this many free bytes after a failed write, a write error without an errno is taken for a full disk
NEARLY_FULL = 1 << 20
_CODES = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122", "StorageFull")


class NoSpace(OSError):
    """A write did not fit: ``path`` (the file or folder written), ``needed`` and ``free`` bytes (None: unknown;
    ``at_least``: ``needed`` is what had been written when the disk filled, so more was needed)."""

    def __init__(self, path: str | os.PathLike, needed: int | None, free: int | None, detail: str = "",
                 at_least: bool = False) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.needed, self.free, self.detail, self.at_least = needed, free, detail, at_least

    def __str__(self) -> str:
        sizes = []
        if self.needed is not None:
            sizes.append(f"{'more than ' if self.at_least else ''}{human_size(self.needed)} needed")
        if self.free is not None:
            sizes.append(f"{human_size(self.free)} free")
        return (f"{self.filename}: no space left on device" + (f" ({', '.join(sizes)})" if sizes else "")
                + (f"; {self.detail}" if self.detail else ""))


def human_size(n: int) -> str:
    """``n`` bytes, readable: ``512 bytes``, ``1.4 MiB``, ``3.2 GiB``."""
    if n < 10 * 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes this user may still write on the file system of ``path`` (its nearest existing folder)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def tree_size(path: str | os.PathLike) -> int:
    """Bytes in the files under ``path`` (a file: its size; missing: 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def error_chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors behind it (its cause, else its context, and theirs), each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def out_of_space(err: BaseException, folder: str | os.PathLike) -> bool:
    """Whether ``err``, raised by a write into ``folder``, means that the disk (or the quota) is full."""
    for link in error_chain(err):
        if isinstance(link, NoSpace) or (isinstance(link, OSError) and link.errno in _CODES):
            return True
        if any(word in str(link) for word in _WORDS):
            return True
    if isinstance(err, (OSError, RuntimeError)):  # torch's zip writer: "unexpected pos", no errno
        free = free_bytes(folder)
        return free is not None and free < NEARLY_FULL
    return False


def ensure_space(path: str | os.PathLike, needed: int, detail: str = "") -> None:
    """Refuse to start writing ``needed`` bytes at ``path`` when its file system has less free.

    Raises:
        NoSpace: naming ``path``, the bytes needed and the bytes free.
    """
    free = free_bytes(Path(path).parent)
    if free is not None and free < needed:
        raise NoSpace(path, needed, free, detail)


def describe_os_error(err: OSError) -> str | None:
    """One line for a file-system failure that names its file (a full disk, a read-only or unwritable
    folder, a file where a folder belongs); None for other OS errors."""
    if isinstance(err, NoSpace):
        return str(err)
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"{err.filename or 'a write'}: no space left on device"
    if err.errno is None:  # raised with a message of ours (FileNotFoundError("checkpoint ... does not exist"))
        return str(err)
    if err.filename is None:
        return None
    where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
    return f"{where}: {(err.strerror or type(err).__name__).lower()}"


def output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder to write into, made if missing (with the folders on its way); returns it.

    Raises:
        ValueError: ``path`` is empty (``Path("")`` is the working folder: an ``--out ""`` would write there), or
            it, or a folder on its way, is a file: named, with the option ``flag`` that gave it.
    """
    if not str(path).strip():
        raise ValueError(f"{flag} is empty; name the folder to write into (. for this one)")
    path = Path(path)
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = f"a link to {os.readlink(existing)}, which does not exist" if existing.is_symlink() and \
            not existing.exists() else "a file"
        where = f"is {what}, not a folder" if existing == path else f"is not a folder ({existing} on its way is {what})"
        raise ValueError(f"{flag} {path} {where}; name a new folder or an existing one")
    path.mkdir(parents=True, exist_ok=True)
    return path

