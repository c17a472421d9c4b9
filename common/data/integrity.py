"""Is an audio file whole? Cheap checks that a file holds as much audio as its header claims.

An interrupted download keeps its header and loses data. Decoders then disagree about what to do:
libsndfile shortens a WAV to the bytes that remain (the clip passes as a shorter one), and reports a
FLAC's full length from its STREAMINFO block until decoding reaches the missing part. Two checks, cheap
enough for a corpus of two million files:

- WAV (RIFF / WAVE, and its RF64 and Wave64 forms) and AIFF: the sound data's declared size against the bytes that
  follow its chunk header in the file (a few header bytes read, nothing decoded; libsndfile shortens these too);
- FLAC: the last 4096 frames are decoded after a seek to the end; a truncated stream fails there.

Other formats (Ogg, MP3, Opus) record no length that a truncation contradicts, and libsndfile refuses a truncated
CAF file itself; they are left to the decoder. Used when a corpus is prepared (``common.data.corpora.base``) and
when a clip is loaded (``common.data.decode.load_clip``).

A file the decoder refuses is named with :func:`decoder_reason`: Lhotse's error in one line (the corpus report,
``bad_audio.tsv`` and the inference commands each put it in their own words around it).

A file that decodes may still hold samples that are no audio: :func:`sample_problem` is the one check of decoded
samples that training's loader (``common.data.decode.load_clip``) and the inference commands' reader
(``common.data.audio_file.AudioFile``) share: non-finite samples, or a peak far above full scale
(:data:`MAX_SAMPLE_PEAK`).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np
import soundfile as sf

__all__ = ["truncation", "wav_data_extent", "data_extent", "decoder_reason", "sample_problem", "HEADER_SIZED",
           "MAX_SAMPLE_PEAK", "FAR_OUTSIDE"]

TAIL_FRAMES = 4096
# the suffixes of the formats whose header declares the size of their sound data (:func:`data_extent`)
HEADER_SIZED = (".wav", ".aiff", ".aif", ".aifc", ".rf64", ".w64")
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # streamed WAVs (and RF64) write placeholders instead of the size
# The largest sample magnitude a decoded clip may hold. Float audio is at full scale within [-1, 1]; mastering, a
# mix or resampling can push its peak a little over (1.5, 4: +3.5 to +12 dB), which trains as it is (its log-mel
# moves by the gain, as a louder recording's does). 100 (+40 dB) is far above such an overshoot and far below what
# a float file holds that is no audio at full scale: integer PCM written as float without scaling (int16's
# +-32767: every log-mel value ~20 too high, what ``common.audio.fbank.check_waveforms`` refuses for arrays; an
# int16-scale file passes only if it peaks below -50 dBFS, near silence) and garbage floats (wrong endianness, an
# uninitialised buffer: values like 1e30, whose power spectrum overflows to NaN features).
MAX_SAMPLE_PEAK = 100.0
FAR_OUTSIDE = "samples far outside [-1, 1]"  # the reason's kind, as bad audio counts it


def wav_data_extent(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(declared data bytes, data bytes present, bytes per frame)`` of a WAV file, or None.

    None when the file is not a RIFF/WAVE file or does not declare its data size (streamed files).
    """
    with open(path, "rb") as handle:
        return _wav_extent(handle)


def _wav_extent(handle) -> tuple[int, int, int] | None:
    """A WAV file's extent, or an RF64 file's: a WAV whose ``ds64`` chunk holds the data size that the 32-bit
    ``data`` header cannot (it writes 0xFFFFFFFF there)."""
    riff = handle.read(12)
    if len(riff) < 12 or riff[:4] not in (b"RIFF", b"RF64") or riff[8:12] != b"WAVE":
        return None
    block_align = ds64 = None
    while True:
        header = handle.read(8)
        if len(header) < 8:
            return None  # no data chunk: not ours to judge (the decoder will fail)
        chunk, size = header[:4], struct.unpack("<I", header[4:])[0]
        if chunk == b"ds64":
            sizes = handle.read(min(size, 16))
            if len(sizes) == 16:
                ds64 = struct.unpack("<Q", sizes[8:16])[0]
            handle.seek(size - len(sizes) + (size & 1), os.SEEK_CUR)
        elif chunk == b"fmt ":
            fmt = handle.read(min(size, 16))
            if len(fmt) >= 14:
                block_align = struct.unpack("<H", fmt[12:14])[0]
            handle.seek(size - len(fmt) + (size & 1), os.SEEK_CUR)
        elif chunk == b"data":
            if size == 0xFFFFFFFF and ds64 is not None:
                size = ds64
            if size in _UNKNOWN_SIZES or not block_align:
                return None
            present = os.fstat(handle.fileno()).st_size - handle.tell()
            return size, present, block_align
        else:
            handle.seek(size + (size & 1), os.SEEK_CUR)


