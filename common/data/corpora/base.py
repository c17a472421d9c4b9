"""What every corpus preparer shares: file scanning, manifest writing, class lists and the report.

A prepared corpus ``NAME`` in ``OUT`` is:

- ``OUT/NAME_SPLIT.jsonl.gz``: one Lhotse ``CutSet`` per split, one ``MonoCut`` per clip (channel 0 of
  the file, whole duration; a clip listed as a segment of a video whose file is the whole video, its segment:
  :func:`segment_span`). ``cut.custom`` holds ``labels`` (list of class ids, empty for unlabeled
  audio), ``split``, ``dataset`` and corpus-specific fields (``fold`` for ESC-50, ...).
- ``OUT/NAME_classes.json``: ``{"classes": [id, ...], "names": {id: display name}}``; a class's index in
  the target vector is its position in ``classes``.
- ``OUT/NAME_prepare.json``: what was written, and every missing or unreadable file with the reason.

Every file is written under a temporary name of its own and renamed into place when complete
(``common.system.atomic``), so a reader sees an earlier file or the new one, and a prepare killed part-way leaves
its temporaries (removed by a later prepare into ``OUT`` once nothing has written them for an hour). The command
(``c2f-corpora prepare``) holds ``OUT/prepare.lock`` while it runs (:func:`prepare_lock`): a second prepare into
the same ``OUT`` stops at once naming the first, rather than wait and write the same files again.

A clip listed twice is written once, its first listing kept (:func:`unique_entries`; one listed again with another
split, labels or file is named in the report's ``conflicts``).

Files that are missing, unreadable or truncated (the header claims more audio than the file holds,
``common.data.integrity``) are counted and reported, never fatal: real corpora downloaded from YouTube always
miss some clips.

Order. Source order is usually sorted by class (VoxCeleb's ``iden_split.txt`` by speaker, SpeechCommands
by word folder, LibriSpeech by speaker, Kinetics-Sounds by label, a custom folder per class), and a
training set too large to be shuffled in memory is only shuffled through a streaming buffer
(``common.data.loader``). Every manifest is therefore written in a seeded shuffled order: clips sorted by a hash
of ``(seed, clip id)``, the same on every run and whatever order the preparer listed them in.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator

from lhotse import MonoCut, Recording

from common.data.audio_file import AUDIO_SUFFIXES
from common.data.integrity import decoder_reason, truncation
from common.data.lhotse_safety import no_shell
from common.system.atomic import atomic_path, atomic_write_text, remove_orphans
from common.system.disk import output_folder
from common.system.lock import run_dir_lock
from common.system.logger import progress

no_shell()  # Lhotse's audio backends and file opener without a shell (common.data.lhotse_safety)

log = logging.getLogger(__name__)

__all__ = [
    "ClipEntry",
    "PrepareReport",
    "write_corpus",
    "manifest_writer",
    "prepare_lock",
    "split_manifest",
    "classes_path",
    "read_classes",
    "require_file",
    "require_dir",
    "scan_audio",
    "shuffled_order",
    "unique_entries",
    "segment_span",
]


# what video corpora come as (VGGSound's and Kinetics' own copies): found, and named as needing their audio extracted
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4a")


@dataclass(frozen=True)
class ClipEntry:
    """One clip of a corpus before its header is read.

    Args:
        cut_id: unique id of the clip within the corpus.
        path: the audio file.
        split: the manifest it goes to (``train``, ``eval``, ``fold1`` ...).
        labels: class ids (empty for unlabeled audio).
        custom: extra fields stored in ``cut.custom``.
        segment: ``(start, end)`` seconds of the video the clip was cut from (YouTube corpora): where the file is
            the whole video, the clip is that span of it (:func:`segment_span`).
        named: the file's name gives the segment's start (``YTID_30.000``, ``YTID_000030``): it is the segment,
            whole, unless it reaches the segment's end and runs :data:`NAMED_SLACK` past its length (a whole
            video saved under the segment's name).
    """

    cut_id: str
    path: Path
    split: str
    labels: tuple[str, ...] = ()
    custom: dict = field(default_factory=dict)
    segment: tuple[float, float] | None = None  # the clip's span of its video (YouTube corpora)
    named: bool = False  # the file's name gives the segment (YTID_START): that segment, unless clearly the whole video


@dataclass
class PrepareReport:
    """Outcome of preparing a corpus."""

    corpus: str
    out_dir: Path
    manifests: dict[str, Path] = field(default_factory=dict)
    clips: Counter = field(default_factory=Counter)
    missing: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    classes: int = 0
    notes: list[str] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)  # a clip listed again otherwise: the first listing kept

    def summary(self) -> str:
        """One line: the clips written per split, the classes, and the files left out (missing, unreadable) and
        clips listed twice, each with one example; where an example stands for several, the file that lists them
        all (``OUT/NAME_prepare.json``) is named."""
        parts = [f"{split}: {n}" for split, n in sorted(self.clips.items())]
        text = f"{self.corpus}: {sum(self.clips.values())} clips ({', '.join(parts) or 'none'})"
        if self.classes:
            text += f", {self.classes} classes"
        if self.missing:
            text += f"; {len(self.missing)} missing on disk (e.g. {self.missing[0]})"
        if self.unreadable:
            text += f"; {len(self.unreadable)} unreadable (e.g. {self.unreadable[0][0]}: {self.unreadable[0][1]})"
        if self.conflicts:
            first = self.conflicts[0]
            text += (f"; {len(self.conflicts)} listed twice with another split, labels or file, the first listing "
                     f"kept (e.g. {first['id']}: {_listing(first['kept'])}, not {_listing(first['dropped'])})")
        if max(len(self.missing), len(self.unreadable), len(self.conflicts)) > 1:
            text += f"; all of them in {self.out_dir / f'{self.corpus}_prepare.json'}"
        return text

    def to_dict(self) -> dict:
        return {
            "corpus": self.corpus,
            "manifests": {k: str(v) for k, v in self.manifests.items()},
            "clips": dict(self.clips),
            "classes": self.classes,
            "missing": self.missing,
            "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
            "notes": self.notes,
            "conflicts": self.conflicts,
        }


def _listing(entry: dict) -> str:
    return f"{entry['split']} {'/'.join(entry['labels']) or 'unlabeled'}"


def _listed(entry: ClipEntry) -> dict:
    return {"split": entry.split, "labels": list(entry.labels), "path": str(entry.path)}


def unique_entries(entries: Iterable[ClipEntry]) -> tuple[list[ClipEntry], int, list[dict]]:
    """The entries with each clip id once, in order: a clip listed again alike (split, labels and file) is
    dropped and counted; one listed again otherwise keeps its first listing, and the other is recorded
    (``{"id", "kept", "dropped"}``): a manifest's cut ids are unique, and a clip in two splits or with two
    labelings is the metadata's to settle."""
    kept: dict[str, ClipEntry] = {}
    repeated, conflicts = 0, []
    for entry in entries:
        first = kept.setdefault(entry.cut_id, entry)
        if first is entry:
            continue
        if (first.split, first.labels, Path(first.path)) == (entry.split, entry.labels, Path(entry.path)):
            repeated += 1
        else:
            conflicts.append({"id": entry.cut_id, "kept": _listed(first), "dropped": _listed(entry)})
    return list(kept.values()), repeated, conflicts


