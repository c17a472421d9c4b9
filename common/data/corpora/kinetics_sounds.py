"""Kinetics-Sounds: the Kinetics classes that can be heard (Arandjelovic & Zisserman 2017), ~20K train /
~2.7K test clips of up to ten seconds, one label each.

Layout (Kinetics annotations plus the audio extracted from the downloaded videos)::

    SRC/kinetics_sounds_classes.txt        one Kinetics class name per line (option --classes)
    SRC/annotations/train.csv              label,youtube_id,time_start,time_end,split[,is_cc]
    SRC/annotations/validate.csv           or val.csv (the name in the CVDF copy of Kinetics-400 / -700-2020)
    SRC/annotations/test.csv               only read with --test-from test (Kinetics-700-2020 withholds its labels)
    SRC/audio/<split>/<label>/<youtube_id>_<time_start:06d>_<time_end:06d>.wav   (option --audio-dir)

Clips are found by stem anywhere under the audio folder (.wav/.flac/.ogg/.mp3), so a flat folder works
too. Only rows whose label is in the class list are kept. Writes ``kinetics_sounds_train`` (train.csv)
and ``kinetics_sounds_test`` (the validation annotations by default), classes in the class file's order; a clip with no
file is reported missing as ``AUDIO/<split>/<label>/<stem>`` (no suffix: any accepted one would do).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from common.data.corpora.base import ClipEntry, PrepareReport, require_dir, require_file, scan_audio, write_corpus

NAME = "kinetics_sounds"
DESCRIPTION = "Kinetics-Sounds: class list + Kinetics annotations/*.csv + audio/, train/test"

COLUMNS = ("label", "youtube_id", "time_start", "time_end")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=Path, default=None,
                        help="class list, one Kinetics class per line (default SRC/kinetics_sounds_classes.txt)")
    parser.add_argument("--audio-dir", type=Path, default=None, help="extracted audio (default SRC/audio)")
    parser.add_argument("--test-from", choices=("validate", "val", "test"), default="validate",
                        help="annotations of the test split: validate (the default; annotations/validate.csv, "
                             "or val.csv as the CVDF copy names it; val is the same choice) or test "
                             "(annotations/test.csv, where it has labels: Kinetics-700-2020 withholds them)")


# the validation annotations' file names: Kinetics' own release, then the CVDF copy's (cvdfoundation/kinetics-dataset)
VALIDATION_FILES = ("validate.csv", "val.csv")


def annotation_file(src: Path, test_from: str) -> Path:
    """The annotation CSV of ``test_from`` (``validate``, ``val`` or ``test``) under ``SRC/annotations``: the
    validation split is ``validate.csv`` or, where that is absent, ``val.csv``."""
    folder = Path(src) / "annotations"
    if test_from == "test":
        return folder / "test.csv"
    found = [folder / name for name in VALIDATION_FILES if (folder / name).is_file()]
    if not found:
        raise FileNotFoundError(f"Kinetics validation annotations not found: {folder / VALIDATION_FILES[0]} (or "
                                f"{VALIDATION_FILES[1]})")
    return found[0]


def read_class_file(path: Path) -> list[str]:
    """The class names of ``path``, one per line, in file order (blank lines ignored)."""
    text = require_file(path, "Kinetics-Sounds class list").read_text(encoding="utf-8-sig")
    classes = [line.strip() for line in text.splitlines()]
    classes = [c for c in classes if c]
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if not classes or repeated:
        raise ValueError(f"{path}: expected one unique class name per line, "
                         f"{'repeated: ' + ', '.join(repeated) if repeated else 'got none'}")
    return classes


def read_annotations(path: Path) -> list[tuple[str, str, int, int, str]]:
    """``(label, youtube_id, time_start, time_end, split)`` for every row of a Kinetics annotation CSV."""
    with require_file(path, f"Kinetics annotations ({path.name})").open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        absent = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if absent:
            hint = " (its labels are withheld in this release: use --test-from validate)" if absent == ["label"] else ""
            raise ValueError(f"{path}: missing columns {absent}, got {reader.fieldnames}{hint}")
        rows = []
        for row in reader:
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{reader.line_num}: time_start / time_end must be seconds, "
                                 f"got {row}") from None
            split = (row.get("split") or "").strip()
            rows.append((row["label"].strip(), row["youtube_id"].strip(), start, end, split))
    return rows


def prepare(src: Path, out: Path, num_jobs: int = 4, classes: Path | None = None, audio_dir: Path | None = None,
            test_from: str = "validate") -> PrepareReport:
    """Write ``kinetics_sounds_train`` / ``kinetics_sounds_test`` from the Kinetics annotations."""
    src = Path(src)
    if test_from not in ("validate", "val", "test"):
        raise ValueError(f"test_from must be 'validate' (or 'val') or 'test', got {test_from!r}")
    class_list = read_class_file(Path(classes) if classes else src / "kinetics_sounds_classes.txt")
    files = {"train": src / "annotations" / "train.csv"}
    annotations = {"train": read_annotations(files["train"])}
    files["test"] = annotation_file(src, test_from)
    annotations["test"] = read_annotations(files["test"])
    audio = require_dir(Path(audio_dir) if audio_dir else src / "audio", "Kinetics-Sounds audio folder")
    found = scan_audio(audio)
    wanted = set(class_list)
    entries, used, notes = [], set(), [f"test split from annotations/{files['test'].name}"]
    for split, rows in annotations.items():
        kept = [row for row in rows if row[0] in wanted]
        if not kept:
            notes.append(f"no row of annotations/{files[split].name} has a class of the class list")
        for label, ytid, start, end, kinetics_split in kept:
            used.add(label)
            stem = f"{ytid}_{start:06d}_{end:06d}"
            path = found.get(stem) or audio / (kinetics_split or files[split].stem) / label / stem
            entries.append(ClipEntry(cut_id=stem, path=Path(path), split=split, labels=(label,),
                                     custom={"youtube_id": ytid, "time_start": start, "time_end": end}))
    unused = [c for c in class_list if c not in used]
    if unused:
        notes.append(f"classes with no clip in the annotations: {', '.join(unused)}")
    return write_corpus(NAME, entries, out, classes=class_list, num_jobs=num_jobs, notes=notes)
