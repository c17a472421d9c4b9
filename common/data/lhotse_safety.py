"""Lhotse without its shell: no audio backend and no file opener of Lhotse's that runs a command line.

Lhotse's default audio backends include ``sph2pipe`` for any path ending in ``.sph`` (and ``ffmpeg`` for Opus with
``LHOTSE_LEGACY_OPUS_LOADING=1``), run through a shell with the path unquoted: a file or manifest entry named
``x; COMMAND; .sph`` would run COMMAND. Its file opener runs any path that starts with ``pipe:`` as a shell command.
Nothing a user loads may run code, so :func:`no_shell` (called when a module of this package that reads audio or
manifests with Lhotse is imported, the loader's worker processes included) makes Lhotse's current backends its
defaults less those that run a command line through a shell. (Audioread, kept, may start ``ffmpeg`` for a format
nothing else decodes, with the path as one argument of a list: no shell parses it.) NIST SPHERE files are still
read (libsndfile reads them), but not shorten-compressed ones, which need ``sph2pipe``.

Lhotse's ``command`` audio source is run through the shell and its ``url`` one fetched by ``AudioSource.load_audio``,
wherever the source sits in a cut: a recording's own sources, but also a Recording inside a transform's arguments
(``ReverbWithImpulseResponse``'s ``rir``, on a recording or a ``MixedCut``), a track of a ``MixedCut`` nested in
another, a Recording in a cut's ``custom`` fields, or a Shar tar's JSON member. Walking each cut for them would
miss the next place, so :func:`no_shell` also makes Lhotse itself refuse them for the whole process: reading any
source but a file, bytes in the manifest or a Shar tar (:data:`SAFE_SOURCES`), or a file source that names a URL
(``https://...``: a reader that hands the path to FFmpeg's libraries would open it), raises :class:`RefusedAudioSource`,
whose message is the reason bad audio gives (:func:`refused_in` finds it under Lhotse's re-raised errors). Every
module that reads audio or manifests with Lhotse calls it when imported, so a loader's worker process has it too,
forked (it inherits it) or spawned (it imports the module that holds its dataset).
"""

from __future__ import annotations

import functools
import re

from lhotse import serialization
from lhotse.audio import backend as audio_backends
from lhotse.audio.source import AudioSource

from common.system.disk import error_chain

__all__ = ["no_shell", "is_shell_backend", "SAFE_SOURCES", "EXTRA_INFO", "RefusedAudioSource", "refusal",
           "refused_in", "source_refusal", "unsafe_source"]

# Lhotse audio sources this package reads: a file, bytes in the manifest or a Shar tar. Lhotse would also run a
# ``command`` source through the shell and fetch a ``url`` one; nothing a user loads may run code or reach out.
SAFE_SOURCES = ("file", "memory", "shar")

# what Lhotse appends to an error it raises again (``rich_exception_info``): the call and its arguments
EXTRA_INFO = "[extra info]"


class RefusedAudioSource(RuntimeError):
    """Lhotse was asked to read a ``command`` or ``url`` audio source; the message is the reason (:func:`refusal`)."""


def refusal(kind: str) -> str:
    """Why a clip with a Lhotse audio source of type ``kind`` is not read, as bad audio says it."""
    return (f"refused (a Lhotse {kind!r} audio source: this package runs no command and fetches no URL named in a "
            f"manifest; give the audio as files)")


# a URL (``https://``, ``s3://``, ...): a ``file`` source naming one goes, once soundfile finds no such file, to the
# readers Lhotse tries next that hand the path to FFmpeg's libraries (torchcodec's, torchaudio's ffmpeg one, where
# installed), which open URLs
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def source_refusal(kind: str, source) -> str | None:
    """Why an audio source of type ``kind`` reading ``source`` is not read (:func:`refusal`), or None."""
    if kind not in SAFE_SOURCES:
        return refusal(kind)
    if kind == "file" and isinstance(source, str) and _URL.match(source):
        return refusal("file").replace("audio source:", "audio source naming a URL:", 1)
    return None


def refused_in(err: BaseException) -> str | None:
    """The refusal (:func:`refusal`) behind ``err``, or None: Lhotse raises an error again as a new one of its type
    with the call appended, and a transform's error may come as another's cause or context."""
    for link in error_chain(err):
        if isinstance(link, RefusedAudioSource):
            return str(link).split(EXTRA_INFO, 1)[0].strip()
    return None


def unsafe_source(item) -> str | None:
    """Why the first audio source anywhere in ``item`` (a cut's ``to_dict()``: its recording, a transform's
    Recording, a nested mix's tracks) that is refused is (:func:`source_refusal`), or None. For a process whose
    Lhotse may not refuse them itself (a Shar export's worker processes are Lhotse's own, which a start method
    other than fork gives a fresh interpreter that never imported this module)."""
    if isinstance(item, dict):
        if {"type", "channels", "source"} <= item.keys():
            refused = source_refusal(item["type"], item["source"])
            if refused:
                return refused
        item = item.values()
    elif not isinstance(item, (list, tuple)):
        return None
    for value in item:
        found = unsafe_source(value)
        if found:
            return found
    return None


def _refusing(method):
    """``AudioSource.method`` that raises :class:`RefusedAudioSource` for a source not in :data:`SAFE_SOURCES`, or
    a file source that names a URL, before Lhotse runs or fetches anything."""
    @functools.wraps(method)
    def read(self, *args, **kwargs):
        refused = source_refusal(self.type, self.source)
        if refused:
            raise RefusedAudioSource(refused)
        return method(self, *args, **kwargs)
    read.refuses_unsafe_sources = True
    return read


def _refuse_unsafe_sources() -> None:
    """Make every read of a Lhotse audio source (its audio, or a video's) refuse a ``command`` or ``url`` one
    (idempotent). ``_prepare_for_reading`` is where ``load_audio`` runs or fetches them; ``load_video`` hands its
    source to ffmpeg itself."""
    for name in ("_prepare_for_reading", "load_video"):
        method = getattr(AudioSource, name)
        if not getattr(method, "refuses_unsafe_sources", False):
            setattr(AudioSource, name, _refusing(method))


def is_shell_backend(backend) -> bool:
    """Whether a Lhotse audio or IO backend runs a command line through a shell (sph2pipe, Opus's legacy ffmpeg, a
    ``pipe:`` command)."""
    return "Subprocess" in type(backend).__name__ or isinstance(backend, serialization.PipeIOBackend)


def no_shell() -> None:
    """Make Lhotse's current audio and IO backends its defaults without those that run a shell, and its audio
    sources refuse a ``command`` or ``url`` source (idempotent; process-wide settings, the first one read by Lhotse
    before its ``LHOTSE_AUDIO_BACKEND`` / ``LHOTSE_IO_BACKEND``)."""
    _refuse_unsafe_sources()
    audio = audio_backends.get_default_audio_backend()
    audio_backends.set_current_audio_backend(
        audio_backends.CompositeAudioBackend([b for b in audio.backends if not is_shell_backend(b)]))
    io = serialization.get_default_io_backend()
    serialization.set_current_io_backend(
        serialization.CompositeIOBackend([b for b in io.backends if not is_shell_backend(b)]))
