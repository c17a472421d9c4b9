"""``custom``: your own audio, labeled for fine-tuning and / or unlabeled for pretraining.

Labeled audio comes from either

- a CSV (``--csv FILE``) with a header and the columns ``path,label`` and optionally ``split``; several
  labels of one clip are separated by ``;`` (multi-label); paths are relative to the CSV's folder unless
  absolute; an empty label makes the clip unlabeled; or
- a folder per class (``--src DIR``): ``DIR/<class>/**/*.wav`` (or .flac, .ogg, .mp3), optionally one
  level of split folders first: ``DIR/train/<class>/...``, ``DIR/valid/<class>/...``, ``DIR/test/...``.

Clips without a split go to ``train``, unless ``--valid-fraction`` / ``--test-fraction`` carve valid and
test sets out of them (deterministically, from a hash of the path and ``--seed``).

Unlabeled audio for pretraining (``--unlabeled DIR_OR_LIST``): every audio file under a folder, or the
paths listed one per line in a text file; it goes to the ``pool`` split.

Manifests are ``NAME_train``, ``NAME_valid``, ``NAME_test``, ``NAME_pool`` (``--name``, default custom).

Clip ids are the file's path without its suffix, relative to a root folder, ``/`` replaced by ``-``: the
class tree (``--src``), the unlabeled folder, or, for the CSV and an unlabeled list, their own folder
when every file lies inside it and otherwise the deepest folder holding all the listed files (so
``/data/set/train/000000.wav`` and ``/data/set/valid/000000.wav`` become ``train-000000`` and
``valid-000000``). Two distinct files never share an id; a file listed twice is an error.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

from common.corpora.base import ClipEntry, PrepareReport, require_file, scan_audio, write_corpus

NAME = "custom"
DESCRIPTION = "your own audio: a CSV (path,label[,split]) or a folder per class, plus unlabeled audio"
NEEDS_SRC = False
SPLIT_DIRS = ("train", "valid", "test")


def add_arguments(parser) -> None:
    parser.add_argument("--csv", type=Path, default=None, help="CSV with columns path,label[,split]")
    parser.add_argument("--unlabeled", type=Path, default=None,
                        help="folder of unlabeled audio, or a text file listing one path per line")
    parser.add_argument("--name", default="custom", help="corpus name, the prefix of the manifests")
    parser.add_argument("--valid-fraction", type=float, default=0.0,
                        help="share of clips without a split that go to valid")
    parser.add_argument("--test-fraction", type=float, default=0.0,
                        help="share of clips without a split that go to test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the valid/test carve-out")


def _audio_files(folder: Path) -> list[Path]:
    return sorted(Path(p) for p in scan_audio(folder).values())


def _id_root(paths: list[Path], home: Path) -> Path:
    """``home`` if every path lies inside it, else the deepest folder holding all of them."""
    home = _absolute(home)
    absolute = [_absolute(p) for p in paths]
    if all(p.is_relative_to(home) for p in absolute):
        return home
    return Path(os.path.commonpath([str(p.parent) for p in absolute]))


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))  # symbolic links are not followed: the listed path names the clip


def _clip_id(path: Path, root: Path) -> str:
    rel = _absolute(path).relative_to(_absolute(root))
    return "-".join(rel.with_suffix("").parts).replace(" ", "_")


def _carve(key: str, valid: float, test: float, seed: int) -> str:
    u = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "valid" if u < valid else "test" if u < valid + test else "train"


def _from_csv(path: Path) -> list[tuple[Path, tuple[str, ...], str | None]]:
    require_file(path, "custom CSV")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if "path" not in fields or "label" not in fields:
            raise ValueError(f"{path}: needs a header with columns 'path' and 'label' (optional 'split'), got {fields}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row["path"]:
                raise ValueError(f"{path}, line {line}: empty path")
            audio = Path(row["path"])
            audio = audio if audio.is_absolute() else path.parent / audio
            labels = tuple(x.strip() for x in (row["label"] or "").split(";") if x.strip())
            rows.append((audio, labels, (row.get("split") or "").strip() or None))
    return rows


def _from_tree(root: Path) -> list[tuple[Path, tuple[str, ...], str | None]]:
    if not root.is_dir():
        raise FileNotFoundError(f"custom audio folder not found: {root}")
    split_roots = [(root / s, s) for s in SPLIT_DIRS if (root / s).is_dir()] or [(root, None)]
    rows = []
    for base, split in split_roots:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            rows.extend((f, (class_dir.name,), split) for f in _audio_files(class_dir))
    if not rows:
        raise ValueError(f"{root}: no audio files in class folders ({root}/<class>/*.wav)")
    return rows


def _unlabeled(spec: Path) -> list[Path]:
    if spec.is_dir():
        return _audio_files(spec)
    require_file(spec, "unlabeled audio folder or list")
    return [Path(line.strip()) if Path(line.strip()).is_absolute() else spec.parent / line.strip()
            for line in spec.read_text().splitlines() if line.strip()]


def prepare(src: Path | None, out: Path, num_jobs: int = 4, csv: Path | None = None, unlabeled: Path | None = None,
            name: str = "custom", valid_fraction: float = 0.0, test_fraction: float = 0.0,
            seed: int = 0) -> PrepareReport:
    """Write manifests for labeled (``src`` tree or ``csv``) and / or unlabeled audio."""
    if src is None and csv is None and unlabeled is None:
        raise ValueError("custom corpus: give --src (folder per class), --csv, and / or --unlabeled")
    if src is not None and csv is not None:
        raise ValueError("custom corpus: give either --src or --csv for the labeled audio, not both")
    if not (0 <= valid_fraction and 0 <= test_fraction and valid_fraction + test_fraction < 1):
        raise ValueError("--valid-fraction and --test-fraction must be >= 0 and sum to less than 1")
    labeled = _from_csv(Path(csv)) if csv is not None else _from_tree(Path(src)) if src is not None else []
    root = _id_root([p for p, _, _ in labeled], Path(csv).parent) if csv is not None else Path(src or ".")
    entries, seen = [], {}

    def add(cut_id: str, path: Path, split: str, labels: tuple[str, ...] = ()) -> None:
        if cut_id in seen:
            same = _absolute(seen[cut_id]) == _absolute(path)
            raise ValueError(f"custom corpus: {path} is listed twice" if same else
                             f"custom corpus: {path} and {seen[cut_id]} would both be clip {cut_id!r}")
        seen[cut_id] = path
        entries.append(ClipEntry(cut_id, path, split, labels))

    for path, labels, split in labeled:
        cut_id = _clip_id(path, root)
        add(cut_id, path, split or _carve(cut_id, valid_fraction, test_fraction, seed), labels)
    if unlabeled is not None:
        pool = _unlabeled(Path(unlabeled))
        pool_root = Path(unlabeled) if Path(unlabeled).is_dir() else _id_root(pool, Path(unlabeled).parent)
        for path in pool:
            add(f"pool-{_clip_id(path, pool_root)}", path, "pool")
    classes = sorted({label for e in entries for label in e.labels})
    return write_corpus(name, entries, out, classes=classes or None, num_jobs=num_jobs)
