"""Which code runs: the package's version and, where it runs from a git checkout, the commit checked out.

A run records it in its ledger when it starts (``ledger.json``'s ``code``), and a resume under other code records
the change as an intervention (``common.training.interventions.check_code``): a run resumed after an upgrade
trains its second part with the new code (another masking, another schedule), and its results say so.

The commit is read from ``.git`` beside the package (``HEAD``, then the branch's ref file or ``packed-refs``; a
worktree's ``.git`` file is followed), without running git: nothing when the package is installed rather than run
from a checkout. Edits not committed are not seen.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

__all__ = ["__version__", "code_version", "git_commit"]

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


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """``{"version": the package's, "commit": the checkout's}`` (no ``commit`` outside a git checkout); read once
    per process."""
    commit = git_commit(_ROOT)
    return {"version": __version__, **({"commit": commit} if commit else {})}
