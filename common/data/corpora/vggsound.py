"""VGGSound: ~200K ten-second YouTube clips, 309 classes, one label each (Chen et al. 2020).

Layout (the authors' CSV plus the clips a downloader fetched)::

    SRC/vggsound.csv     no header; rows YTID,start_seconds,label,split (split is train or test)
    SRC/audio/**         <YTID>_<start:06d>.wav / .flac (option --audio-dir)

A clip's file is found by stem anywhere under the audio folder (.wav/.flac/.ogg/.mp3): ``YTID_000030``,
then ``YTID_30``, then plain ``YTID``. Writes ``vggsound_train`` and ``vggsound_test`` (cut id
``<YTID>_<start:06d>``, classes = the sorted labels); a clip with no file is reported missing as
``AUDIO/<cut id>`` (no suffix: any accepted name would do). A plain ``YTID`` file longer than the clip's ten
seconds that holds them is the whole video: the clip is its span of it (``common.data.corpora.base.segment_span``);
one of a segment's length that several rows would share (the same video at other starts) is refused for each, as
which segment it holds is unknown. A file whose name gives the start is that segment, whole.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from common.data.corpora.base import (
    SEGMENT_SECONDS,
    ClipEntry,
    PrepareReport,
    require_dir,
    require_file,
    scan_audio,
    write_corpus,
)

NAME = "vggsound"
DESCRIPTION = "VGGSound: vggsound.csv + audio/, 309 classes, train/test"

SPLITS = ("train", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio-dir", type=Path, default=None, help="downloaded clips (default SRC/audio)")


def read_rows(path: Path) -> list[tuple[str, int, str, str]]:
    """``(YTID, start_seconds, label, split)`` for every row of ``vggsound.csv``."""
    rows = []
    with require_file(path, "VGGSound metadata (vggsound.csv)").open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        for row in reader:
            if not row:
                continue
            try:
                ytid, start, label, split = (field.strip() for field in row)
                start_seconds = int(float(start))
            except ValueError:
                raise ValueError(f"{path}:{reader.line_num}: expected YTID,start_seconds,label,split (no header), "
                                 f"got {row}") from None
            if split not in SPLITS:
                raise ValueError(f"{path}:{reader.line_num}: split {split!r} is not one of {', '.join(SPLITS)}")
            rows.append((ytid, start_seconds, label, split))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def prepare(src: Path, out: Path, num_jobs: int = 4, audio_dir: Path | None = None) -> PrepareReport:
    """Write ``vggsound_train`` / ``vggsound_test``; a clip listed twice keeps its first row (one listed with
    another label or split is named in the report)."""
    src = Path(src)
    rows = read_rows(src / "vggsound.csv")
    audio = require_dir(Path(audio_dir) if audio_dir else src / "audio", "VGGSound audio folder")
    found = scan_audio(audio)
    entries = []
    for ytid, start, label, split in rows:
        cut_id = f"{ytid}_{start:06d}"
        named = found.get(cut_id) or found.get(f"{ytid}_{start}")  # the segment's own file
        path = named or found.get(ytid) or audio / cut_id
        entries.append(ClipEntry(cut_id=cut_id, path=Path(path), split=split, labels=(label,),
                                 custom={"youtube_id": ytid, "start_seconds": start},
                                 segment=(float(start), start + SEGMENT_SECONDS), named=bool(named)))
    classes = sorted({label for _, _, label, _ in rows})
    return write_corpus(NAME, entries, out, classes=classes, num_jobs=num_jobs)
