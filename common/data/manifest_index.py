"""A whole-set shuffle of manifests too large to hold in memory: their lines indexed on disk.

AST and SSAST shuffle their whole training set every epoch (a PyTorch ``DataLoader(shuffle=True)`` over the
concatenated json lists; SSAST's AudioSet-2M + LibriSpeech: 2.3 million clips). Held in memory as Lhotse
cuts that set takes about 1.2 KB a clip, 2.7 GB on every rank, before the loader's worker processes copy the
pages Python's garbage collector touches. A streaming shuffle buffer holds little but keeps the manifests'
order from epoch to epoch (a clip sits near the same place in every epoch). Here each manifest is written
once, uncompressed, into a cache folder (``data.index_dir``) with the byte offset of every line (8 bytes a
clip: 18 MB for SSAST's set); the copy is memory-mapped, so the operating system's page cache holds it once
for every rank and process of a machine, and any clip is read by its number. An epoch is then a permutation
of the numbers drawn from ``(seed, epoch)`` (:class:`IndexShuffleSampler`): the whole set shuffled, the same
on every rank and after a resume.

A cached copy is named by the manifest's absolute path, size and modification time (an edited manifest is
indexed again, and the copy of its earlier version removed once no run opened or read it for a week), built by one
process at a time (``<copy>.lock``: the first rank or run to come builds it and its labels cache, the others wait
and read them) and written atomically, so none reads a partial one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from lhotse.serialization import deserialize_item

from common.data.lhotse_safety import no_shell
from common.data.manifest_lines import open_lines
from common.system.atomic import atomic_path, remove_orphans

no_shell()  # Lhotse's audio backends and file opener without a shell (common.data.lhotse_safety)

__all__ = ["DEFAULT_INDEX_DIR", "ManifestIndex", "IndexShuffleSampler"]

log = logging.getLogger(__name__)

DEFAULT_INDEX_DIR = "~/.cache/coarse2fine/manifests"


def _key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:20]


def _build(path: Path, lines: Path, offsets: Path) -> None:
    """Write ``path``'s non-empty lines uncompressed to ``lines`` and their start offsets to ``offsets``, each
    atomically (a temporary name no other process or host shares, on disk before its rename); the offsets file,
    written last, marks a complete copy."""
    starts, position = [], 0
    with atomic_path(lines) as tmp_lines, open_lines(path) as src, tmp_lines.open("wb") as out:
        for line in src:
            if not line.strip():
                continue
            line = line if line.endswith(b"\n") else line + b"\n"
            starts.append(position)
            out.write(line)
            position += len(line)
    starts.append(position)  # the end of the last line
    with atomic_path(offsets) as tmp_offsets, tmp_offsets.open("wb") as out:
        np.save(out, np.asarray(starts, dtype=np.int64))


def _open(lines: Path, offsets: Path) -> tuple[np.ndarray, mmap.mmap | None]:
    """An index's offsets and its memory-mapped lines (None for an empty manifest; raises what a damaged pair
    raises)."""
    starts = np.load(offsets)
    if starts.ndim != 1 or len(starts) < 1 or int(starts[-1]) != lines.stat().st_size:
        raise ValueError(f"{offsets.name} does not describe {lines.name}")
    with lines.open("rb") as handle:
        return starts, (mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if starts[-1] else None)


def _read_labels(path: Path, clips: int) -> list[tuple[str, ...]] | None:
    """The per-clip labels cached in ``path`` (None when absent or not of ``clips`` clips: computed again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            names, flat, ends = json.loads(str(data["names"])), data["flat"].tolist(), data["ends"].tolist()
        if len(ends) != clips + 1 or ends[0] != 0 or ends[-1] != len(flat):
            raise ValueError(f"{len(ends) - 1} clips, the manifest {clips}")
        return [tuple(names[i] for i in flat[a:b]) for a, b in zip(ends[:-1], ends[1:])]
    except Exception as err:  # noqa: BLE001 - cut short, emptied, bit-flipped (zip, npy, JSON errors alike)
        log.warning("the cached labels %s are damaged (%s); reading them from the manifest again", path,
                    f"{type(err).__name__}: {err}")
        return None


def _write_labels(path: Path, rows: Sequence[tuple[str, ...]]) -> None:
    """Cache per-clip labels (a name table as JSON, each clip's name numbers, their ends), atomically."""
    numbers: dict[str, int] = {}
    flat = [numbers.setdefault(label, len(numbers)) for row in rows for label in row]
    ends = np.cumsum([0] + [len(row) for row in rows], dtype=np.int64)
    names = np.array(json.dumps(list(numbers)))  # JSON: every label as the manifest has it (numbers, NULs)
    with atomic_path(path) as tmp, tmp.open("wb") as out:
        np.savez(out, names=names, flat=np.asarray(flat, dtype=np.int32), ends=ends)


_INDEX_FILES = (".jsonl", ".offsets.npy", ".labels.npz", ".source", ".lock")


# how long a process waits for another that builds an index or labels cache before it builds its own copy (a
# holder whose host died keeps an NFS lock until its lease ends, or for good on NFSv3 until the host returns)
LOCK_WAIT_SECONDS = 1200.0


@contextmanager
def _one_at_a_time(lock: Path, what: str) -> Iterator[None]:
    """Hold ``lock`` (``flock``) while ``what`` (a cache file) is built: the ranks of a job, and other jobs sharing
    the folder, build an index or its labels once, the first to come, and the others wait (they are told so) and
    read what it wrote (not N temporary copies of a 1 GB index and N passes over 2 million records). The kernel
    drops the lock of a killed builder. Where no lock can be taken (a file system without locks, a lock file this
    process may not open) or after :data:`LOCK_WAIT_SECONDS`, this process builds its own copy (the copies are
    written atomically: the last one stays)."""
    fd = None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):  # another user's lock file in a shared folder: read-only
        try:
            fd = os.open(lock, flags, 0o666)
            break
        except OSError:
            continue
    try:
        if fd is not None:
            _lock(fd, lock, what)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock(fd: int, lock: Path, what: str) -> None:
    """Take ``fd``'s exclusive lock, waiting up to :data:`LOCK_WAIT_SECONDS` (saying so); give up without a word
    where the file system has no locks."""
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError:  # no locks here (or none on a read-only descriptor over NFS)
            return
        if deadline is None:
            deadline = time.monotonic() + LOCK_WAIT_SECONDS
            log.info("waiting for another process that builds %s (it holds %s)", what, lock)
        elif time.monotonic() > deadline:
            log.warning("waited %.0f minutes for the process that holds %s to build %s; building it here too (a "
                        "holder on a host that died keeps an NFS lock until its lease ends)", LOCK_WAIT_SECONDS / 60,
                        lock, what)
            return
        time.sleep(0.5)


