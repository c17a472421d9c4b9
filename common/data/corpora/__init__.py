"""Corpus preparation: one module per corpus, each turning a downloaded layout into Lhotse manifests.

Every module defines ``NAME``, ``DESCRIPTION`` and ``prepare(src, out, **options) -> PrepareReport``, and
may define ``add_arguments(parser)`` for its own command-line options. See ``common.data.corpora.base`` for
what a prepared corpus looks like on disk, and ``python -m common.data.corpora --help`` for the CLI.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["CORPORA", "get_corpus"]

# name -> module; imported on demand so that the CLI starts fast
CORPORA: dict[str, str] = {
    "audioset": "common.data.corpora.audioset",
    "librispeech": "common.data.corpora.librispeech",
    "vggsound": "common.data.corpora.vggsound",
    "voxceleb": "common.data.corpora.voxceleb",
    "kinetics_sounds": "common.data.corpora.kinetics_sounds",
    "esc50": "common.data.corpora.esc50",
    "speechcommands": "common.data.corpora.speechcommands",
    "synth": "common.data.corpora.synth",
    "custom": "common.data.corpora.custom",
}


def get_corpus(name: str) -> ModuleType:
    """The preparation module of corpus ``name``."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(sorted(CORPORA))}")
    return importlib.import_module(CORPORA[name])