def split_manifest(out_dir: str | os.PathLike, corpus: str, split: str) -> Path:
    return Path(out_dir) / f"{corpus}_{split}.jsonl.gz"


def classes_path(out_dir: str | os.PathLike, corpus: str) -> Path:
    return Path(out_dir) / f"{corpus}_classes.json"


_CLASSES_FORMAT = ('a class list is an object {"classes": [class ids in target order], "names": {id: display name}}, '
                   'as `python -m common.data.corpora prepare` writes it')


def read_classes(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """``(class ids in target order, {id: display name})`` from a ``*_classes.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"class list {path} does not exist; it is written by `python -m common.data.corpora prepare`"
        )
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON class list ({err}); {_CLASSES_FORMAT}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a class list; {_CLASSES_FORMAT}")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"{path}: 'classes' must be a non-empty list of unique class ids")
    names = data.get("names", {})
    if not isinstance(names, dict):
        raise ValueError(f"{path}: 'names' must map class ids to display names; {_CLASSES_FORMAT}")
    return [str(c) for c in classes], {str(k): str(v) for k, v in names.items()}


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def scan_audio(folder: Path) -> dict[str, str]:
    """``{stem: path}`` of every audio file under ``folder``, recursively; the first in sorted order wins, an audio
    file over a video file of the same stem (video files are listed so that a clip only there is reported as
    needing its audio extracted, not as missing).

    One walk of the tree, paths kept as strings: AudioSet's unbalanced set has ~2M files.
    """
    found: dict[str, str] = {}
    videos: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in AUDIO_SUFFIXES:
                found.setdefault(stem, os.path.join(root, name))
            elif suffix.lower() in VIDEO_SUFFIXES:
                videos.setdefault(stem, os.path.join(root, name))
    return {**videos, **found}


def shuffled_order(cut_id: str, seed: int = 0) -> bytes:
    """Sort key of a clip in the shuffled manifest order: a hash of ``(seed, clip id)``."""
    return hashlib.blake2b(f"{seed}:{cut_id}".encode(), digest_size=8).digest()


def _video_advice(path: Path, err: Exception) -> str:
    """Why a video container (or .m4a) was not read, and how to extract its audio. Lhotse reads these through
    ``torchaudio.io`` alone, which torchaudio 2.11 no longer has: no installed ffmpeg helps."""
    suffix = path.suffix.lower()
    why = (f"which this install cannot decode, ffmpeg or not (Lhotse reads {'/'.join(VIDEO_SUFFIXES)} only through "
           f"torchaudio.io, which this torchaudio lacks)" if importlib.util.find_spec("torchaudio.io") is None
           else f"which the decoder refused ({decoder_reason(err)[:120]})")
    return (f"a {suffix} file, {why}: extract its audio first (e.g. ffmpeg -i {path.name} -vn -ar 32000 "
            f"{path.stem}.flac: 32 kHz serves AST's 16 kHz and HTS-AT's 32 kHz front ends; the .flac is then taken)")


SEGMENT_SECONDS = 10.0  # the YouTube corpora's segments (AudioSet, VGGSound): a file padded to it is a segment's
SEGMENT_SLACK = 1.0  # seconds a segment's own file may run over (a downloader's rounding, a container's padding)
WHOLE_SEGMENT = 0.9  # the share of its segment a whole video's file must hold (load_clip's rule for truncation)
NAMED_SLACK = 5.0  # seconds past its segment's length a file named by the segment may run and still be the segment


def segment_span(entry: ClipEntry, length: float, listed: Collection[tuple[float, float]] = ()
                 ) -> tuple[float, float] | str:
    """Where in its file of ``length`` seconds a clip listed as ``entry.segment`` of its video lies, as ``(start,
    duration)``, or why it cannot be told (a file named by the segment: see :class:`ClipEntry`'s ``named``).

    A file no longer than the segment (or than :data:`SEGMENT_SECONDS`, to which a short one may be padded) by
    :data:`SEGMENT_SLACK` is the segment itself, whole; a longer one that holds the segment is the whole video
    (a downloader that fetched the video, a copy named by the video id alone), and the clip is its segment: trained
    from the file's start, such a clip was the video's first ten seconds under the segment's labels. A file that is
    neither is refused; so is a file of one segment's length that ``listed`` (the segments of its video listed with
    this file) names for several segments (a file named by the video id alone): which one it holds is unknown.
    """
    begin, end = entry.segment
    span = end - begin
    held = min(end, length) - begin
    if entry.named:  # the segment (with a margin, perhaps), unless clearly the whole video
        return (begin, span) if length >= end and length > span + NAMED_SLACK else (0.0, length)
    if length > span + SEGMENT_SLACK and held >= WHOLE_SEGMENT * span:
        return begin, round(held, 6)
    if length > max(span, SEGMENT_SECONDS) + SEGMENT_SLACK:
        return (f"{length:.1f} s long, longer than its {span:g} s segment ({begin:g}-{end:g} s of the video), but "
                f"holding {max(held, 0.0):.1f} s of it: a video cut short, or another one")
    if len(listed) > 1:
        starts = ", ".join(f"{start:g}" for start, _ in sorted(listed))
        return (f"{length:.1f} s long, one segment, but named by its video alone, which is listed at {len(listed)} "
                f"starts ({starts} s): which one it holds is unknown; name each segment's file by its start")
    return 0.0, length


def _read_cut(entry: ClipEntry, dataset: str, listed: Collection[tuple[float, float]] = ()):
    if not entry.path.is_file():
        return entry, None, "missing"
    try:
        rec = Recording.from_file(entry.path.resolve(), recording_id=entry.cut_id)
        if rec.num_samples <= 0:
            return entry, None, "empty file (0 samples)"
    except Exception as err:  # noqa: BLE001 - any decoder error makes the file unreadable
        problem = truncation(entry.path)  # an empty file, or a header that promises more than the file holds
        if problem:
            return entry, None, problem
        if entry.path.suffix.lower() in VIDEO_SUFFIXES:  # Lhotse reads these through torchaudio.io alone
            return entry, None, _video_advice(entry.path, err)
        return entry, None, f"{type(err).__name__}: {decoder_reason(err)}"[:300]
    problem = truncation(entry.path)  # an interrupted download keeps its header (WAV, FLAC: cheap checks)
    if problem:
        return entry, None, problem
    start, duration = 0.0, rec.duration
    if entry.segment is not None:
        span = segment_span(entry, rec.duration, listed)
        if isinstance(span, str):
            return entry, None, span
        start, duration = span
    custom = {"labels": list(entry.labels), "split": entry.split, "dataset": dataset, **entry.custom}
    cut = MonoCut(id=entry.cut_id, start=start, duration=duration, channel=0, recording=rec, custom=custom)
    return entry, cut, None


def _ordered_map(fn, items: Iterable, num_jobs: int) -> Iterator:
    if num_jobs <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(num_jobs) as pool:  # header reads are I/O bound
        yield from pool.map(fn, items, chunksize=64)


STALE_SECONDS = 3600  # a temporary manifest nothing has written for this long is a killed prepare's
PREPARE_LOCK = "prepare.lock"


@contextmanager
def prepare_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``OUT/prepare.lock`` (created, with ``OUT``) while the block runs; yields ``OUT``.

    Two prepares into one folder would write the same manifests, the report of one beside the manifests of the
    other; the second is refused at once rather than made to wait, since it would only prepare the same files
    again (a job array that prepares its data "if needed" prepares it once, before the array).

    Raises:
        RunDirBusy: another process holds it (a ``RuntimeError``); the message names that process.
    """
    made = not os.path.lexists(out_dir)
    out = output_folder(out_dir)
    with run_dir_lock(out, "--out", name=PREPARE_LOCK, what="prepare",
                      advice="wait for it to end") as held:
        if held:  # (not on a file system without locks: then nothing keeps another prepare out)
            _LOCKED.add(out.resolve())
        try:
            yield out
        except BaseException:  # refused before writing (a bad CSV, a missing folder): no folder left behind
            if made and [p.name for p in out.iterdir()] == [PREPARE_LOCK]:
                (out / PREPARE_LOCK).unlink()
                out.rmdir()
            raise
        finally:
            _LOCKED.discard(out.resolve())


_LOCKED: set[Path] = set()  # the folders this process holds prepare.lock of


def killed_writes_age(out: Path) -> float | None:
    """How long nothing must have written a temporary file in prepare's ``out`` before it is taken for a killed
    prepare's (``remove_orphans``' ``older_than``): none under ``out``'s prepare.lock, which no other prepare holds
    meanwhile (a rerun after a kill finds the killed one's at once), an hour where a prepare runs without it (a
    library call)."""
    return None if Path(out).resolve() in _LOCKED else STALE_SECONDS


@contextmanager
def manifest_writer(path: Path) -> Iterator[Callable[[object], None]]:
    """Yield a function that writes one cut into manifest ``path`` (``.jsonl.gz``, as Lhotse's writer writes it);
    the manifest appears, complete, when the block ends without an error (none is published otherwise)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw) as packed, \
            io.TextIOWrapper(packed, encoding="utf-8") as handle:  # the header names the manifest, not the tmp
        yield lambda cut: handle.write(json.dumps(cut.to_dict(), ensure_ascii=False) + "\n")


def write_corpus(
    corpus: str,
    entries: Iterable[ClipEntry],
    out_dir: str | os.PathLike,
    classes: list[str] | None = None,
    names: dict[str, str] | None = None,
    num_jobs: int = 4,
    notes: list[str] | None = None,
    shuffle_seed: int | None = 0,
) -> PrepareReport:
    """Read every entry's header and write the per-split manifests, the class list and the report.

    Args:
        corpus: corpus name, the prefix of every file written.
        entries: the clips (any order; a clip listed twice is kept once, :func:`unique_entries`).
        out_dir: where to write.
        classes: class ids in target order (None for unlabeled corpora); every label must be one of them.
        names: display names of the classes.
        num_jobs: threads reading headers.
        notes: remarks stored in the report (e.g. rows skipped in a metadata file).
        shuffle_seed: the manifests list the clips in the order of :func:`shuffled_order` with this seed
            (None: in the order of ``entries``).
    """


    entries, repeated, conflicts = unique_entries(entries)
    if shuffle_seed is not None:
        entries = sorted(entries, key=lambda e: shuffled_order(e.cut_id, shuffle_seed))
    out = output_folder(out_dir)
    own = rf"{re.escape(corpus)}_(?:[^.]+\.jsonl\.gz|classes\.json|prepare\.json)"  # not `corpora stats`' files
    for tmp in remove_orphans(out, older_than=killed_writes_age(out), names=own):
        log.info("removed %s, left by a prepare that did not finish", tmp)
    report = PrepareReport(corpus=corpus, out_dir=out, notes=list(notes or []), conflicts=conflicts)
    if repeated:
        report.notes.append(f"{repeated} clips listed twice alike: kept once")
    known = set(classes or ())
    segments: dict[str, set] = {}  # file -> the segments of a video listed with it
    for entry in entries:
        if entry.segment is not None:
            segments.setdefault(str(entry.path), set()).add(entry.segment)
    writers: dict = {}  # split -> the function writing a cut into its manifest
    reported: set[str] = set()  # files already counted missing or unreadable
    cut_out = []  # the clips cut from the whole video their file holds
    labelled: set[str] = set()  # the classes of the clips written
    bar = progress(len(entries), 0, f"{corpus}: reading audio headers", True, unit="clip")
    with ExitStack() as manifests, bar:  # a manifest appears only when complete, and none after an error
        for entry, cut, problem in _ordered_map(lambda e: _read_cut(e, corpus, segments.get(str(e.path), ())),
                                                entries, num_jobs):
            bar.update(1)
            if classes is not None:
                unknown = [label for label in entry.labels if label not in known]
                if unknown:
                    raise ValueError(f"{corpus}: clip {entry.cut_id} has labels {unknown} not in the class list")
            if problem:  # a file listed in several splits (--unlabeled over the labelled tree) is one file
                if os.path.realpath(entry.path) not in reported:  # however the listings spell it
                    reported.add(os.path.realpath(entry.path))
                    if problem == "missing":
                        report.missing.append(str(entry.path))
                    else:
                        report.unreadable.append((str(entry.path), problem))
                continue
            if entry.split not in writers:
                writers[entry.split] = manifests.enter_context(manifest_writer(split_manifest(out, corpus,
                                                                                             entry.split)))
            writers[entry.split](cut)
            report.clips[entry.split] += 1
            if cut.duration < cut.recording.duration:
                cut_out.append(cut)
            labelled.update(entry.labels)
    if cut_out:
        first = cut_out[0]
        report.notes.append(f"{len(cut_out)} clips cut from the whole video their file holds (e.g. {first.id}: "
                            f"{first.start:g}-{first.end:g} s of {first.recording.sources[0].source}, "
                            f"{first.recording.duration:.1f} s)")
    listed = {label for entry in entries for label in entry.labels}
    lost = [c for c in classes or () if c in listed and c not in labelled]
    if lost:  # (VoxCeleb1's test archive unpacked elsewhere: its 40 speakers)
        report.notes.append(f"{len(lost)} of {len(classes)} classes have no clip in any split (e.g. "
                            f"{', '.join(lost[:3])}): every file listed for them is missing or unreadable")
    for split in writers:
        report.manifests[split] = split_manifest(out, corpus, split)
    if classes is not None:
        report.classes = len(classes)
        atomic_write_text(classes_path(out, corpus),
                          json.dumps({"classes": list(classes), "names": dict(names or {})}, indent=1))
    atomic_write_text(out / f"{corpus}_prepare.json", json.dumps(report.to_dict(), indent=1))
    return report  # its summary() is the command's to say
