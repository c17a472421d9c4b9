"""Opening a split's manifests: Lhotse cut manifests (``.jsonl.gz``) and Shar folders, checked before anything is
read, counted from their lines without parsing them, and mixed by weight into one CutSet (:func:`open_cuts`).

A set of at most ``data.full_shuffle_max`` clips that is one manifest or an equal-weight mix is read into memory
(an eager CutSet, shuffled as a whole by the loader); a larger one is indexed on disk
(``common.data.manifest_index``); Shar folders alone are read in one part per rank
(``common.data.shar_stream``); the rest is streamed.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

from lhotse import CutSet

from common.data.audio_file import AUDIO_SUFFIXES
from common.data.config import ManifestSpec
from common.data.decode import narrow_length_tolerance
from common.data.manifest_index import ManifestIndex
from common.data.manifest_lines import count_lines, manifest_path, open_lines
from common.data.shar_stream import folder_shards
from common.system.disk import NoSpace, describe_os_error

__all__ = ["manifest_problem", "count_clips", "epoch_clips", "open_cuts"]

log = logging.getLogger(__name__)


def _read_whole(path: str | os.PathLike, cuts) -> list:
    """The clips of one opened manifest, read into memory (its lines were counted first, which says a file cut short:
    ``count_lines``); a line that is not a clip's entry is a ValueError naming the manifest and where (one clip per
    non-empty line)."""
    read: list = []
    try:
        for cut in cuts:
            read.append(cut)
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # json's errors are ValueErrors; no clip's
        raise ValueError(f"manifest {manifest_path(path)}: the entry after clip {len(read)} is not a clip "
                         f"({type(err).__name__}: {err}); prepare the manifest again") from None
    wrong = next((cut for cut in read if not isinstance(cut.duration, (int, float))), None)
    if wrong is not None:  # Lhotse keeps a string as it is: its sampler's sum of durations failed with a traceback
        raise ValueError(f"manifest {manifest_path(path)}: clip {wrong.id}'s duration is "
                         f"{type(wrong.duration).__name__} {wrong.duration!r}, not a number of seconds; prepare the "
                         f"manifest again")
    return read


def _under(filename, folder) -> bool:
    """Whether an OS error's ``filename`` is ``folder``, inside it or on its way (where an index was written, or its
    folder made: ``~/.cache`` of a read-only home; not a manifest read)."""
    if filename is None:
        return False
    where = Path(os.path.abspath(os.path.expanduser(str(filename))))
    folder = Path(os.path.abspath(os.path.expanduser(str(folder))))
    return where.is_relative_to(folder) or folder.is_relative_to(where)


def _say_repeated_ids(cuts: list, paths: list) -> None:
    """Warn where clip ids repeat in a set read into memory (a manifest listed twice, two manifests holding the same
    clips, a hand-merged file): each copy trains as a clip of its own, while what is kept by id (the bad-audio
    counts, SSAST's validation masks) sees one."""
    counts = Counter(cut.id for cut in cuts)
    repeated = [(cut_id, n) for cut_id, n in counts.items() if n > 1]
    if repeated:
        cut_id, n = repeated[0]
        log.warning("%s: %d clip id(s) appear more than once (%s %d times%s): each copy trains as a clip of its own; "
                    "give each clip one id (a manifest's weight in data.train draws its clips more often)",
                    ", ".join(str(p) for p in paths), len(repeated), cut_id, n, ", ..." if len(repeated) > 1 else "")


def _open_one(path: str | os.PathLike):
    path = manifest_path(path)
    if path.is_dir():
        folder_shards(path)  # its shards pair up, or an error that names the folder
        return CutSet.from_shar(in_dir=path)
    if not path.is_file():
        raise FileNotFoundError(
            f"manifest {path} does not exist; write it with `python -m common.data.corpora prepare NAME --src DIR "
            f"--out {path.parent}` (see `python -m common.data.corpora list`)"
        )
    problem = manifest_problem(path)
    if problem:
        raise ValueError(f"manifest {path}: {problem}")
    try:
        cuts = CutSet.from_file(path)  # lazy for .jsonl.gz; Lhotse reads the first entry to know its kind
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # a JSON line of no clip
        raise ValueError(f"manifest {path} is not a readable Lhotse manifest ({type(err).__name__}: "
                         f"{str(err)[:200]}); prepare it again") from None
    if cuts is None:  # what Lhotse returns for an empty file
        raise ValueError(f"manifest {path} holds no clips (an empty file); prepare it again")
    return cuts


def manifest_problem(path: str | os.PathLike) -> str | None:
    """Why a file is not a Lhotse manifest: a name no Lhotse manifest has, or for a ``.jsonl(.gz)`` its first line
    (None: it may be one; an empty file is left to the callers, which say that it holds no clips)."""
    path = manifest_path(path)
    if not any(ext in path.name for ext in (".jsonl", ".json", ".yaml", ".yml")):  # what Lhotse reads
        audio = path.suffix.lower() in AUDIO_SUFFIXES
        return ("is not a Lhotse manifest (a .jsonl.gz of cuts, as `python -m common.data.corpora prepare` writes "
                "it)" + ("; to score audio files use predict.py" if audio else ""))
    if not path.name.endswith((".jsonl", ".gz")):
        return None
    number, line = 0, b""
    try:
        with open_lines(path) as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    break
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        return f"cannot be read as {'gzip' if path.name.endswith('.gz') else 'text'} ({err})"
    if not line.strip():
        return None
    try:
        cut = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return (f"line {number} is not JSON ({line.strip()[:40]!r}); a Lhotse manifest holds one JSON cut per line, "
                f"as `python -m common.data.corpora prepare` writes it")
    if not isinstance(cut, dict) or "id" not in cut:
        return f"line {number} is JSON but not a Lhotse cut (no 'id' field)"
    return None


def count_clips(path: str | os.PathLike, limit: int | None = None) -> int | None:
    """Clips in a ``.jsonl(.gz)`` manifest, counted from its lines without parsing them.

    Returns None for what cannot be counted this way (a Shar folder, another format), and ``limit + 1``
    as soon as the count exceeds ``limit``.
    """
    path = manifest_path(path)
    if not path.is_file() or not path.name.endswith((".jsonl", ".jsonl.gz")):
        return None
    return count_lines(path, limit)


def epoch_clips(path: str | os.PathLike) -> int | None:
    """Clips in a ``.jsonl(.gz)`` manifest or a Lhotse Shar folder (its ``cuts.*`` shards' lines), counted without
    parsing them; None for what cannot be counted so."""
    path = manifest_path(path)
    if path.is_dir():
        counts = [count_clips(shard) for shard in sorted(path.glob("cuts.*.jsonl*"))]
        return None if not counts or None in counts else sum(counts)
    return count_clips(path)


def open_cuts(specs: Sequence[ManifestSpec | str], seed: int = 0, in_memory_max: int | None = None,
              index_dir: str | None = None):
    """A CutSet over one manifest, or a weighted mix of several (``CutSet.mux``); or the manifests indexed on
    disk for a whole-set shuffle (:class:`~common.data.manifest_index.ManifestIndex`, ``index_dir`` given).

    Args:
        specs: manifests (paths or :class:`ManifestSpec`).
        seed: seed of the mix.
        in_memory_max: read the clips into memory (an eager CutSet, which :class:`~common.data.loader.ClipLoader`
            shuffles as a whole every epoch) when there are at most this many, the manifests are ``.jsonl(.gz)``
            files and their weights are equal (a mix with unequal weights stays a weighted stream).
            None: always lazy.
    """
    specs = [s if isinstance(s, ManifestSpec) else ManifestSpec(str(s)) for s in specs]
    if not specs:
        raise ValueError("no manifests given")
    narrow_length_tolerance()  # a clip shorter than its manifest says is bad audio, also where Lhotse reads it
    sets = [_open_one(s.path) for s in specs]
    if in_memory_max and len({s.weight for s in specs}) == 1:
        total = 0
        for spec in specs:
            count = count_clips(spec.path, in_memory_max - total)
            total = in_memory_max + 1 if count is None else total + count
            if total > in_memory_max:
                break
        if total <= in_memory_max:
            cuts = [cut for spec, one in zip(specs, sets) for cut in _read_whole(spec.path, one)]
            log.info("read %d clips into memory: every epoch is a shuffle of the whole set", len(cuts))
            _say_repeated_ids(cuts, [s.path for s in specs])
            return CutSet.from_cuts(cuts)
    if index_dir is not None and len({s.weight for s in specs}) == 1 and \
            all(count_clips(s.path, 0) is not None for s in specs):  # .jsonl(.gz) files of equal weights
        try:
            index = ManifestIndex([manifest_path(s.path) for s in specs], index_dir)
        except OSError as err:  # another user's folder, a read-only home: the key that moves it, named
            if isinstance(err, NoSpace) or not _under(err.filename, index_dir):  # a damaged manifest, a full disk
                raise
            raise ValueError(f"data.index_dir: the training set's index cannot be written under {index_dir} "
                             f"({describe_os_error(err) or err}); set data.index_dir to a folder this user can "
                             f"write (or data.shuffle: buffer, no index)") from err
        log.info("%d clips indexed on disk (%s): every epoch is a shuffle of the whole set", len(index), index_dir)
        return index
    if in_memory_max is not None:
        shar = [s.path for s in specs if count_clips(s.path, 0) is None]
        log.info("training set %s: streamed through Lhotse's shuffle buffer",
                 "a mix of manifests with unequal weights" if len({s.weight for s in specs}) > 1 else
                 f"{shar[0]}, a Lhotse Shar folder (neither counted nor indexed)" if shar else
                 f"larger than data.full_shuffle_max={in_memory_max} clips (data.shuffle: buffer)")
    if len(sets) == 1:
        return sets[0]
    return CutSet.mux(*sets, weights=[s.weight for s in specs], seed=seed)
