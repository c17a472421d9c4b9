"""LibriSpeech: 960 h of read English audiobooks, used unlabeled for SSAST pretraining (Panayotov 2015).

Layout (the OpenSLR archives, extracted into one ``LibriSpeech`` folder, which is SRC)::

    SRC/<part>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac      16 kHz mono
    SRC/<part>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt        lines "<utt id> <TRANSCRIPT>"

Writes one manifest per part (``librispeech_train-clean-100``, ``librispeech_dev-clean`` ...) with
``labels = []`` and ``part``, ``speaker``, ``chapter``, ``text`` in ``cut.custom``, and by default
``librispeech_train960``, all train parts present in one manifest (SSAST pretrains on the 960 h).

The clips are listed from the transcripts, as ``lhotse.recipes.prepare_librispeech`` lists them. The
recipe itself is not used: it raises on the first corrupt .flac (``AudioLoadingError``, losing the whole
part) and drops a missing one with only a log line, whereas here both are counted in the report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator, Sequence

from lhotse import CutSet

from common.data.corpora.base import (
    ClipEntry,
    PrepareReport,
    manifest_writer,
    require_dir,
    shuffled_order,
    split_manifest,
    write_corpus,
)
from common.system.atomic import atomic_write_text

NAME = "librispeech"
DESCRIPTION = "LibriSpeech (unlabeled, for pretraining): <part>/<spk>/<chapter>/*.flac + *.trans.txt"
DEFAULT_PARTS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other")
COMBINED = "train960"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", type=lambda s: [p.strip() for p in s.split(",") if p.strip()], default=None,
                        help=f"comma-separated parts (default: those of {','.join(DEFAULT_PARTS)} present in SRC)")
    parser.add_argument("--combine-train", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also write librispeech_{COMBINED} with every train part prepared (default: on)")


def _entries(part_dir: Path) -> Iterator[ClipEntry]:
    for trans in sorted(part_dir.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8-sig").splitlines():
            if not line.strip():
                continue
            utt, _, text = line.strip().partition(" ")
            if utt.count("-") != 2:
                raise ValueError(f"{trans}: utterance id {utt!r} is not <speaker>-<chapter>-<utt>")
            speaker, chapter, _ = utt.split("-")
            yield ClipEntry(cut_id=utt, path=trans.parent / f"{utt}.flac", split=part_dir.name,
                            custom={"part": part_dir.name, "speaker": speaker, "chapter": chapter,
                                    "text": text.strip()})


def _combine(report: PrepareReport, parts: list[str]) -> None:
    """Merge the written manifests of ``parts`` into ``librispeech_train960`` (no header is re-read), in
    the shuffled order of every manifest (``shuffled_order``), not part after part."""
    path = split_manifest(report.out_dir, NAME, COMBINED)
    cuts = sorted((cut for part in parts for cut in CutSet.from_file(report.manifests[part])),
                  key=lambda cut: shuffled_order(cut.id))
    count = len(cuts)
    with manifest_writer(path) as write:  # appears when complete
        for cut in cuts:
            write(cut.with_custom("split", COMBINED))
    report.manifests[COMBINED] = path
    report.notes.append(f"{COMBINED}: {count} clips of {', '.join(parts)} (also in their own manifests)")
    atomic_write_text(report.out_dir / f"{NAME}_prepare.json", json.dumps(report.to_dict(), indent=1))


def prepare(src: Path, out: Path, num_jobs: int = 4, parts: Sequence[str] | None = None,
            combine_train: bool = True) -> PrepareReport:
    """Write one manifest per LibriSpeech part, plus the combined train manifest.

    Args:
        src: the ``LibriSpeech`` folder.
        out: where to write.
        num_jobs: threads reading audio headers.
        parts: part folders to prepare; default: those of ``DEFAULT_PARTS`` present in ``src``.
        combine_train: also write ``librispeech_train960`` from every prepared ``train-*`` part.
    """
    src = require_dir(Path(src), "LibriSpeech folder")
    if parts is None:
        parts = [p for p in DEFAULT_PARTS if (src / p).is_dir()]
        if not parts:
            raise FileNotFoundError(f"no LibriSpeech part folder in {src}; expected some of {', '.join(DEFAULT_PARTS)}")
    part_dirs = [require_dir(src / p, f"LibriSpeech part {p!r}") for p in parts]
    for part_dir in part_dirs:
        if next(part_dir.rglob("*.trans.txt"), None) is None:
            raise FileNotFoundError(f"no <speaker>-<chapter>.trans.txt transcript under {part_dir}")
    entries = (entry for part_dir in part_dirs for entry in _entries(part_dir))
    report = write_corpus(NAME, entries, out, num_jobs=num_jobs)
    train = [p for p in parts if p.startswith("train") and p in report.manifests]
    if combine_train and train:
        _combine(report, train)
    return report
