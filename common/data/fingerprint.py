"""Which manifests a run trained on: recorded in ``ledger.json`` when it starts, checked when it resumes.

A resumed run continues its data stream from the saved position (epoch, batches consumed in it). In a
manifest that changed since, that position points at other clips, so the resumed run would quietly differ
from the run it continues: a resume is refused then, unless ``--accept-changed-data`` says to go on (the
change is recorded in the ledger as an intervention). The ledger's record also says which copy of a corpus a
result came from, the first thing to compare when results differ between sites (AST issues #85, #108).

A manifest file is fingerprinted by its SHA-256 and size; a Lhotse Shar folder by the SHA-256 of its cut
shards (``cuts.*``: the manifest part) and the names and sizes of its other shards (the audio).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

__all__ = ["fingerprint", "run_fingerprints", "changes", "DataChanged"]


class DataChanged(ValueError):
    """A resumed run's manifests are not the ones it trained on."""


def _file_sha256(path: Path, into=None):
    digest = into or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def fingerprint(path: str | Path) -> dict:
    """``{"sha256": ..., "bytes": ...}`` of a manifest file or a Shar folder (see the module's text).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(os.path.expandvars(os.path.expanduser(str(path))))  # as the loader reads it
    if path.is_file():
        return {"sha256": _file_sha256(path).hexdigest(), "bytes": path.stat().st_size}
    if path.is_dir():
        digest, size = hashlib.sha256(), 0
        for shard in sorted(p for p in path.rglob("*") if p.is_file()):
            rel, nbytes = shard.relative_to(path).as_posix(), shard.stat().st_size
            digest.update(f"{rel}\0{nbytes}\0".encode())
            if shard.name.startswith("cuts."):
                _file_sha256(shard, digest)
            size += nbytes
        return {"sha256": digest.hexdigest(), "bytes": size}
    raise FileNotFoundError(f"manifest {path} does not exist")


def run_fingerprints(train: Iterable[str], valid: Iterable[str]) -> dict[str, dict[str, dict]]:
    """The fingerprints of a run's training and validation manifests, by role and path."""
    return {"train": {str(p): fingerprint(p) for p in train}, "valid": {str(p): fingerprint(p) for p in valid}}


def changes(old: dict | None, new: dict) -> dict[str, dict]:
    """What differs between two :func:`run_fingerprints` (None: a run recorded before fingerprints, nothing
    to compare): ``{"train: PATH": {"from": sha256 or None, "to": sha256 or None}}``."""
    if not old:
        return {}
    out = {}
    for role in ("train", "valid"):
        before, after = old.get(role, {}), new.get(role, {})
        for path in sorted(set(before) | set(after)):
            a, b = before.get(path, {}).get("sha256"), after.get(path, {}).get("sha256")
            if a != b:
                out[f"{role}: {path}"] = {"from": a, "to": b}
    return out