_AIFC_PCM = (b"NONE", b"sowt", b"twos")  # AIFF-C's uncompressed kinds: big- or little-endian PCM


def _aiff_extent(handle) -> tuple[int, int, int] | None:
    """An AIFF / AIFF-C file's ``(declared sound bytes, bytes present, bytes per frame)`` (big-endian chunks: the
    ``COMM`` chunk's frames, channels and sample size against the ``SSND`` chunk's data), or None."""
    form = handle.read(12)
    if len(form) < 12 or form[:4] != b"FORM" or form[8:12] not in (b"AIFF", b"AIFC"):
        return None
    frames = frame = None
    while True:
        header = handle.read(8)
        if len(header) < 8:
            return None
        chunk, size = header[:4], struct.unpack(">I", header[4:])[0]
        if chunk == b"COMM":
            comm = handle.read(min(size, 22))
            if len(comm) < 8:
                return None
            channels, frames, bits = struct.unpack(">hIh", comm[:8])
            if form[8:12] == b"AIFC" and comm[18:22] not in _AIFC_PCM:
                return None  # compressed (GSM, u-law, ...): its sample size says nothing of the bytes
            frame = channels * ((bits + 7) // 8)
            handle.seek(size - len(comm) + (size & 1), os.SEEK_CUR)
        elif chunk == b"SSND":
            offset = handle.read(8)  # offset and block size, then the samples
            if len(offset) < 8 or not frame or frames is None:
                return None
            start = handle.tell() + struct.unpack(">I", offset[:4])[0]
            return frames * frame, os.fstat(handle.fileno()).st_size - start, frame
        else:
            handle.seek(size + (size & 1), os.SEEK_CUR)


_W64_RIFF = bytes.fromhex("726966662e91cf11a5d628db04c10000")  # 'riff' and the rest of Sony Wave64's GUID


def _w64_extent(handle) -> tuple[int, int, int] | None:
    """A Sony Wave64 file's extent: 16-byte GUID chunk ids, 64-bit sizes that count the 24-byte chunk header, each
    chunk padded to 8 bytes."""
    head = handle.read(40)
    if len(head) < 40 or head[:16] != _W64_RIFF or head[24:28] != b"wave":
        return None
    block_align = None
    while True:
        header = handle.read(24)
        if len(header) < 24:
            return None
        chunk, size = header[:4], struct.unpack("<Q", header[16:24])[0] - 24
        if size < 0:
            return None
        if chunk == b"fmt ":
            fmt = handle.read(min(size, 16))
            if len(fmt) >= 14:
                block_align = struct.unpack("<H", fmt[12:14])[0]
            handle.seek(size - len(fmt) + (-size % 8), os.SEEK_CUR)
        elif chunk == b"data":
            if not block_align:
                return None
            return size, os.fstat(handle.fileno()).st_size - handle.tell(), block_align
        else:
            handle.seek(size + (-size % 8), os.SEEK_CUR)


_EXTENTS = {b"RIFF": _wav_extent, b"RF64": _wav_extent, _W64_RIFF[:4]: _w64_extent, b"FORM": _aiff_extent}


def data_extent(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(declared data bytes, data bytes present, bytes per frame)`` of a WAV, RF64, Wave64 or AIFF(-C) PCM file,
    or None (another format, one that does not declare its size, or a header this cannot read: the decoder's to
    judge). The file is opened once and its first bytes say which it is."""
    with open(path, "rb") as handle:
        extent = _EXTENTS.get(handle.read(4))
        if extent is None:
            return None
        handle.seek(0)
        try:
            return extent(handle)
        except (ValueError, OverflowError, struct.error):  # a header whose sizes make no sense
            return None


def _flac_tail(path: str | os.PathLike) -> str | None:
    try:
        audio = sf.SoundFile(str(path))
    except (RuntimeError, sf.LibsndfileError):
        return None  # does not open at all: the decoder says why
    with audio:
        frames = audio.frames
        if frames <= 0:
            return None
        n = min(frames, TAIL_FRAMES)
        try:
            audio.seek(frames - n)
            got = len(audio.read(n, dtype="float32"))
        except (RuntimeError, sf.LibsndfileError) as err:
            return f"truncated or corrupt (header: {frames} samples; decoding the end fails: {str(err)[:120]})"
    if got < n:
        return f"truncated (header: {frames} samples, the stream ends {n - got} samples early)"
    return None


def sample_problem(samples: np.ndarray) -> str | None:
    """Why decoded samples are not audio to use, or None: ``non-finite samples (NaN or inf)``, or ``samples far
    outside [-1, 1] (peak P): ...`` for a peak above :data:`MAX_SAMPLE_PEAK`. One pass over the samples."""
    if samples.size == 0:
        return None
    peak = float(np.max(np.abs(samples)))  # NaN if any sample is NaN, inf if any is infinite
    if not np.isfinite(peak):
        return "non-finite samples (NaN or inf)"
    if peak > MAX_SAMPLE_PEAK:
        return (f"{FAR_OUTSIDE} (peak {peak:.2g}): not float audio at full scale (garbage data, or "
                f"integer PCM written as float?)")
    return None


def truncation(path: str | os.PathLike) -> str | None:
    """Why ``path`` holds less audio than its header claims, or None (whole, or a format not checked). A file of
    0 bytes (a download or copy that never started) is ``empty file (0 bytes)``, whatever its format.

    Args:
        path: an audio file.

    Returns:
        A reason such as ``truncated (header: 160000 samples, file holds 64000)``.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        return None  # not there or not readable: the caller says why
    suffix = Path(path).suffix.lower()
    if suffix == ".flac":
        return _flac_tail(path)
    try:
        extent = data_extent(path)
    except OSError:
        return None  # unreadable: the decoder says why
    if extent is None:
        return None
    declared, present, frame = extent
    if declared - present > frame:  # one missing frame is tolerated (writers that forget the padding)
        return f"truncated (header: {declared // frame} samples, file holds {max(0, present) // frame})"
    return None


# a line of Lhotse's error per backend it tried: "Exception #0 (<class '...Backend'>): <class '...Error'>: message"
_BACKEND_FAILURE = re.compile(r"^Exception #\d+ \(<class '[\w.]*?(\w+)'>\): <class '[\w.]*?(\w+)'>: (.*)$")
# the error when Lhotse tried a single backend: "Reading audio from '...' failed. Details: <class '...'>: message"
_ONE_BACKEND = re.compile(r"^(?:Reading audio|Fetching info about audio) from .* failed\. Details: "
                          r"<class '[\w.]*'>: (.*)$")
# backends that failed because they are not available here, not because of the file
_UNAVAILABLE = ("AttributeError", "ImportError", "ModuleNotFoundError", "NoBackendError")
# libsndfile's message begins with the file it opened, as Python writes the name ("Error opening '/x.wav': "): the
# callers name the file themselves, and a long path would push the reason past where they cut it
# (an in-memory source, a Shar clip's, is named by its object: "Error opening <_io.BytesIO object at 0x...>: ")
_OPENING = re.compile(r"""^Error opening (?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|<[^<>]*>): """)
# what Lhotse appends to an error it passes on: the call and its arguments (a clip's whole manifest entry)
_EXTRA_INFO = "[extra info]"


def decoder_reason(err: BaseException) -> str:
    """Why the decoder could not read a file, in one line ("" when ``err`` says nothing): each backend's own
    message with the backend's name, ``Format not recognised. (LibsndfileBackend)``, several joined by ``; ``
    (Lhotse's first line says only "... failed. Details:"; backends not installed here are left out); a single
    backend's message alone; otherwise the error's lines joined (Lhotse's hint about ``LHOTSE_`` variables left
    out). libsndfile's ``Error opening '<path>': `` before its message is left out: callers name the file, say
    what failed around the reason, and cut it short where it lands in a table."""
    text = str(err).split(_EXTRA_INFO, 1)[0]
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Set LHOTSE_")]
    reasons = []
    for line in lines:
        m = _BACKEND_FAILURE.match(line.strip())
        if m and m.group(3).strip() and m.group(2) not in _UNAVAILABLE:
            reasons.append(f"{_OPENING.sub('', m.group(3).strip())} ({m.group(1)})")
    if reasons:
        return "; ".join(dict.fromkeys(reasons))
    m = _ONE_BACKEND.match(lines[0]) if lines else None
    if m:
        lines[0] = m.group(1)
    return " ".join(_OPENING.sub("", ln) for ln in lines if ln.strip())
