"""ESC-50: 2,000 five-second environmental recordings, 50 classes, 5 folds (Piczak 2015).

Layout (the GitHub archive ``ESC-50-master``)::

    SRC/meta/esc50.csv      filename,fold,target,category,esc10,src_file,take
    SRC/audio/*.wav         44.1 kHz mono; the loader resamples to 16 kHz

Writes one manifest per fold (``esc50_fold1`` .. ``esc50_fold5``); cross-validation trains on four folds
and tests on the fifth (AST / SSAST recipe: the mean accuracy over the five folds).
"""

from __future__ import annotations

import csv
from pathlib import Path

from common.data.corpora.base import ClipEntry, PrepareReport, require_dir, require_file, write_corpus

NAME = "esc50"
DESCRIPTION = "ESC-50 environmental sounds: meta/esc50.csv + audio/, 50 classes, 5 folds"


def prepare(src: Path, out: Path, num_jobs: int = 4) -> PrepareReport:
    src = Path(src)
    meta = require_file(src / "meta" / "esc50.csv", "ESC-50 metadata (meta/esc50.csv)")
    audio = require_dir(src / "audio", "ESC-50 audio folder")
    with meta.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    needed = {"filename", "fold", "target", "category"}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"{meta}: expected columns {sorted(needed)}, got {sorted(rows[0]) if rows else 'no rows'}")
    by_target = {int(r["target"]): r["category"] for r in rows}
    if sorted(by_target) != list(range(len(by_target))):
        raise ValueError(f"{meta}: targets are not 0..{len(by_target) - 1}")
    classes = [by_target[i] for i in range(len(by_target))]
    entries = [
        ClipEntry(cut_id=Path(r["filename"]).stem, path=audio / r["filename"], split=f"fold{int(r['fold'])}",
                  labels=(r["category"],), custom={"fold": int(r["fold"]), "esc10": r.get("esc10") == "True"})
        for r in rows
    ]
    return write_corpus(NAME, entries, out, classes=classes, num_jobs=num_jobs)
