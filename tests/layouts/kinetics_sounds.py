"""Miniature Kinetics-Sounds: a class list, Kinetics annotation CSVs with the real columns (other Kinetics
classes included, test.csv without labels as in Kinetics-700-2020) and audio extracted per video, named
as the kinetics-dataset downloader names the videos, in ``<split>/<label>/`` folders or flat."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.layouts import write_clip, write_garbage

CLASSES = ["playing bagpipes", "bowling", "ripping paper", "tapping pen", "shuffling cards"]
UNUSED = ["shuffling cards"]  # in the class list, in no annotation row

# annotation file -> (label, youtube_id, time_start, time_end, split column, path under audio/ or None)
ANNOTATIONS = {
    "train": [
        ("playing bagpipes", "---QUuC4vJs", 3, 13, "train", "train/playing bagpipes/---QUuC4vJs_000003_000013.wav"),
        ("bowling", "--33Lscn6sk", 4, 14, "train", "--33Lscn6sk_000004_000014.flac"),
        ("abseiling", "--07WQ2iBlw", 1, 11, "train", None),  # not a Kinetics-Sounds class
        ("ripping paper", "-0J8BvO0u1c", 0, 10, "train", "train/ripping paper/-0J8BvO0u1c_000000_000010.wav"),
        ("tapping pen", "-1Dp9Yx4QJo", 23, 33, "train", None),
        ("bowling", "-3B32lodo2M", 59, 69, "train", "train/bowling/-3B32lodo2M_000059_000069.wav"),
    ],
    "validate": [
        ("playing bagpipes", "-4MA0cS4q8E", 0, 10, "val", "val/playing bagpipes/-4MA0cS4q8E_000000_000010.wav"),
        ("yoga", "-7E-wEPoRDc", 1, 11, "val", "val/yoga/-7E-wEPoRDc_000001_000011.wav"),
        ("tapping pen", "-6uUYe1gvXk", 15, 25, "val", "val/tapping pen/-6uUYe1gvXk_000015_000025.wav"),
    ],
    "test": [
        ("bowling", "-8Qmm3fW8rU", 30, 40, "test", "test/-8Qmm3fW8rU_000030_000040.wav"),
        ("yoga", "-9wQhCtbzKo", 2, 12, "test", "test/-9wQhCtbzKo_000002_000012.wav"),
    ],
}
CORRUPT = "-3B32lodo2M_000059_000069"  # a failed extraction
STEREO = "-0J8BvO0u1c_000000_000010"  # 44.1 kHz stereo
MISSING = "-1Dp9Yx4QJo_000023_000033"
OUTPUT_SPLIT = {"train": "train", "validate": "test", "test": "test"}


def build(root: Path, test_labels: bool = False, validation_file: str = "validate.csv") -> dict:
    """Write the layout; test.csv has a label column only if ``test_labels``; the validation annotations are
    ``validation_file`` (Kinetics' ``validate.csv``, or ``val.csv`` as the CVDF copy names it). Returns ``clips``
    {annotation file: {cut id: label}} of the Kinetics-Sounds clips that should be prepared, ``missing`` /
    ``corrupt`` (cut id -> path under audio/) and ``classes``."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "kinetics_sounds_classes.txt").write_text("\n".join(CLASSES) + "\n\n")
    audio = root / "audio"
    clips: dict[str, dict[str, str]] = {}
    missing, corrupt = {}, {}
    for seed, (name, rows) in enumerate(ANNOTATIONS.items()):
        columns = ["label", "youtube_id", "time_start", "time_end", "split", "is_cc"]
        if name == "test" and not test_labels:
            columns = columns[1:5]
        file = validation_file if name == "validate" else f"{name}.csv"
        with (root / "annotations" / file).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(dict(label=label, youtube_id=ytid, time_start=start, time_end=end, split=split, is_cc=0)
                             for label, ytid, start, end, split, _ in rows)
        clips[name] = {}
        for k, (label, ytid, start, end, split, path) in enumerate(rows):
            stem = f"{ytid}_{start:06d}_{end:06d}"
            if stem == MISSING:
                missing[stem] = audio / split / label / stem
            elif stem == CORRUPT:
                corrupt[stem] = write_garbage(audio / path)
            elif path is not None:
                stereo = stem == STEREO
                write_clip(audio / path, seconds=1.0, sr=44100 if stereo else 16000, channels=2 if stereo else 1,
                           seed=10 * seed + k)
                if label in CLASSES:
                    clips[name][stem] = label
    return {"clips": clips, "missing": missing, "corrupt": corrupt, "classes": CLASSES}
