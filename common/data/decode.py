"""Reading one clip's audio: only safe sources (a file, bytes in the manifest, a Shar tar: never a shell command or
a URL), resampled to the model's rate, several channels made one (``data.channels``), and anything unusable
raised as :class:`BadClip` with its reason (missing, undecodable, empty, truncated, non-finite).

Lhotse's tolerance for a decoded clip shorter than its manifest says is narrowed at import
(:data:`AUDIO_LENGTH_TOLERANCE`): a truncated file is bad audio, not padded silently.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import soundfile as sf
from lhotse import Recording
from lhotse.audio.utils import set_audio_duration_mismatch_tolerance

from common.data.integrity import HEADER_SIZED, decoder_reason, sample_problem, truncation
from common.data.lhotse_safety import EXTRA_INFO, SAFE_SOURCES, no_shell, refused_in, source_refusal
from common.system.disk import error_chain

__all__ = ["BadClip", "AUDIO_LENGTH_TOLERANCE", "SAFE_SOURCES", "CHANNELS", "narrow_length_tolerance",
           "refused_source", "source_path", "audio_file_problem", "load_clip"]


class BadClip(Exception):
    """A clip that cannot be used; the message is the reason."""


# Lhotse pads a decoded clip that falls short of its manifest's length by up to 0.5 s by default (mirroring its
# end), which hides a clip that lost a fifth of itself or more when it is under 2.5 s; a few compressed-audio
# frames of difference are all this package lets through (a shorter clip is then bad audio, named).
AUDIO_LENGTH_TOLERANCE = 0.1


def narrow_length_tolerance() -> None:
    """Set Lhotse's tolerance (a process-wide setting) to :data:`AUDIO_LENGTH_TOLERANCE`: done when this module is
    imported (the loader's worker processes decode through it) and whenever cuts are opened
    (``common.data.manifests.open_cuts``: Lhotse itself reads their audio in a Shar export)."""
    # Lhotse says so with logging.info on the root logger, which would install logging's default console handler
    # (every line printed twice); its warning is about Lhotse's augmentation transforms, which are not used here
    root, guard = logging.getLogger(), logging.NullHandler()
    root.addHandler(guard)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_audio_duration_mismatch_tolerance(AUDIO_LENGTH_TOLERANCE)
    finally:
        root.removeHandler(guard)


narrow_length_tolerance()

no_shell()  # Lhotse without a shell, a command or URL source (common.data.lhotse_safety)


def refused_source(cut) -> str | None:
    """Why a cut's audio is not read (a ``command`` or ``url`` source, a file source naming a URL: the reason, as
    :class:`BadClip` gives it), or None. It looks at the cut's recording and its tracks' only, to name such a clip
    before anything is read (the checks before a run); a source anywhere else in a cut is refused by Lhotse itself
    when it is read (``common.data.lhotse_safety``)."""
    recordings = [getattr(cut, "recording", None)] + [getattr(getattr(t, "cut", None), "recording", None)
                                                      for t in getattr(cut, "tracks", None) or ()]
    for recording in recordings:
        for source in getattr(recording, "sources", None) or ():
            refused = source_refusal(source.type, source.source)
            if refused:
                return refused
    return None


def _file_source(cut) -> str | None:
    """The audio file a cut reads, or None (in-memory or Shar audio)."""
    try:
        source = cut.recording.sources[0]
    except (AttributeError, IndexError):
        return None
    return str(source.source) if source.type == "file" else None


def source_path(cut) -> str:
    return _file_source(cut) or cut.id


def _unreadable(err: Exception) -> str:
    return f"unreadable ({type(err).__name__}: {decoder_reason(err)[:200]})"


def audio_file_problem(path: str) -> str | None:
    """Why the audio file ``path`` cannot be used now (a reason as :func:`load_clip` gives it), None if it can."""
    if not os.path.exists(path):
        return "missing (no such file)"
    try:
        cut = Recording.from_file(path).to_cut()
    except Exception as err:  # noqa: BLE001 - every decoder failure makes the file unusable
        return truncation(path) or _unreadable(err)
    try:
        load_clip(cut, cut.sampling_rate)
    except BadClip as err:
        return str(err)
    return None


def _rate_changed(source: str | None, cut) -> str | None:
    """Why a file no longer matches its manifest's sampling rate (re-encoded in place), or None. Lhotse would read
    it at the recorded rate: a clip at half the rate would play an octave up, its second half padded."""
    if source is None:
        return None
    try:
        rate = sf.info(source).samplerate
    except Exception:  # noqa: BLE001 - a format libsndfile does not read: left to the decoder
        return None
    recorded = cut.recording.sampling_rate
    for transform in cut.recording.transforms or ():  # a manifest that resamples on load (Lhotse's resample()):
        source_rate = getattr(transform, "source_sampling_rate", None)  # the file's rate is the first one's source
        if source_rate is None and isinstance(transform, dict):
            source_rate = transform.get("kwargs", {}).get("source_sampling_rate")
        if source_rate is not None:
            recorded = int(source_rate)
            break
    if rate != recorded:
        return (f"changed since its manifest was written (the file is {rate} Hz, the manifest says {recorded} Hz): "
                f"prepare the manifest again")
    return None


CHANNELS = ("first", "mean")  # how a multi-channel file becomes the model's one channel (DataConfig.channels)


def _mixed_down(cut) -> np.ndarray:
    """``[1, samples]``: the mean of the channels a cut stands for. A cut of a whole file's first channel (what
    ``prepare`` writes for every file) stands for the file: the mean of all its channels; a cut of several channels
    (a ``MultiCut``) for those; a cut of another single channel (one chosen) for that one; a padded or mixed cut
    (no recording of its own) is read as Lhotse mixes it."""
    recording = getattr(cut, "recording", None)
    chosen = getattr(cut, "channel", None)
    if recording is None or len(recording.channel_ids) < 2:
        return cut.load_audio()
    if isinstance(chosen, (list, tuple)):
        return np.asarray(cut.load_audio()).mean(axis=0, keepdims=True)
    if chosen == recording.channel_ids[0]:
        return recording.load_audio(offset=cut.start, duration=cut.duration).mean(axis=0, keepdims=True)
    return cut.load_audio()


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is, or wraps, a MemoryError: Lhotse's audio backends re-raise every failure as an
    ``AudioLoadingError`` naming the original's type in its text (``<class 'MemoryError'>``), without a cause."""
    return any(isinstance(link, MemoryError) or "<class 'MemoryError'>" in str(link) for link in error_chain(err))


