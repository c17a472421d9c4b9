"""Which manifests a run trained on: recorded in ``ledger.json`` when it starts, checked when it resumes.

A resumed run continues its data stream from the saved position (epoch, batches consumed in it). In a
manifest that changed since, that position points at other clips, so the resumed run would quietly differ
from the run it continues: a resume is refused then, unless ``--accept-changed-data`` says to go on (the
change is recorded in the ledger as an intervention). The ledger's record also says which copy of a corpus a
result came from, the first thing to compare when results differ between sites (AST issues #85, #108).

A manifest file is fingerprinted by its SHA-256 and size; a Lhotse Shar folder by the SHA-256 of its cut
shards (``cuts.*``: the manifest part) and the names and sizes of its other shards (the audio). Each also
gets a ``content_sha256``, of the decompressed text of its gzipped parts: a gzip header holds the time it was
written, so the same clips prepared again (or on another machine's disk) give other bytes but the same
content. Two fingerprints are compared by their content where both have one (:func:`key_for`), by their
bytes otherwise (ledgers written before the content was recorded).
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Iterable

from common.data.manifest_lines import CUT_SHORT, manifest_path, truncated_manifest

__all__ = ["fingerprint", "run_fingerprints", "changes", "key_for", "DataChanged"]


class DataChanged(ValueError):
    """A resumed run's manifests are not the ones it trained on."""


def _file_sha256(path: Path, into=None):
    digest = into or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def _content_sha256(path: Path, into=None):
    """The SHA-256 of a file's text, decompressed where it is gzipped."""
    if not path.name.endswith(".gz"):
        return _file_sha256(path, into)
    digest = into or hashlib.sha256()
    with gzip.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


# what a process fingerprinted, by what each file was when it did (a start checks the ranks' manifests against rank
# 0's, then records them in the ledger: one reading of an AudioSet-2M manifest, ~1 GB of text, not two)
_SEEN: dict[tuple, dict] = {}


def _stat_key(path: Path) -> tuple:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), st.st_size, st.st_mtime_ns, st.st_ino) for p in files for st in [p.stat()])


def fingerprint(path: str | Path) -> dict:
    """``{"sha256", "content_sha256", "bytes"}`` of a manifest file or a Shar folder (see the module's text); a file
    this process fingerprinted before, unchanged since (path, size, time, inode), is not read again.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = manifest_path(path)  # as the loader reads it
    key = _stat_key(path) if path.exists() else None
    if key and key in _SEEN:
        return dict(_SEEN[key])
    found = _fingerprint(path)
    if key:
        _SEEN[key] = dict(found)
    return found


def _fingerprint(path: Path) -> dict:
    if path.is_file():
        try:
            content = _content_sha256(path).hexdigest()
        except CUT_SHORT as err:
            raise ValueError(truncated_manifest(path, err)) from None
        return {"sha256": _file_sha256(path).hexdigest(), "content_sha256": content,
                "bytes": path.stat().st_size}
    if path.is_dir():
        digest, content, size = hashlib.sha256(), hashlib.sha256(), 0
        for shard in sorted(p for p in path.rglob("*") if p.is_file()):
            rel, nbytes = shard.relative_to(path).as_posix(), shard.stat().st_size
            digest.update(f"{rel}\0{nbytes}\0".encode())
            if shard.name.startswith("cuts."):
                _file_sha256(shard, digest)
                content.update(f"{rel}\0".encode())
                try:
                    _content_sha256(shard, content)
                except CUT_SHORT as err:  # a shard cut short: named as a cut manifest is
                    raise ValueError(truncated_manifest(shard, err)) from None
            else:  # audio shards: their names and sizes, as in the byte digest
                content.update(f"{rel}\0{nbytes}\0".encode())
            size += nbytes
        return {"sha256": digest.hexdigest(), "content_sha256": content.hexdigest(), "bytes": size}
    raise FileNotFoundError(f"manifest {path} does not exist")


def key_for(*records: dict) -> str:
    """The field that compares fingerprints ``records``: ``content_sha256`` when every one has it, else
    ``sha256``."""
    return "content_sha256" if all("content_sha256" in r for r in records) else "sha256"


def run_fingerprints(train: Iterable[str], valid: Iterable[str]) -> dict[str, dict[str, dict]]:
    """The fingerprints of a run's training and validation manifests, by role and path."""
    return {"train": {str(p): fingerprint(p) for p in train}, "valid": {str(p): fingerprint(p) for p in valid}}


def changes(old: dict | None, new: dict) -> dict[str, dict]:
    """What differs between two :func:`run_fingerprints` (None: a run recorded before fingerprints, nothing
    to compare): ``{"train: PATH": {"from": sha256 or None, "to": sha256 or None}}``. As many manifests of a role as
    before are compared in their order, whatever their paths: the same manifests by other paths (another working
    folder, a moved project, a link) are no change, two swapped are."""
    if not old:
        return {}
    out = {}
    for role in ("train", "valid"):
        before, after = old.get(role, {}), new.get(role, {})
        if len(before) == len(after):  # in order: two manifests swapped are a change (the data position moves)
            pairs = [(new_path, before[old_path], after[new_path]) for old_path, new_path in zip(before, after)]
        else:
            pairs = [(path, before.get(path, {}), after.get(path, {})) for path in sorted(set(before) | set(after))]
        for path, old_fp, new_fp in pairs:
            key = key_for(old_fp, new_fp)
            if old_fp.get(key) != new_fp.get(key):
                out[f"{role}: {path}"] = {"from": old_fp.get("sha256"), "to": new_fp.get("sha256")}
    return out