UNUSED_SECONDS = 7 * 24 * 3600  # an earlier version's copy unopened this long is removed
TOUCH_SECONDS = 3600  # an open index marks itself in use this often while its clips are read


def _touch(mine: Path) -> None:
    """Mark index ``<key>.source`` as in use now (its modification time, which the eviction reads). Only
    bookkeeping, never a reason to stop a run: in a folder shared by several users, a ``.source`` another user
    made (mode 0644) cannot be touched, and is written again (ours then) where the folder lets us, else left."""
    try:
        os.utime(mine)
    except PermissionError:
        try:
            text = mine.read_text()
            with atomic_path(mine) as tmp:
                tmp.write_text(text)
        except OSError:
            pass
    except OSError:  # removed meanwhile (its run is gone and another evicted it), a read-only file system
        pass


def _forget_earlier_versions(folder: Path, path: Path, key: str) -> None:
    """Record that index ``key`` is manifest ``path``'s and when it was last opened (``<key>.source``, touched at
    every open, and every :data:`TOUCH_SECONDS` while an open index's clips are read), and remove the copies of
    its earlier versions (the same manifest edited or prepared again: each about the manifest's uncompressed size,
    never read again since its key names the size and time) that nothing opened or read for
    :data:`UNUSED_SECONDS`: a run still on an earlier version (started before the manifest changed, however long
    ago) keeps its copy, on a local disk or a host that maps it over NFS. A copy of another manifest of the same
    name elsewhere is another path's, kept; so is one this process may not remove (a shared folder)."""
    source = str(path.resolve())
    mine = folder / f"{key}.source"
    if not mine.is_file() or mine.read_text() != source:
        with atomic_path(mine) as tmp:
            tmp.write_text(source)
    else:
        _touch(mine)
    for other in folder.glob(f"{path.name.split('.')[0]}-*.source"):
        if other == mine:
            continue
        try:
            if other.read_text() != source or time.time() - other.stat().st_mtime < UNUSED_SECONDS:
                continue
        except OSError:  # removed meanwhile by another rank doing the same
            continue
        stem = other.name[: -len(".source")]
        try:
            for suffix in _INDEX_FILES:
                (folder / f"{stem}{suffix}").unlink(missing_ok=True)
        except OSError as err:  # a folder shared with users who may read it but not remove from it
            log.info("cannot remove %s's unused index %s in %s (%s); a run that may leaves it to its owner", path,
                     stem, folder, err)
            continue
        log.info("removed %s's index %s in %s: the manifest has changed since, and no run opened it for %d days",
                 path, stem, folder, UNUSED_SECONDS // 86400)


STALE_SECONDS = 6 * 3600  # a build writes its temporary files from start to end in minutes


class ManifestIndex:
    """The clips of ``.jsonl(.gz)`` manifests, concatenated in order, each read by its number.

    Args:
        paths: the manifests.
        index_dir: the cache folder of their uncompressed copies and offsets (created).

    Raises:
        ValueError: a manifest that is not a ``.jsonl(.gz)`` file (a Shar folder cannot be indexed), or one
            without a clip.
    """

    is_lazy = False  # len() and any clip at once, as an eager CutSet

    def __init__(self, paths: Sequence[str | os.PathLike], index_dir: str | os.PathLike = DEFAULT_INDEX_DIR) -> None:
        folder = Path(os.path.expanduser(str(index_dir)))
        folder.mkdir(parents=True, exist_ok=True)
        # builds killed part-way (a manifest's size): the folder's own files only, where several jobs may be building
        for tmp in remove_orphans(folder, older_than=STALE_SECONDS):
            log.info("removed %s, left by an index build that did not finish", tmp)
        self.paths = [Path(p) for p in paths]
        self._maps: list[mmap.mmap] = []
        self._offsets: list[np.ndarray] = []
        self._labels_files: list[Path] = []
        self._sources: list[Path] = []  # touched while clips are read: a run of weeks keeps its index
        for path in self.paths:
            if not path.is_file() or not path.name.endswith((".jsonl", ".jsonl.gz")):
                raise ValueError(f"{path}: only a .jsonl(.gz) manifest can be indexed for a whole-set shuffle")
            key = f"{path.name.split('.')[0]}-{_key(path)}"
            lines, offsets = folder / f"{key}.jsonl", folder / f"{key}.offsets.npy"
            lock = folder / f"{key}.lock"
            if not offsets.is_file():
                with _one_at_a_time(lock, f"the index of {path}"):
                    if not offsets.is_file():  # not built by another rank or job meanwhile
                        log.info("indexing %s for a whole-set shuffle into %s (once per manifest)", path, folder)
                        _build(path, lines, offsets)
            _forget_earlier_versions(folder, path, key)
            self._sources.append(folder / f"{key}.source")
            try:
                starts, lines_map = _open(lines, offsets)
            except (OSError, ValueError, EOFError) as err:  # e.g. emptied by a crash: index the manifest again
                with _one_at_a_time(lock, f"the index of {path}"):
                    try:
                        starts, lines_map = _open(lines, offsets)  # indexed again by another rank meanwhile
                    except (OSError, ValueError, EOFError):
                        log.warning("the index of %s in %s is damaged (%s); indexing it again", path, folder, err)
                        _build(path, lines, offsets)
                        starts, lines_map = _open(lines, offsets)
            if len(starts) < 2:
                raise ValueError(f"manifest {path} holds no clips")
            self._offsets.append(starts)
            self._maps.append(lines_map)
            self._labels_files.append(folder / f"{key}.labels.npz")
        self._ends = np.cumsum([len(o) - 1 for o in self._offsets])
        self._touched = time.monotonic()

    def keep(self) -> None:
        """Mark the index in use now (see :func:`_forget_earlier_versions`), as reading its clips does every
        :data:`TOUCH_SECONDS`, in whatever process reads them (the loader's workers)."""
        self._touched = time.monotonic()
        for source in self._sources:
            _touch(source)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, number: int):
        """Clip ``number`` of the concatenation, as a Lhotse cut."""
        if not 0 <= number < len(self):
            raise IndexError(f"clip {number} of {len(self)}")
        if time.monotonic() - self._touched > TOUCH_SECONDS:  # a run reading it for over a week keeps it
            self.keep()
        which = int(np.searchsorted(self._ends, number, side="right"))
        local = number - (int(self._ends[which - 1]) if which else 0)
        starts = self._offsets[which]
        return deserialize_item(json.loads(self._maps[which][int(starts[local]):int(starts[local + 1])]))

    def __iter__(self) -> Iterator:
        return (self[i] for i in range(len(self)))

    def labels(self) -> list[tuple[str, ...]]:
        """Every clip's labels (its ``custom["labels"]``), in order, equal labels one string: read from the index
        folder's ``<manifest>.labels.npz``, written beside the manifest's copy by the first call (a pass over every
        record: about a minute for AudioSet-2M, once per manifest instead of on every rank at every start)."""
        shared: dict[str, str] = {}
        rows: list[tuple[str, ...]] = []
        for lines, starts, cache in zip(self._maps, self._offsets, self._labels_files):
            part = _read_labels(cache, len(starts) - 1)
            if part is None:
                with _one_at_a_time(cache.with_name(cache.name.replace(".labels.npz", ".lock")), f"the labels {cache}"):
                    part = _read_labels(cache, len(starts) - 1)  # written by another rank or job meanwhile?
                    if part is None:
                        part = self._read_labels_of(lines, starts, cache)
            rows += [tuple(shared.setdefault(label, label) for label in row) for row in part]
        return rows

    @staticmethod
    def _read_labels_of(lines, starts: np.ndarray, cache: Path) -> list[tuple[str, ...]]:
        """Every clip's labels from the index's records (a pass over all of them), cached in ``cache``."""
        records = (json.loads(lines[a:b]) for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()))
        part = [tuple((r.get("custom") or {}).get("labels", [])) for r in records]
        try:
            _write_labels(cache, part)
        except OSError as err:  # only a cache: another user's folder, a full disk; read again next time
            log.warning("could not cache the labels in %s (%s); they are read from the manifest again at "
                        "each start", cache, err.strerror or err)
        return part

    def close(self) -> None:
        for handle in self._maps:
            handle.close()
        self._maps = []


class IndexShuffleSampler:
    """Every clip of a :class:`ManifestIndex` once per epoch, in a permutation drawn from ``(seed, epoch)``, in
    batches of clip numbers (the global stream: ``equal_shards`` deals it to the ranks; the loader reads the
    cuts of the batches it keeps, so a resume skips batches without reading them)."""

    yields_numbers = True  # batches of clip numbers (ClipLoader reads the cuts of the batches a rank keeps)

    def __init__(self, size: int, batch_size: int, *, drop_last: bool, seed: int, shuffle: bool = True) -> None:
        self.size, self.batch_size, self.drop_last, self.seed = size, batch_size, drop_last, seed
        self.shuffle = shuffle  # False: the clips in their order (an evaluation pass)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(self.size) if self.shuffle \
            else np.arange(self.size)
        for start in range(0, self.size, self.batch_size):
            chunk = order[start:start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield chunk.tolist()
