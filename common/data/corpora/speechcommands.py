"""Speech Commands v2: 105,829 one-second utterances of 35 words (Warden 2018).

Layout (``speech_commands_v0.02.tar.gz`` extracted, which is SRC)::

    SRC/<word>/<speaker>_nohash_<n>.wav      16 kHz mono, 35 word folders
    SRC/_background_noise_/*.wav             long noise recordings, not clips: left out
    SRC/validation_list.txt                  lines "<word>/<file>.wav", relative to SRC
    SRC/testing_list.txt                     same

Writes ``speechcommands_train`` (every word clip in neither list), ``speechcommands_valid`` and
``speechcommands_test``: the 35-class split of AST / SSAST, not the 12-class test tarball that
``lhotse.recipes.prepare_speechcommands`` uses. Classes are the word folders (plus any word that only the
lists name, whose clips are then reported missing), sorted. Cut ids are ``<word>_<file stem>``.
"""

from __future__ import annotations

from pathlib import Path

from common.data.corpora.base import ClipEntry, PrepareReport, require_file, write_corpus

NAME = "speechcommands"
DESCRIPTION = "Speech Commands v2: <word>/*.wav + validation_list.txt/testing_list.txt, 35 words, train/valid/test"


def _read_list(path: Path) -> list[str]:
    """The ``<word>/<file>.wav`` entries of a split list, in file order."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        rel = line.strip()
        if not rel:
            continue
        if len(Path(rel).parts) != 2:
            raise ValueError(f"{path}:{number}: expected '<word>/<file>.wav', got {line!r}")
        entries.append(Path(rel).as_posix())
    return entries


def _entry(src: Path, rel: str, split: str) -> ClipEntry:
    word, name = rel.split("/")
    stem = Path(name).stem
    return ClipEntry(cut_id=f"{word}_{stem}", path=src / rel, split=split, labels=(word,),
                     custom={"speaker": stem.partition("_nohash_")[0]})


def prepare(src: Path, out: Path, num_jobs: int = 4) -> PrepareReport:
    """Write the Speech Commands v2 train / valid / test manifests and the word list.

    Args:
        src: the extracted ``speech_commands_v0.02`` folder.
        out: where to write.
        num_jobs: threads reading audio headers.
    """
    src = Path(src)
    valid = _read_list(require_file(src / "validation_list.txt", "Speech Commands validation list"))
    test = _read_list(require_file(src / "testing_list.txt", "Speech Commands testing list"))
    both = set(valid) & set(test)
    if both:
        raise ValueError(f"{len(both)} clips are in both validation_list.txt and testing_list.txt, "
                         f"e.g. {sorted(both)[0]}")
    folders = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    classes = sorted({d.name for d in folders} | {rel.split("/")[0] for rel in valid + test})
    if not classes:
        raise FileNotFoundError(f"no word folder (<word>/*.wav) in {src}")
    held_out = set(valid) | set(test)
    train = [f"{d.name}/{f.name}" for d in folders for f in sorted(d.glob("*.wav"))]
    entries = [_entry(src, rel, "train") for rel in train if rel not in held_out]
    entries += [_entry(src, rel, "valid") for rel in valid] + [_entry(src, rel, "test") for rel in test]
    return write_corpus(NAME, entries, out, classes=classes, num_jobs=num_jobs)
