"""AudioSet: ~2M ten-second YouTube segments, 527 classes, multi-label (Gemmeke et al. 2017).

Layout (Google's segment CSVs plus the clips a downloader fetched)::

    SRC/balanced_train_segments.csv    3 '#' header lines, then rows
    SRC/unbalanced_train_segments.csv      YTID, start_seconds, end_seconds, "mid,mid,..."
    SRC/eval_segments.csv
    SRC/class_labels_indices.csv       index,mid,display_name
    SRC/audio/**                       clips named by YouTube id (option --audio-dir)

A clip belongs to YTID when its stem is ``YTID``, ``Y``+YTID (PANNs) or starts with ``YTID_``
(``YTID_30.000.flac``, ``YTID_30000_40000.wav``); the audio folder is searched recursively for
.wav/.flac/.ogg/.mp3. Writes ``audioset_balanced_train``, ``audioset_unbalanced_train`` and ``audioset_eval``
(cut id = YTID, labels = mids, classes in ``index`` order); a clip with no file is reported missing as
``AUDIO/YTID`` (no suffix: any accepted name would do). A file longer than its segment that holds it is the whole
video (a downloader that fetched it all): the clip is the segment's span of it
(``common.data.corpora.base.segment_span``: a file whose name gives the segment, ``YTID_30.000``, only where it
reaches the segment's end and runs 5 s past its length), counted in the report.

``--labels-json FILE`` takes the labels of the clips it lists from an AST / PSLA data file
(``{"data": [{"wav": ".../YTID.wav", "labels": "mid,mid"}, ...]}``, the clip's YouTube id read from the file
name as above) instead of the segment CSVs': PSLA's label-enhanced ``balanced_train_data_type1_2_mean.json`` is
what SSAST and AST fine-tune AudioSet-20K on. The report says how many clips of each split took its labels.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from common.data.corpora.base import ClipEntry, PrepareReport, require_dir, require_file, scan_audio, write_corpus

NAME = "audioset"
DESCRIPTION = "AudioSet: *_segments.csv + class_labels_indices.csv + audio/, 527 classes, multi-label"

SPLITS = {
    "balanced_train": "balanced_train_segments.csv",
    "unbalanced_train": "unbalanced_train_segments.csv",
    "eval": "eval_segments.csv",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio-dir", type=Path, default=None, help="downloaded clips (default SRC/audio)")
    parser.add_argument("--splits", default=None,
                        help=f"comma list of {', '.join(SPLITS)} (default: every split whose CSV exists)")
    parser.add_argument("--labels-json", type=Path, default=None,
                        help="an AST / PSLA data file whose labels replace the segment CSVs' for the clips it lists, "
                             "e.g. PSLA's label-enhanced balanced_train_data_type1_2_mean.json (SSAST's and AST's "
                             "AudioSet-20K)")


def read_classes_csv(path: Path) -> tuple[list[str], dict[str, str]]:
    """``(mids in index order, {mid: display_name})`` from ``class_labels_indices.csv``."""
    listing = require_file(path, "AudioSet class list (class_labels_indices.csv)")
    with listing.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    needed = {"index", "mid", "display_name"}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"{path}: expected columns {sorted(needed)}, got {sorted(rows[0]) if rows else 'no rows'}")
    by_index = {int(r["index"]) if r["index"].strip().isdigit() else -1: r for r in rows}
    if sorted(by_index) != list(range(len(rows))):
        raise ValueError(f"{path}: indices are not 0..{len(rows) - 1} without repeats")
    classes = [by_index[i]["mid"] for i in range(len(rows))]
    return classes, {by_index[i]["mid"]: by_index[i]["display_name"] for i in range(len(rows))}


def read_segments(path: Path) -> Iterator[tuple[str, float, float, tuple[str, ...]]]:
    """``(YTID, start_seconds, end_seconds, mids)`` for every row of a ``*_segments.csv``."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, skipinitialspace=True)
        for row in reader:
            if not row or row[0].startswith("#"):
                continue
            try:
                ytid, start, end, labels = row
                segment = (ytid, float(start), float(end))
            except ValueError:
                raise ValueError(f"{path}:{reader.line_num}: expected 'YTID, start_seconds, end_seconds, "
                                 f"\"mid,...\"', got {row}") from None
            yield *segment, tuple(mid.strip() for mid in labels.split(",") if mid.strip())


def ytid_candidates(stem: str) -> Iterator[str]:
    """The YouTube ids a clip's file stem may name: the stem, the stem without a leading ``Y`` (PANNs'
    ``Y<YTID>``), and each of those cut at an ``_`` (``<YTID>_<start>_<end>``, DCASE's ``Y<YTID>_<start>_<end>``)."""
    for base in (stem, stem[1:]) if stem.startswith("Y") else (stem,):
        yield base
        for i, char in enumerate(base):
            if char == "_":
                yield base[:i]


