"""VoxCeleb1 speaker identification: 153,516 utterances of 1,251 celebrities (Nagrani 2017).

Layout (the VoxCeleb1 dev and test archives, both extracted into ``wav/``, and the identification split)::

    SRC/iden_split.txt                           lines "<set> <speaker>/<video>/<utt>.wav", set 1 train, 2 valid, 3 test
    SRC/wav/<speaker>/<video>/<utt>.wav          16 kHz mono (another folder with --audio-dir)
    SRC/vox1_meta.csv                            optional; tab-separated, header
                                                 "VoxCeleb1 ID  VGGFace1 ID  Gender  Nationality  Set"

Writes ``voxceleb_train``, ``voxceleb_valid`` and ``voxceleb_test`` with the identification split that
SSAST uses (every speaker in all three sets), not the verification split of ``lhotse.recipes.prepare_voxceleb``
(dev and test disjoint by speaker). Classes are the speaker ids, sorted; their names are the VGGFace1 ids
(the celebrities' names) when ``vox1_meta.csv`` is present. Cut ids are ``<speaker>-<video>-<utt>``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from common.data.corpora.base import ClipEntry, PrepareReport, require_dir, require_file, write_corpus

NAME = "voxceleb"
DESCRIPTION = "VoxCeleb1 speaker identification: iden_split.txt + wav/, 1251 speakers, train/valid/test"
SPLITS = {"1": "train", "2": "valid", "3": "test"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio-dir", type=Path, default=None,
                        help="folder holding <speaker>/<video>/<utt>.wav (default: SRC/wav)")


def _read_split(path: Path) -> list[tuple[str, str]]:
    """``[(split, "<speaker>/<video>/<utt>.wav"), ...]`` from ``iden_split.txt``."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[0] not in SPLITS or len(Path(fields[1]).parts) != 3:
            raise ValueError(f"{path}:{number}: expected '<1|2|3> <speaker>/<video>/<utt>.wav', got {line!r}")
        rows.append((SPLITS[fields[0]], fields[1]))
    if not rows:
        raise ValueError(f"{path} lists no utterances")
    return rows


def _read_names(path: Path) -> dict[str, str]:
    """``{speaker id: VGGFace1 id}`` from ``vox1_meta.csv``."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k}
                for row in csv.DictReader(handle, delimiter="\t")]
    needed = {"VoxCeleb1 ID", "VGGFace1 ID"}
    if not rows or not needed <= set(rows[0]):
        got = sorted(rows[0]) if rows else "no rows"
        raise ValueError(f"{path}: expected tab-separated columns {sorted(needed)}, got {got}")
    return {row["VoxCeleb1 ID"]: row["VGGFace1 ID"] for row in rows}


def prepare(src: Path, out: Path, num_jobs: int = 4, audio_dir: Path | None = None) -> PrepareReport:
    """Write the VoxCeleb1 identification manifests and the speaker list.

    Args:
        src: the VoxCeleb1 folder holding ``iden_split.txt``.
        out: where to write.
        num_jobs: threads reading audio headers.
        audio_dir: the folder of ``<speaker>/<video>/<utt>.wav``; default ``src/wav``.
    """
    src = Path(src)
    rows = _read_split(require_file(src / "iden_split.txt", "VoxCeleb1 identification split (iden_split.txt)"))
    audio = require_dir(Path(audio_dir) if audio_dir is not None else src / "wav", "VoxCeleb1 audio folder")
    classes = sorted({Path(rel).parts[0] for _, rel in rows})
    meta = src / "vox1_meta.csv"
    names = _read_names(meta) if meta.is_file() else {}
    entries = []
    for split, rel in rows:
        speaker, video, utt = Path(rel).parts
        entries.append(ClipEntry(cut_id=f"{speaker}-{video}-{Path(utt).stem}", path=audio / rel, split=split,
                                 labels=(speaker,), custom={"speaker": speaker, "video": video}))
    return write_corpus(NAME, entries, out, classes=classes,
                        names={c: names[c] for c in classes if c in names}, num_jobs=num_jobs)
