"""Miniature ESC-50: meta/esc50.csv with the real columns, audio/*.wav at 44.1 kHz."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.layouts import write_clip, write_garbage

CATEGORIES = ["dog", "rooster", "pig", "cow"]


def build(root: Path, clips_per_fold: int = 2, corrupt: bool = True, missing: bool = True) -> dict:
    rows, written = [], {}
    seed = 0
    for fold in range(1, 6):
        for k in range(clips_per_fold):
            target = (fold + k) % len(CATEGORIES)
            name = f"{fold}-{1000 + seed}-A-{target}.wav"
            rows.append(dict(filename=name, fold=fold, target=target, category=CATEGORIES[target],
                             esc10="True" if target < 2 else "False", src_file=1000 + seed, take="A"))
            write_clip(root / "audio" / name, seconds=5.0, sr=44100, seed=seed)
            written[Path(name).stem] = (f"fold{fold}", CATEGORIES[target])
            seed += 1
    bad = {}
    if corrupt:
        rows.append(dict(filename="1-9998-A-0.wav", fold=1, target=0, category="dog", esc10="True",
                         src_file=9998, take="A"))
        write_garbage(root / "audio" / "1-9998-A-0.wav")
        bad["corrupt"] = "1-9998-A-0"
    if missing:
        rows.append(dict(filename="2-9999-A-1.wav", fold=2, target=1, category="rooster", esc10="True",
                         src_file=9999, take="A"))
        bad["missing"] = "2-9999-A-1"
    (root / "meta").mkdir(parents=True, exist_ok=True)
    with (root / "meta" / "esc50.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"clips": written, "classes": CATEGORIES, **bad}