def index_audio(folder: Path) -> dict[str, str]:
    """``{YTID candidate: file path}`` for every audio file under ``folder`` (exact stems win; the candidates are
    :func:`ytid_candidates`')."""
    exact = scan_audio(folder)
    derived: dict[str, str] = {}
    for stem, path in exact.items():
        for base in ytid_candidates(stem):
            derived.setdefault(base, path)
    return {**derived, **exact}


def read_labels_json(path: Path, classes: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``{YTID candidate: mids}`` from an AST / PSLA data file (``{"data": [{"wav": ..., "labels": "mid,..."}]}``),
    the YouTube id read from each ``wav``'s file name as :func:`index_audio` reads a clip's (exact stems win).

    Raises:
        ValueError: not such a file (naming the entry that is not), or a label not in the class list.
    """
    listing = require_file(path, "AudioSet labels file (--labels-json)")
    try:
        data = json.loads(listing.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected an AST / PSLA data file, {{\"data\": [{{\"wav\": ..., \"labels\": "
                         f"\"mid,...\"}}, ...]}}")
    known, exact, derived = set(classes), {}, {}
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("wav"), str) and isinstance(row.get("labels"), str)):
            raise ValueError(f"{path}: data[{i}] is not {{\"wav\": path, \"labels\": \"mid,...\"}}: {row!r:.120}")
        mids = tuple(mid.strip() for mid in row["labels"].split(",") if mid.strip())
        unknown = [mid for mid in mids if mid not in known]
        if unknown:
            raise ValueError(f"{path}: data[{i}] ({row['wav']}) has labels {unknown} not in class_labels_indices.csv")
        stem = Path(row["wav"].replace("\\", "/")).stem
        exact.setdefault(stem, mids)
        for base in ytid_candidates(stem):
            derived.setdefault(base, mids)
    return {**derived, **exact}


def prepare(src: Path, out: Path, num_jobs: int = 4, audio_dir: Path | None = None,
            splits: str | Sequence[str] | None = None, labels_json: Path | None = None) -> PrepareReport:
    """Write the manifests of the chosen splits (default: every split whose segment CSV is in SRC); with
    ``labels_json``, the clips that file lists take its labels (see the module docstring)."""
    src = Path(src)
    classes, names = read_classes_csv(src / "class_labels_indices.csv")
    if splits is None:
        chosen = [s for s, csv_name in SPLITS.items() if (src / csv_name).is_file()]
        if not chosen:
            raise FileNotFoundError(f"no AudioSet segment CSV in {src} (expected {', '.join(SPLITS.values())})")
    else:
        chosen = [s.strip() for s in (splits.split(",") if isinstance(splits, str) else splits) if s.strip()]
        if not chosen or not set(chosen) <= set(SPLITS):
            raise ValueError(f"AudioSet splits must be a comma list of {', '.join(SPLITS)}, got {splits!r}")
    segment_csvs = {s: require_file(src / SPLITS[s], f"AudioSet {s} segments ({SPLITS[s]})") for s in chosen}
    audio = require_dir(Path(audio_dir) if audio_dir else src / "audio", "AudioSet audio folder")
    found = index_audio(audio)
    relabel = {} if labels_json is None else read_labels_json(Path(labels_json), classes)
    taken, listed = Counter(), Counter()

    def entries() -> Iterator[ClipEntry]:
        for split, path in segment_csvs.items():
            for ytid, start, end, labels in read_segments(path):
                listed[split] += 1
                if ytid in relabel:
                    labels = relabel[ytid]
                    taken[split] += 1
                path = Path(found.get(ytid) or audio / ytid)
                yield ClipEntry(cut_id=ytid, path=path, split=split, labels=labels,
                                custom={"start_seconds": start, "end_seconds": end}, segment=(start, end),
                                named=path.stem not in (ytid, f"Y{ytid}"))  # YTID_30.000 names the segment

    listed_entries = list(entries())  # counted before the report's notes are written
    notes = []
    if labels_json is not None:
        counts = ", ".join(f"{split} {taken[split]} of {listed[split]}" for split in segment_csvs)
        notes.append(f"labels from {labels_json} for the clips it lists ({counts}); the segment CSVs' for the others")
        if not sum(taken.values()):
            raise ValueError(f"--labels-json {labels_json}: names no clip of the chosen splits ({', '.join(chosen)}); "
                             f"its wav file names must hold the YouTube ids")
    return write_corpus(NAME, listed_entries, out, classes=classes, names=names, num_jobs=num_jobs, notes=notes)
