"""The program name a command's usage and errors show: the console script's (``c2f-pretrain``) when it was
launched as one, else the command that runs it from a checkout (``pretrain/run.py``, ``python -m ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["prog"]


def prog(default: str) -> str:
    """``c2f-NAME`` when the process runs that console script, else ``default``."""
    name = Path(sys.argv[0] if sys.argv and sys.argv[0] else "").name
    return name if name.startswith("c2f-") else default