def load_clip(cut, sample_rate: int, channels: str = "first") -> np.ndarray:
    """Decode a cut at ``sample_rate`` (resampling if needed), its first channel or (``channels="mean"``) the mean
    of the channels it stands for (:func:`_mixed_down`); raise :class:`BadClip`.

    The reason names what is wrong: ``missing (no such file)``, ``truncated (...)`` (the file holds less
    than its header claims, see ``common.data.integrity``), ``unreadable (...)`` (also a clip more than
    :data:`AUDIO_LENGTH_TOLERANCE` shorter than its manifest says), ``changed since its manifest was written``
    (another sampling rate), ``empty``, ``non-finite``,
    ``refused (...)`` (a source that would run a command or fetch a URL: :func:`refused_source`).
    """
    refused = refused_source(cut)
    if refused:
        raise BadClip(refused)
    source = _file_source(cut)
    changed = _rate_changed(source, cut)
    if changed:
        raise BadClip(changed)
    try:
        if cut.sampling_rate != sample_rate:
            cut = cut.resample(sample_rate)
        audio = _mixed_down(cut) if channels == "mean" else cut.load_audio()
    except MemoryError:  # the machine's, not the file's: not skipped as bad audio (a resume could skip others)
        raise
    except Exception as err:  # noqa: BLE001 - every decoder failure is a bad clip
        if _out_of_memory(err):  # Lhotse's backends wrap the MemoryError of the array they allocate
            said = [line for line in str(err).split(EXTRA_INFO, 1)[0].splitlines() if "MemoryError" in line]
            raise MemoryError(f"out of memory while decoding {source or cut.id}"
                              + (f": {said[0].strip()[:300]}" if said else "")) from err
        refused = refused_in(err)  # a command or URL source elsewhere in the cut (an RIR, a nested mix)
        if refused:
            raise BadClip(refused) from None
        if source is not None and not os.path.exists(source):
            raise BadClip("missing (no such file)") from None
        problem = truncation(source) if source is not None else None
        if problem:
            raise BadClip(problem) from None
        raise BadClip(_unreadable(err)) from None
    if source is not None and source.lower().endswith(HEADER_SIZED):
        problem = truncation(source)  # a few header bytes: the decoder pads a WAV (or AIFF ...) that lost its end
        if problem:
            raise BadClip(problem)
    audio = np.asarray(audio, dtype=np.float32)
    wave = audio[0] if audio.ndim == 2 else audio.reshape(-1)
    if wave.size == 0:
        raise BadClip("empty (0 samples)")
    expected = int(round(cut.duration * sample_rate))
    if wave.size < 0.9 * expected:
        raise BadClip(f"truncated ({wave.size} of {expected} samples)")
    problem = sample_problem(wave)
    if problem:
        raise BadClip(problem)
    return wave
