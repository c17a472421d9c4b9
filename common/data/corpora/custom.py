"""``custom``: your own audio, labeled for fine-tuning and / or unlabeled for pretraining.

Labeled audio comes from either

- a CSV (``--csv FILE``) with a header and the columns ``path,label`` and optionally ``split``; several
  labels of one clip are separated by ``;`` (multi-label); paths are relative to the CSV's folder unless
  absolute; an empty label makes the clip unlabeled (a warning names such rows when every other row has
  one label: a single-label task refuses unlabeled clips); a CSV without rows is refused; or
- a folder per class (``--src DIR``): ``DIR/<class>/**/*.wav`` (or any of ``common.data.audio_file.AUDIO_SUFFIXES``),
  optionally one level of split folders first: ``DIR/train/<class>/...``, ``DIR/valid/<class>/...``, ``DIR/test/...``
  (a tree with both split folders and other folders of audio is refused: a class named ``train``, as ESC-50
  has, goes in a CSV). Hidden files and folders (a leading dot: ``.Trash-0``, macOS's ``._x.wav``) and
  ``__MACOSX`` are skipped, here and in ``--unlabeled`` folders.

A CSV's ``split`` is ``train``, ``valid``, ``test`` or ``foldN`` (cross-validation folds); any other name
(``training``, ``val``, ...) is refused, naming the line and the split it resembles. Clips without a split
go to ``train``, unless ``--valid-fraction`` / ``--test-fraction`` carve valid and
test sets out of them: per class (a multi-label clip by its first label), so that every class with enough clips
is in each carved set, ``round(fraction x clips)`` clips in all, each class keeping a clip in ``train``; which
clips is drawn from the clip ids and ``--seed``. A carved set that misses a class is warned about.

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
import difflib
import logging
import os
import re
from pathlib import Path

from common.data.audio_file import AUDIO_SUFFIXES
from common.data.corpora.base import (
    ClipEntry,
    PrepareReport,
    require_file,
    shuffled_order,
    write_corpus,
)
from common.system.prog import whole_number

NAME = "custom"
DESCRIPTION = "your own audio: a CSV (path,label[,split]) or a folder per class, plus unlabeled audio"
NEEDS_SRC = False
SRC_HELP = ("a folder per class: DIR/<class>/**/*.wav, optionally under DIR/train, DIR/valid, DIR/test (or give "
            "--csv, and / or --unlabeled)")
SPLIT_DIRS = ("train", "valid", "test")
# split names people write for the ones above; a CSV split or a class folder so named is a typo, not a new split
SPLIT_ALIASES = {"training": "train", "trn": "train", "val": "valid", "validation": "valid", "dev": "valid",
                 "development": "valid", "testing": "test", "eval": "test", "evaluation": "test", "tst": "test"}

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--csv", type=Path, default=None, help="CSV with columns path,label[,split]")
    parser.add_argument("--unlabeled", type=Path, default=None,
                        help="folder of unlabeled audio, or a text file listing one path per line")
    parser.add_argument("--name", default="custom", help="corpus name, the prefix of the manifests (default custom)")
    parser.add_argument("--valid-fraction", type=float, default=0.0,
                        help="share of clips without a split that go to valid, carved per class (default 0)")
    parser.add_argument("--test-fraction", type=float, default=0.0,
                        help="share of clips without a split that go to test, carved per class (default 0)")
    parser.add_argument("--seed", type=whole_number(0, ">= 0"), default=0,
                        help="seed of the valid/test carve-out (default 0)")


def _skipped(name: str) -> bool:
    """A hidden file or folder (``.Trash-0``, macOS's ``._x.wav`` resource forks) or an unzipped Mac archive's
    ``__MACOSX``: never audio of the corpus."""
    return name.startswith(".") or name == "__MACOSX"


def _folders(base: Path) -> list[Path]:
    """The folders of ``base`` that may hold the corpus's audio, sorted."""
    return sorted(p for p in base.iterdir() if p.is_dir() and not _skipped(p.name))


def _audio_files(folder: Path) -> list[Path]:
    """Every audio file under ``folder``, sorted (two files of one name in different folders are two clips), but
    what :func:`_skipped` leaves out."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _skipped(d)]
        found += [Path(root) / name for name in files
                  if not _skipped(name) and os.path.splitext(name)[1].lower() in AUDIO_SUFFIXES]
    return sorted(found)


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


def _carve(strata: dict[str, list[str]], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Clip id -> split for the clips without one, carved per class (``strata``: the class, or a multi-label
    clip's first label -> its clip ids; an order drawn from ``seed`` within each): each split of ``fractions`` gets
    ``round(fraction x clips)`` clips in all, every class its share of them rounded down, and the clips left over
    go one at a time to the classes with the largest remainders (round after round while a class has room); a
    class keeps at least one clip in ``train``."""
    order = {s: sorted(ids, key=lambda i: shuffled_order(i, seed)) for s, ids in strata.items()}
    taken = dict.fromkeys(strata, 0)
    split_of = {}
    clips = sum(len(ids) for ids in strata.values())
    for split, fraction in fractions.items():
        share = {s: fraction * len(ids) for s, ids in strata.items()}
        room = {s: len(ids) - 1 - taken[s] for s, ids in strata.items()}
        take = {s: max(0, min(int(share[s]), room[s])) for s in strata}
        left = round(fraction * clips) - sum(take.values())
        while left > 0:
            open_ = sorted((s for s in strata if take[s] < room[s]),
                           key=lambda s: (take[s] - share[s], shuffled_order(f"{split}:{s}", seed)))[:left]
            if not open_:
                break
            for s in open_:
                take[s] += 1
            left -= len(open_)
        for s, n in take.items():
            split_of.update((i, split) for i in order[s][taken[s]:taken[s] + n])
            taken[s] += n
    return split_of


def _train_for_every_label(splits: dict[str, str], labels: dict[str, tuple[str, ...]], carved: dict[str, str],
                           seed: int) -> None:
    """Where a label has no training clip left (a multi-label clip's other labels are not its stratum), one of
    its carved clips goes back to ``train`` (in ``splits``, the clip id -> split of every labelled clip)."""
    in_train = {label for i, split in splits.items() if split == "train" for label in labels[i]}
    for label in sorted({label for ls in labels.values() for label in ls} - in_train):
        back = sorted((i for i in carved if label in labels[i] and splits[i] != "train"),
                      key=lambda i: shuffled_order(i, seed))
        if back:
            splits[back[-1]] = "train"
            in_train.update(labels[back[-1]])


def _split_name(raw: str, where: str) -> str | None:
    """A CSV row's split: ``train``, ``valid``, ``test`` or ``foldN``; None when empty.

    Raises:
        ValueError: any other name, with the split it probably means.
    """
    split = raw.strip()
    if not split:
        return None
    if split in SPLIT_DIRS or re.fullmatch(r"fold\d+", split):
        return split
    guess = SPLIT_ALIASES.get(split.lower()) or next(iter(difflib.get_close_matches(split.lower(), SPLIT_DIRS, 1)),
                                                      None)
    hint = f"; did you mean {guess!r}?" if guess else ""
    raise ValueError(f"{where}: split {split!r} is not one of train, valid, test, foldN (it would become a "
                     f"manifest of its own that no task reads){hint}")


def _from_csv(path: Path) -> list[tuple[Path, tuple[str, ...], str | None]]:
    require_file(path, "custom CSV")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if "path" not in fields or "label" not in fields:
            raise ValueError(f"{path}: needs a header with columns 'path' and 'label' (optional 'split'), got {fields}")
        rows, unlabeled = [], []
        for line, row in enumerate(reader, start=2):
            if not row["path"]:
                raise ValueError(f"{path}, line {line}: empty path")
            audio = Path(row["path"])
            audio = audio if audio.is_absolute() else path.parent / audio
            labels = tuple(x.strip() for x in (row["label"] or "").split(";") if x.strip())
            if not labels:
                unlabeled.append((line, row["path"]))
            rows.append((audio, labels, _split_name(row.get("split") or "", f"{path}, line {line}")))
    if not rows:
        raise ValueError(f"{path}: no rows under its header {','.join(fields)}: nothing to prepare")
    if unlabeled and all(len(labels) == 1 for _, labels, _ in rows if labels) and len(unlabeled) < len(rows):
        line, file = unlabeled[0]
        log.warning("%s: %d of %d rows have no label (line %d: %s): they go to their split as unlabeled clips, while "
                    "every other row has one label. A single-label task refuses unlabeled clips: give them their "
                    "label, or list them with --unlabeled (the pool split, for pretraining)",
                    path, len(unlabeled), len(rows), line, file)
    return rows


def _from_tree(root: Path) -> list[tuple[Path, tuple[str, ...], str | None]]:
    if not root.is_dir():
        raise FileNotFoundError(f"custom audio folder not found: {root}")
    split_roots = [(root / s, s) for s in SPLIT_DIRS if (root / s).is_dir()]
    for folder in _folders(root):  # "validation/<class>/": a split, misnamed
        alias = SPLIT_ALIASES.get(folder.name.lower())
        if alias and (split_roots or any(p.is_dir() for p in folder.iterdir())):
            raise ValueError(f"{folder}: named like a split, but split folders are {', '.join(SPLIT_DIRS)} "
                             f"(rename it {alias!r}); it would be {'ignored' if split_roots else 'a class'}")
    if split_roots:  # a split layout; a class folder beside its split folders would be dropped without a word
        beside = [p.name for p in _folders(root) if p.name not in SPLIT_DIRS and _audio_files(p)]
        if beside:
            splits = ", ".join(s for _, s in split_roots)
            raise ValueError(f"{root}: holds split folders ({splits}) and folders of audio beside them "
                             f"({', '.join(beside)}): a tree is either <split>/<class>/ or <class>/. If {splits} "
                             f"{'is a class' if len(split_roots) == 1 else 'are classes'}, list the clips in a --csv "
                             f"(path,label) instead")
    rows = []
    for base, split in split_roots or [(root, None)]:
        for class_dir in _folders(base):
            rows.extend((f, (class_dir.name,), split) for f in _audio_files(class_dir))
    if not rows:
        raise ValueError(f"{root}: no audio files in class folders ({root}/<class>/*.wav)")
    return rows


def _unlabeled(spec: Path) -> list[Path]:
    if spec.is_dir():
        return _audio_files(spec)
    require_file(spec, "unlabeled audio folder or list")
    return [Path(line.strip()) if Path(line.strip()).is_absolute() else spec.parent / line.strip()
            for line in spec.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


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

    ids = [_clip_id(path, root) for path, _, _ in labeled]
    strata: dict[str, list[str]] = {}
    for cut_id, (_, labels, split) in zip(ids, labeled):
        if split is None:
            strata.setdefault(labels[0] if labels else "", []).append(cut_id)
    fractions = {split: f for split, f in (("valid", valid_fraction), ("test", test_fraction)) if f > 0}
    carved = _carve(strata, fractions, seed)
    splits = {cut_id: split or carved.get(cut_id, "train") for cut_id, (_, _, split) in zip(ids, labeled)}
    of = {cut_id: labels for cut_id, (_, labels, _) in zip(ids, labeled)}
    _train_for_every_label(splits, of, carved, seed)
    for cut_id, (path, labels, _) in zip(ids, labeled):
        add(cut_id, path, splits[cut_id], labels)
    for into in fractions:  # a label that the carved split holds no clip of, whatever gave the clips their split
        held = {label for i, split in splits.items() if split == into for label in of[i]}
        short = sorted({label for ls in of.values() for label in ls} - held)
        if short:
            log.warning("custom corpus: %s holds no clip of %d class(es) (%s%s): too few clips without a split for "
                        "--%s-fraction; give them a split in the CSV or folder tree, or a larger fraction", into,
                        len(short), ", ".join(short[:5]), ", ..." if len(short) > 5 else "", into)
    if unlabeled is not None:
        pool = _unlabeled(Path(unlabeled))
        pool_root = Path(unlabeled) if Path(unlabeled).is_dir() else _id_root(pool, Path(unlabeled).parent)
        for path in pool:
            add(f"pool-{_clip_id(path, pool_root)}", path, "pool")
    classes = sorted({label for e in entries for label in e.labels})
    return write_corpus(name, entries, out, classes=classes or None, num_jobs=num_jobs)
