"""Export a manifest and its audio as Lhotse Shar shards (sequential reads for sets of millions of clips)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

import lhotse.cut.set

from common.data.integrity import decoder_reason
from common.data.lhotse_safety import EXTRA_INFO, no_shell, unsafe_source
from common.data.manifest_lines import count_lines, open_lines
from common.data.manifests import open_cuts
from common.system.disk import output_folder
from common.system.logger import join_logging, logging_for_workers

__all__ = ["export_shar"]

log = logging.getLogger(__name__)

PARTIAL = ".partial-"  # an export in progress, inside its --out
_SHARD = re.compile(r"[a-z_]+\.\d{6}\.[a-z.]+")  # cuts.000000.jsonl.gz, recording.000003.tar
STALE_SECONDS = 3600  # a partial export nothing wrote for this long was killed


def export_shar(manifest: str | Path, out_dir: str | Path, shard_size: int = 1000, num_jobs: int = 2) -> str:
    """Write ``cuts.NNNNNN.jsonl.gz`` + ``recording.NNNNNN.tar`` shards (FLAC audio) into ``out_dir``.

    Unreadable clips are left out (Lhotse's ``fault_tolerant``), each named in one line and counted in the summary;
    so is a clip with a ``command`` or ``url`` audio source anywhere in it (never run or fetched: it is dropped
    before Lhotse reads anything, whichever start method Lhotse's worker processes have). A recipe names ``out_dir``
    where it would
    name the manifest. A shard holds each cut's own channel (the first of a multi-channel file, as ``prepare``
    writes the cuts): ``data.channels: mean`` (HTS-AT's default) has nothing to mix down there, so mix a
    multi-channel corpus down before (``ffmpeg -ac 1``) where the mean matters.

    The shards are written into a hidden folder inside ``out_dir`` (``.partial-XXXXXXXX``: on the disk ``--out`` is
    on, a link's target or a mount), then moved up into ``out_dir`` when all are written, the cuts last: a reader
    never finds part of an export's cuts, and two exports never mix their shards. ``out_dir`` must not hold files
    (an earlier export's shards beyond this one's count would be read as part of it). The export holds a lock on
    ``out_dir`` itself (``flock`` of the folder), so a partial folder found there is a killed export's: it is
    removed at once, with the shards that export had already moved up (a kill during the moves left half an
    export); an empty one (killed after the last move) leaves a whole export. Where the file system cannot lock a
    folder (NFS), a partial folder is taken for a killed export's once nothing has written it for an hour. An
    export that completes removes every other partial folder (a concurrent export's, refused at its end anyway).
    A partial folder is no Shar shard (Lhotse's reader would take it for one). Run again over its own finished
    export (every clip of ``manifest``, in order, ``shard_size`` to a shard), the export says so and writes nothing.

    Raises:
        ValueError: ``out_dir`` holds files (an earlier export, whole: named as such), another export into it is
            running, or another export published its shards there meanwhile.
    """
    out_dir = output_folder(out_dir)
    with _folder_lock(out_dir) as locked:
        return _export(manifest, out_dir, shard_size, num_jobs, locked)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[bool]:
    """An exclusive ``flock`` of ``folder`` while the block runs: True, or False where its file system cannot lock
    a folder (NFS emulates flock with byte-range locks, which want a file open for writing).

    Raises:
        ValueError: another export holds it.
    """
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise ValueError(f"--out {folder}: another export into it is running; wait for it, or name another "
                             f"folder") from None
        except OSError:
            locked = False
        _HELD.add(fd)
        yield locked
    finally:
        _HELD.discard(fd)
        os.close(fd)  # releases the lock


# The folder locks this process holds: a process forked meanwhile (Lhotse's export workers) closes its copies, so
# that the lock goes with this process (workers a killed export leaves behind would hold it for ever, and every
# rerun be refused)
_HELD: set[int] = set()


def _close_held() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held)


def _killed_partials(out_dir: Path, locked: bool) -> None:
    """Remove the partial folders of killed exports in ``out_dir`` (all of them under the folder's lock, else those
    nothing wrote for an hour), and the shards such an export had moved up before it was killed."""
    killed = [p for p in out_dir.glob(f"{PARTIAL}*") if p.is_dir() and
              (locked or time.time() - p.stat().st_mtime > STALE_SECONDS)]
    half = [p for p in _shards(out_dir) if _SHARD.fullmatch(p.name) and p.is_file()] \
        if any(any(p.iterdir()) for p in killed) else []
    for path in half:  # an export starts in a folder without shards: these are the killed one's
        path.unlink()
    for path in killed:
        shutil.rmtree(path, ignore_errors=True)
    if half:
        log.warning("removed the %d shard file(s) an export killed while it moved its shards into %s had moved, and "
                    "its partial folder %s: the export is written again", len(half), out_dir,
                    ", ".join(p.name for p in killed))
    elif killed:
        log.warning("removed %s, left in %s by an export that did not finish", ", ".join(p.name for p in killed),
                    out_dir)


def _export(manifest: str | Path, out_dir: Path, shard_size: int, num_jobs: int, locked: bool) -> str:
    """:func:`export_shar` into ``out_dir`` (locked: whether the export holds the folder's lock)."""
    _killed_partials(out_dir, locked)
    held = _shards(out_dir)
    if held:
        cuts = [p for p in held if p.name.startswith("cuts.")]
        whole = bool(cuts) and any(p.name.startswith("recording.") for p in held)
        done = _same_export(out_dir, manifest, shard_size) if whole else None
        if done is not None:  # a requeued job's `shar && pretrain` goes on
            return (f"{out_dir} holds this export already ({done} clips of {manifest} in {len(cuts)} shard(s) of up "
                    f"to {shard_size}): nothing to write")
        raise ValueError(f"--out {out_dir} holds "
                         + (f"a Shar export already ({len(cuts)} cuts shard(s), an earlier run of this export?)"
                            if whole else "files already")
                         + "; a Shar folder holds one export's shards only: remove it to export again, or name a "
                           "new folder")
    tally = _LeftOut()
    cuts = open_cuts([manifest]).filter(tally.admit)
    tmp = out_dir / f"{PARTIAL}{secrets.token_hex(4)}"
    tmp.mkdir()
    root = logging.getLogger()
    root.addFilter(tally)  # Lhotse's warning for each clip it leaves out, said in one line (forked workers too)
    try:
        with _export_workers(num_jobs):
            shards = cuts.to_shar(tmp, fields={"recording": "flac"}, shard_size=shard_size, num_jobs=num_jobs,
                                  fault_tolerant=True)
        written = sum(count_lines(Path(path)) for path in shards.get("cuts", []))
        if _shards(out_dir):
            raise ValueError(f"--out {out_dir} was filled by another export while this one ran; its shards are "
                             f"kept, this export's are discarded")
        moved = []  # the cuts last: a reader that looks meanwhile finds no cuts yet
        try:
            for shard in sorted(tmp.iterdir(), key=lambda p: (p.name.startswith("cuts."), p.name)):
                os.rename(shard, out_dir / shard.name)
                moved.append(out_dir / shard.name)
        except BaseException:  # no half export left behind (a kill here: the next export removes it)
            for path in moved:
                path.unlink(missing_ok=True)
            raise
        tmp.rmdir()
        for other in out_dir.glob(f"{PARTIAL}*"):  # a Shar folder holds its shards only
            shutil.rmtree(other, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        root.removeFilter(tally)
    count = len(shards.get("cuts", []))
    done = f"wrote {count} shard(s) of up to {shard_size} clips to {out_dir}"
    left = tally.seen - written
    if left:
        counts = ((tally.refused, "refused"), (left - tally.refused, "unreadable"))
        kinds = ", ".join(f"{n} {kind}" for n, kind in counts if n)
        done += f"; {left} clip(s) left out ({kinds}: each named above)"
    return done


@contextmanager
def _export_workers(num_jobs: int) -> Iterator[None]:
    """Start the worker processes of Lhotse's export (``num_jobs`` > 1: its ``ProcessPoolExecutor``) with
    :func:`_export_worker`. Spawned (macOS's start method, Python 3.14's forkserver on Linux), they are fresh
    interpreters that never imported this package: Lhotse's shell backends were theirs, and a clip named
    ``x; cmd; .sph`` ran ``cmd`` through sph2pipe's command line."""
    pool = getattr(lhotse.cut.set, "ProcessPoolExecutor", None)
    if num_jobs <= 1:
        yield
        return
    if pool is None:
        raise RuntimeError("this Lhotse's Shar export makes its worker processes where they cannot be made to refuse "
                           "shell commands: export with --jobs 1")
    lhotse.cut.set.ProcessPoolExecutor = partial(pool, initializer=_export_worker, initargs=(logging_for_workers(),))
    try:
        yield
    finally:
        lhotse.cut.set.ProcessPoolExecutor = pool


def _export_worker(logs: dict) -> None:
    """An export worker's start: Lhotse without its shell backends (``no_shell``), the parent's logging, and each
    clip Lhotse leaves out said in one line (a forked worker inherited all three)."""
    no_shell()
    join_logging(logs)
    root = logging.getLogger()
    if not any(isinstance(f, _LeftOut) for f in root.filters):
        root.addFilter(_LeftOut())


# Lhotse's warning for a clip its fault-tolerant export leaves out: the reason runs over several lines
_SKIPPING = re.compile(r"^Skipping: failed to load cut '(.*?)'\. Error message: (.*?)\.?$", re.DOTALL)


class _LeftOut(logging.Filter):
    """Counts the clips an export is given and refuses those with a ``command`` or ``url`` source (:meth:`admit`);
    as a filter of the root logger, says Lhotse's warning for a clip it left out in one line, in this package's
    words (in a forked worker process too, which inherits it; the count of those is the clips given less those
    written)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = self.refused = 0

    def admit(self, cut) -> bool:
        self.seen += 1
        refused = unsafe_source(cut.to_dict())
        if refused:
            self.refused += 1
            log.warning("clip %s left out: %s", cut.id, refused)
        return not refused

    def filter(self, record: logging.LogRecord) -> bool:
        m = _SKIPPING.match(record.getMessage()) if record.name == "root" else None
        if m is None:
            return True
        reason = m.group(2).split(EXTRA_INFO, 1)[0].strip()
        if not reason.startswith("refused ("):
            reason = f"unreadable ({decoder_reason(RuntimeError(reason))[:200]})"
        log.warning("clip %s left out: %s", m.group(1), reason)
        return False


def _same_export(out_dir: Path, manifest: str | Path, shard_size: int) -> int | None:
    """The clips of ``manifest`` when ``out_dir``'s cuts shards hold exactly them, in its order, ``shard_size`` to a
    shard (what this export writes when no clip is left out), else None (another export, another shard size, clips
    left out: which, and why, is not known)."""
    def ids(path: Path) -> list[str]:
        with open_lines(path) as handle:
            return [json.loads(line)["id"] for line in handle if line.strip()]

    try:
        shards = [ids(p) for p in sorted(out_dir.glob("cuts.*.jsonl.gz"))]
        if not shards or any(len(s) != shard_size for s in shards[:-1]) or not 0 < len(shards[-1]) <= shard_size:
            return None
        exported = [i for s in shards for i in s]
        return len(exported) if exported == ids(Path(manifest)) else None
    except (OSError, EOFError, ValueError, KeyError, TypeError):  # unreadable, or lines of no clip: not this one
        return None


def _shards(folder: Path) -> list[Path]:
    """What ``folder`` holds besides hidden entries (partial exports)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]
