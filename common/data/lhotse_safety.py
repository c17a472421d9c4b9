"""Lhotse without its shell: no audio backend and no file opener of Lhotse's that runs a command line.

Lhotse's default audio backends include ``sph2pipe`` for any path ending in ``.sph`` (and ``ffmpeg`` for Opus with
``LHOTSE_LEGACY_OPUS_LOADING=1``), run through a shell with the path unquoted: a file or manifest entry named
``x; COMMAND; .sph`` would run COMMAND. Its file opener runs any path that starts with ``pipe:`` as a shell command.
Nothing a user loads may run code, so :func:`no_shell` (called when a module of this package that reads audio or
manifests with Lhotse is imported, the loader's worker processes included) makes Lhotse's current backends its
defaults less those that run a command line through a shell. (Audioread, kept, may start ``ffmpeg`` for a format
nothing else decodes, with the path as one argument of a list: no shell parses it.) Lhotse's ``command`` and
``url`` audio sources are refused where cuts are read (``common.data.decode.refused_source``). NIST SPHERE files
are still read (libsndfile reads them), but not shorten-compressed ones, which need ``sph2pipe``.
"""

from __future__ import annotations

from lhotse import serialization
from lhotse.audio import backend as audio_backends

__all__ = ["no_shell", "is_shell_backend"]


def is_shell_backend(backend) -> bool:
    """Whether a Lhotse audio or IO backend runs a command line through a shell (sph2pipe, Opus's legacy ffmpeg, a
    ``pipe:`` command)."""
    return "Subprocess" in type(backend).__name__ or isinstance(backend, serialization.PipeIOBackend)


def no_shell() -> None:
    """Make Lhotse's current audio and IO backends its defaults without those that run a shell (idempotent;
    a process-wide setting, which Lhotse reads before its ``LHOTSE_AUDIO_BACKEND`` / ``LHOTSE_IO_BACKEND``)."""
    audio = audio_backends.get_default_audio_backend()
    audio_backends.set_current_audio_backend(
        audio_backends.CompositeAudioBackend([b for b in audio.backends if not is_shell_backend(b)]))
    io = serialization.get_default_io_backend()
    serialization.set_current_io_backend(
        serialization.CompositeIOBackend([b for b in io.backends if not is_shell_backend(b)]))
