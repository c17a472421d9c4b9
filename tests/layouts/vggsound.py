"""Miniature VGGSound: vggsound.csv as the authors publish it (no header, labels with commas quoted) and
clips named ``<YTID>_<start:06d>``, ``<YTID>_<start>`` or ``<YTID>`` in nested folders."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.layouts import write_clip, write_garbage

# (YTID, start, label, split, file name under the audio folder or None for a clip never downloaded)
ROWS = [
    ("---g-f_I2yQ", 1, "people marching", "test", "test/---g-f_I2yQ_000001.flac"),
    ("--0PQM4-hqg", 30, "waterfall burbling", "train", "train/--0PQM4-hqg_000030.wav"),
    ("--56QUhyDQM", 185, "male speech, man speaking", "train", "--56QUhyDQM_185.wav"),
    ("--5OkAjCI7g", 40, "people marching", "train", "train/more/--5OkAjCI7g.wav"),
    ("-0BKyt8iZ1I", 0, "waterfall burbling", "test", "test/-0BKyt8iZ1I_000000.wav"),
    ("-1XA5dQVCSg", 250, "male speech, man speaking", "train", None),
    ("-2Gb9Aq_WYI", 12, "people marching", "test", "test/-2Gb9Aq_WYI_000012.wav"),
]
CORRUPT = "-2Gb9Aq_WYI_000012"  # a failed download
HIGH_RATE = "--0PQM4-hqg_000030"  # 44.1 kHz


def build(root: Path, audio_dir: str = "audio") -> dict:
    """Write the layout; returns ``clips`` {cut id: (split, label)} of the clips that should be prepared,
    ``missing`` / ``corrupt`` (cut id -> path) and ``classes``."""
    root.mkdir(parents=True, exist_ok=True)
    audio = root / audio_dir
    with (root / "vggsound.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows(r[:4] for r in ROWS)
        writer.writerow(ROWS[0][:4])  # the real CSV repeats a few rows
        writer.writerow((*ROWS[1][:2], "people marching", "test"))  # and may list a clip again otherwise
    clips, missing, corrupt = {}, {}, {}
    for seed, (ytid, start, label, split, name) in enumerate(ROWS):
        cut_id = f"{ytid}_{start:06d}"
        if name is None:
            missing[cut_id] = audio / cut_id
        elif cut_id == CORRUPT:
            corrupt[cut_id] = write_garbage(audio / name)
        else:
            write_clip(audio / name, seconds=1.5, sr=44100 if cut_id == HIGH_RATE else 16000, seed=seed)
            clips[cut_id] = (split, label)
    return {"clips": clips, "missing": missing, "corrupt": corrupt,
            "classes": sorted({r[2] for r in ROWS})}
