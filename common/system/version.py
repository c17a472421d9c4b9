"""Which code runs: the package's version and, where it runs from a git checkout, the commit checked out.

A run records it in its ledger when it starts (``ledger.json``'s ``code``), and a resume under other code records
the change as an intervention (``common.training.interventions.check_code``): a run resumed after an upgrade
trains its second part with the new code (another masking, another schedule), and its results say so.

The commit is read from ``.git`` beside the package (``HEAD``, then the branch's ref file or ``packed-refs``; a
worktree's ``.git`` file is followed), without running git: nothing when the package is installed rather than run
from a checkout. The version number has not changed with the code, so the record holds a digest of the package's
own modules too (``source``: every ``.py`` file of common/, pretrain/ and finetune/), which sees any change of the
code, an installed copy's and edits not committed included.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

__all__ = ["__version__", "code_version", "git_commit", "source_digest", "same_code"]

__version__ = "0.1.0"  # setup.py reads it from here

_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds common/, pretrain/, finetune/
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def git_commit(root: Path) -> str | None:
    """The commit checked out in the git checkout ``root`` (None when it is none, or the commit cannot be read)."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            text = git.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            git = root / text[len("gitdir:"):].strip()
        if not git.is_dir():
            return None
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):  # a detached HEAD
            return head if _COMMIT.fullmatch(head) else None
        ref = head[len("ref:"):].strip()
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").is_file() else git
        for base in (git, common):
            if (base / ref).is_file():
                commit = (base / ref).read_text().strip()
                return commit if _COMMIT.fullmatch(commit) else None
        if (common / "packed-refs").is_file():
            for line in (common / "packed-refs").read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref and _COMMIT.fullmatch(parts[0]):
                    return parts[0]
    except (OSError, UnicodeDecodeError):
        return None
    return None  # a branch with no commit yet


_PACKAGES = ("common", "pretrain", "finetune")  # the modules a run's results depend on (not tests/, bench/)


def source_digest(root: Path = _ROOT) -> str:
    """The first 16 hex digits of the SHA-256 of the package's modules under ``root`` (each ``.py`` file's path
    relative to ``root`` and its bytes, in path order)."""
    digest = hashlib.sha256()
    for path in sorted(p for package in _PACKAGES for p in (root / package).rglob("*.py")
                       if not p.name.startswith(".") and not p.is_symlink()):  # not an editor's lock (.#cli.py)
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        try:
            digest.update(path.read_bytes() + b"\0")
        except OSError as err:  # unreadable: counted as such, never a run stopped by it
            digest.update(f"unreadable: {err.strerror}".encode() + b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """``{"version": the package's, "commit": the checkout's, "source": source_digest()}`` (no ``commit`` outside a
    git checkout); read once per process."""
    commit = git_commit(_ROOT)
    return {"version": __version__, **({"commit": commit} if commit else {}), "source": source_digest()}


def same_code(recorded: dict, current: dict) -> bool:
    """Whether a recorded ``code`` and the current one are the same code: the same version and modules (``source``;
    commits that changed no module, docs or tests, are the same code), or where a record of an earlier version has
    no ``source``, the same commit. Records that share neither (an installed copy of an earlier version recorded its
    version alone, which never changed with the code) do not tell: not the same."""
    for keys in (("version", "source"), ("version", "commit")):
        if all(k in recorded and k in current for k in keys):
            return all(recorded[k] == current[k] for k in keys)
    return False
