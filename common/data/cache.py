"""Decode once: a cache of clips decoded and resampled to the training rate (``data.cache``).

Decoding and resampling cost the same per clip whatever the phase, so they weigh more when the model
step is C times cheaper (the coarse phases). Every epoch decodes the same files again unless they are
kept; what is kept is the decoded waveform of the whole cut at the training rate (random crops are taken
from it afterwards, so they stay exactly those of an uncached run).

- ``none``: decode every time (AST's and SSAST's loaders).
- ``memory``: keep decoded clips in the training process, across epochs, phases and validation rounds.
  Needs ``data.num_workers: 0`` (worker processes would each fill a copy of their own and lose it when a
  phase ends). For sets that fit in RAM: float32 at 16 kHz is 230 MB per hour of audio (ESC-50: 2.8 h,
  640 MB; AudioSet-2M: 5,600 h, 1.3 TB). It stops growing at half of the memory that was available when
  it was made (its cgroup's limit counted: ``common.system.cpu.available_memory``) over the ranks on the node,
  each of which caches the clips it is dealt, in time every clip; and says so; clips beyond are decoded each
  time.
- ``disk``: write each decoded clip once as a ``.npy`` file under ``data.cache_dir`` (default
  ``~/.cache/coarse2fine/clips``) and read it from there afterwards. Works with any number of workers
  (the operating system's page cache keeps the hot files in memory, shared by all processes) and across
  runs; a file is named by a hash of the recording, its source file (path, size, modification time),
  the cut's offset and duration and the rate, so an edited source is decoded again. Files are written
  atomically under random temporary names, so concurrent workers, ranks and hosts may share the folder. A
  write that fails (a full disk, a quota) is said once and the run goes on decoding every clip; a folder this
  user cannot write (another user's cache, a read-only mount) is said once when the cache is made, its clips
  read and the others decoded. The cache stops growing while its file system has less than 10 % of its
  size (at most 50 GiB) free: the rest is kept for checkpoints, and for the others on the disk. Temporaries
  of writers killed part-way are removed when a process first writes next to them, once nothing has written
  them for an hour.

Clips that cannot be decoded are never cached (they fail again, with their reason, every time).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from common.data.integrity import sample_problem
from common.system.atomic import remove_orphans, temporary_file
from common.system.cpu import available_memory, local_ranks

__all__ = ["CacheMode", "ClipCache", "DEFAULT_CACHE_DIR", "make_cache"]

log = logging.getLogger(__name__)

CacheMode = Literal["none", "memory", "disk"]
DEFAULT_CACHE_DIR = "~/.cache/coarse2fine/clips"
RESERVE_FRACTION, RESERVE_MAX = 0.10, 50 * 2**30  # free space the cache leaves on its file system
STALE_SECONDS = 3600  # a temporary nothing has written for this long belongs to a writer that was killed


def _cut_key(cut, sample_rate: int, variant: str = "") -> str:
    """What identifies a cut's decoded samples: recording, source files (with size and mtime), span, rate."""
    recording = cut.recording
    sources = []
    for source in recording.sources:
        entry = [source.type, str(source.source) if source.type != "memory" else hashlib.sha1(
            source.source).hexdigest(), list(source.channels)]
        if source.type == "file":
            try:
                stat = os.stat(source.source)
                entry += [stat.st_size, stat.st_mtime_ns]
            except OSError:
                entry += [None, None]
        sources.append(entry)
    channel = getattr(cut, "channel", None)
    ident = [recording.id, sources, round(cut.start, 6), round(cut.duration, 6),
             channel if isinstance(channel, (int, type(None))) else list(channel), sample_rate] + \
        ([variant] if variant else [])  # the channels' mean of a multi-channel file, not its first
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


class ClipCache:
    """Decoded clips by cut (see the module docstring).

    Args:
        mode: ``memory`` or ``disk``.
        folder: the folder of a ``disk`` cache.
        max_bytes: the most a ``memory`` cache holds (default: half of the memory available now over the node's
            ranks).
    """

    def __init__(self, mode: CacheMode, folder: str | os.PathLike | None = None, max_bytes: int | None = None) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"data.cache: a ClipCache is 'memory' or 'disk', got {mode!r}")
        self.mode = mode
        self.folder = Path(os.path.expanduser(str(folder or DEFAULT_CACHE_DIR))) if mode == "disk" else None
        self.max_bytes = max_bytes if max_bytes is not None else available_memory() // (2 * local_ranks())
        self.clips: dict[str, np.ndarray] = {}
        self.bytes = 0
        self.hits = self.misses = 0
        self._full_warned = False
        self._write_failed = False
        self._swept: set[str] = set()  # sub-folders this process cleared of stale temporaries
        self._readable = True  # False: a disk cache whose folder could not be made, nothing to read
        self._closed: set[str] = set()  # sub-folders this user cannot write (another user's, without group write)
        self._hidden: set[str] = set()  # sub-folders this user cannot search (nothing in them can be read)
        self._closed_said = False  # a closed sub-folder met during the run was said
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:  # a read-only home, another user's folder: the cache only saves time
                self._write_failed, self._readable = True, os.path.isdir(self.folder)  # False where unsearchable
                log.warning("clip cache: cannot make %s (%s); clips are decoded every time (data.cache_dir names a "
                            "folder this user can write)", self.folder, _reason(err))
            else:
                self._check_access()

    def _check_access(self) -> None:
        """What of an existing folder this user can read and write (another user's cache, a read-only mount, a group
        folder whose sub-folders a user without ``umask 002`` made): said here, once, and not by each loader worker
        at its first write (or at each clip it reads)."""
        self._readable = os.access(self.folder, os.X_OK)  # search is enough to read a file by its name (0711)
        if not os.access(self.folder, os.W_OK | os.X_OK):
            self._write_failed = True
            log.warning("clip cache: cannot write to %s (%s); %s (data.cache_dir names a folder this user can write)",
                        self.folder, os.strerror(errno.EROFS if _read_only(self.folder) else errno.EACCES),
                        "the clips it holds are read, the others are decoded every time" if self._readable else
                        "nor read it: clips are decoded every time")
            return
        try:
            subs = [entry for entry in os.scandir(self.folder) if len(entry.name) == 2 and entry.is_dir()]
        except OSError:
            return
        self._hidden = {entry.name for entry in subs if not os.access(entry.path, os.X_OK)}
        self._closed = self._hidden | {entry.name for entry in subs if not os.access(entry.path, os.W_OK | os.X_OK)}
        if self._closed:
            log.warning("clip cache: %d of the %d sub-folders of %s cannot be written by this user%s (made by another "
                        "user without group write: docs/data.md says how a group shares the folder); the clips that "
                        "belong in them are decoded every time", len(self._closed), len(subs), self.folder,
                        f", {len(self._hidden)} not read either" if self._hidden else "")

    def __getstate__(self) -> dict:  # a worker process gets the settings, not the parent's clips
        state = dict(self.__dict__)
        state.update(clips={}, bytes=0, _swept=set())
        return state

    def load(self, cut, sample_rate: int, decode: Callable, variant: str = "") -> np.ndarray:
        """The cut's samples at ``sample_rate``: from the cache, or ``decode(cut, sample_rate)`` (then kept);
        ``variant`` names another decoding of the same samples (``mean``: the channels mixed down)."""
        key = _cut_key(cut, sample_rate, variant)
        path = self.folder / key[:2] / f"{key}.npy" if self.folder is not None else None
        if self.mode == "memory":
            wave = self.clips.get(key)
            if wave is not None:
                self.hits += 1
                return wave
        elif self._readable and key[:2] not in self._hidden:
            try:
                wave = np.load(path)
                if sample_problem(wave) is None:  # kept by an earlier version, before the check: decoded again
                    self.hits += 1
                    return wave
            except FileNotFoundError:
                pass
            except PermissionError:  # a sub-folder another user made during the run: said once, then skipped
                if not os.access(path.parent, os.X_OK):  # (a file of its own that this user cannot read: decoded)
                    self._hidden.add(key[:2])
                    self._closed.add(key[:2])
                self._say_closed()
            except (OSError, ValueError, EOFError) as err:  # damaged (a crash can leave it empty): decode, rewrite
                log.warning("clip cache: %s is unreadable (%s); decoding %s again", path, err, cut.id)
        self.misses += 1
        wave = decode(cut, sample_rate)
        if self.mode == "memory":
            if self.bytes + wave.nbytes <= self.max_bytes:
                self.clips[key] = wave
                self.bytes += wave.nbytes
            elif not self._full_warned:
                self._full_warned = True
                log.warning("clip cache: %.1f GB in memory, its limit; further clips are decoded every time "
                            "(data.cache: disk keeps them all)", self.bytes / 1e9)
        elif not self._write_failed and key[:2] not in self._closed:
            self._write(path, wave)
        return wave

    def _write(self, path: Path, wave: np.ndarray) -> None:
        """Keep a decoded clip on disk, atomically (a temporary name no other process or host can share). The cache
        only saves time: a write that fails (a full disk, a quota) leaves nothing behind, is said once, and the
        clips are decoded every time from then on; the run goes on."""
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not self._room(wave.nbytes):
                return
            if path.parent.name not in self._swept:
                self._swept.add(path.parent.name)
                remove_orphans(path.parent, older_than=STALE_SECONDS)
            tmp = temporary_file(path)
            with open(tmp, "wb") as handle:
                np.save(handle, wave)
            os.replace(tmp, path)
        except OSError as err:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if isinstance(err, PermissionError) and path.parent != self.folder:  # a sub-folder another user made
                self._closed.add(path.parent.name)  # during the run: that one is skipped, the others written
                self._say_closed()
                return
            self._write_failed = True
            log.warning("clip cache: cannot write to %s (%s); clips are decoded every time from now on",
                        self.folder, _reason(err))

    def _say_closed(self) -> None:
        """Once per process: a sub-folder found closed to this user while the run reads and writes."""
        if not self._closed_said:
            self._closed_said = True
            log.warning("clip cache: a sub-folder of %s (or a file in it) that another user made cannot be written "
                        "or read by this user (docs/data.md says how a group shares the folder); the clips that belong "
                        "there are decoded every time", self.folder)

    def _room(self, nbytes: int) -> bool:
        """Whether a clip of ``nbytes`` leaves the cache's file system its reserve free; once it does not, said once
        and no clip is written from then on."""
        usage = shutil.disk_usage(self.folder)
        reserve = min(RESERVE_FRACTION * usage.total, RESERVE_MAX)
        if usage.free - nbytes >= reserve:
            return True
        self._write_failed = True
        log.warning("clip cache: %.1f GiB free under %s, the reserve the cache leaves (10 %% of the disk, at most "
                    "50 GiB: checkpoints need room); clips not cached yet are decoded every time from now on",
                    usage.free / 2**30, self.folder)
        return False


def _read_only(folder: Path) -> bool:
    """Whether ``folder`` lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _reason(err: OSError) -> str:
    """An OS error's cause in words (``Permission denied``), as the cache's warnings give it beside its folder."""
    return os.strerror(err.errno) if err.errno else str(err)


def make_cache(mode: CacheMode, folder: str | None = None) -> ClipCache | None:
    """The cache for ``data.cache`` / ``data.cache_dir`` (None for ``none``)."""
    if mode == "none":
        return None
    return ClipCache(mode, folder)
