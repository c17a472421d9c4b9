"""One audio file a user hands to an inference command, read a window at a time at the model's sampling rate.

``finetune/predict.py`` and ``finetune/embed.py`` take files of any length: a three-hour 48 kHz stereo
recording decoded whole is about 4 GB of float32 before it is resampled. :class:`AudioFile` opens the file,
checks it (missing, a folder, unreadable, truncated, empty) and then reads only the samples asked for:

- **streamed**: uncompressed and FLAC files (WAV, FLAC, AIFF, W64, RF64, CAF: libsndfile seeks to a sample
  exactly) are read in blocks of :data:`BLOCK_SECONDS` around the window asked for. A file at another sampling
  rate is resampled block by block with Lhotse's resampler, from a block start on the resampler's period with a
  margin of the filter's width on each side, so every sample is the one that resampling the whole file gives
  (up to float rounding);
- **whole**: other formats (MP3, Ogg, Opus, anything only Lhotse's other backends decode), and files to resample
  under Lhotse's ``sox`` resampling backend (whose stages do not line up with blocks), are decoded whole by
  Lhotse, as before.

Both give the samples and the length (``compute_num_samples`` of the file's duration, Lhotse's count) that
``Recording.from_file(path).resample(rate).load_audio()`` gives. ``channels="mean"`` averages the channels before
resampling when streamed (the same up to float rounding: both are linear).

Both commands cut a long file the same way: windows of one clip, a hop apart, the last one ending with the file
(:func:`windows`, :func:`hop_samples`, ``--hop`` as :func:`hop_seconds`), batched by :func:`pad_windows`.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import soundfile as sf

from common.data.integrity import decoder_reason, sample_problem, truncation

if TYPE_CHECKING:
    import torch

__all__ = ["AudioReadError", "AudioFile", "Samples", "load_audio", "folder_audio", "repeat_to", "pad_windows",
           "hop_seconds",
           "hop_samples", "windows", "window_weights", "BLOCK_SECONDS", "STREAMED_FORMATS", "AUDIO_SUFFIXES",
           "audio_suffixes"]

BLOCK_SECONDS = 30.0  # samples read (and resampled) at once around a window of a streamed file
STREAMED_FORMATS = ("WAV", "WAVEX", "FLAC", "AIFF", "W64", "RF64", "CAF")  # libsndfile seeks these exactly
# What counts as an audio file where a folder is scanned: a folder given to predict or embed, and the folders
# corpus preparation scans (common.data.corpora), whose clips are read by Lhotse and soundfile as these files are:
# the streamed formats above, then what is decoded whole. One list, so that what a command finds in a folder is
# what the readers read.
AUDIO_SUFFIXES = (".wav", ".flac", ".aiff", ".aif", ".w64", ".rf64", ".caf", ".ogg", ".mp3", ".opus")


class AudioReadError(ValueError):
    """A file that cannot be read; the message is the reason, without the path."""


def _checked(samples: np.ndarray) -> np.ndarray:
    """``samples``, or :class:`AudioReadError` with training's reason (``common.data.integrity.sample_problem``:
    non-finite, or far outside [-1, 1])."""
    problem = sample_problem(samples)
    if problem:
        raise AudioReadError(problem)
    return samples


class AudioFile:
    """``path`` at ``sample_rate``, its first channel or (``channels="mean"``) the mean of its channels.

    ``num_samples`` is its length at ``sample_rate``; :meth:`read` returns samples ``[start, start + length)``
    (fewer at the end of the file), reading ``block_seconds`` (default :data:`BLOCK_SECONDS`) or the window if
    longer. Use it as a context manager, or :meth:`close` it.

    Raises:
        AudioReadError: with the reason, when opened: ``no such file``, ``is a directory``, ``permission
            denied``, ``truncated (...)`` (less audio than the header claims, ``common.data.integrity``), every
            decoder's message, ``empty``; when read: ``non-finite samples`` or ``samples far outside [-1, 1]``
            (``common.data.integrity.sample_problem``; of a whole file when opened).
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int, channels: str = "first",
                 block_seconds: float | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise AudioReadError("no such file")
        if path.is_dir():
            raise AudioReadError("is a directory, not an audio file")
        if not os.access(path, os.R_OK):
            raise AudioReadError("permission denied")
        problem = truncation(path)
        if problem:
            raise AudioReadError(problem)
        self.path, self.sample_rate, self.channels = path, int(sample_rate), channels
        self._sound: sf.SoundFile | None = None
        self.streamed = False  # True: read a block at a time; False: decoded whole when opened
        self._whole: np.ndarray | None = None
        self._block: tuple[int, np.ndarray] = (0, np.zeros(0, np.float32))  # (first sample, samples) last read
        # lazy: Lhotse imports torch; the commands' parsers use this module (--help answers without loading torch)
        from lhotse.audio.resampling_backend import get_current_resampling_backend

        try:
            sound = sf.SoundFile(path)
        except Exception:  # noqa: BLE001 - not a libsndfile format: Lhotse's other backends decode it
            sound = None
        if sound is not None and sound.format in STREAMED_FORMATS and sound.seekable() and (
                sound.samplerate == self.sample_rate or get_current_resampling_backend() != "sox"):
            try:
                self._open_streamed(sound, BLOCK_SECONDS if block_seconds is None else block_seconds)
            except Exception as err:  # noqa: BLE001 - a rate the resampler cannot take: this file, not the run
                sound.close()
                raise AudioReadError(f"cannot resample it from {sound.samplerate} Hz to {self.sample_rate} Hz: "
                                     f"{err}") from None
        else:  # not streamed (sox resamples in stages that do not line up with blocks: the whole file at once)
            if sound is not None:
                sound.close()
            self._whole = _checked(self._decode_whole())
            self.num_samples = self._whole.size
        if self.num_samples == 0:
            self.close()
            raise AudioReadError("empty audio (0 samples)")

    def _open_streamed(self, sound: sf.SoundFile, block_seconds: float) -> None:
        # lazy: Lhotse imports torch (the commands' --help does not load it)
        from lhotse.augmentation.torchaudio import Resample
        from lhotse.utils import compute_num_samples

        self._sound, self._frames, self._rate, self.streamed = sound, sound.frames, sound.samplerate, True
        self.num_samples = compute_num_samples(self._frames / self._rate, self.sample_rate)
        self._resampler = None
        self._period_in = self._period_out = 1  # input and output samples of one resampling period
        self._margin = 0  # periods read on each side of a block so that its samples are the whole file's
        if self._rate != self.sample_rate:
            self._resampler = Resample(self._rate, self.sample_rate)
            gcd = math.gcd(self._rate, self.sample_rate)
            self._period_in, self._period_out = self._rate // gcd, self.sample_rate // gcd
            kernel = self._resampler.resampler
            self._margin = -(-(kernel.width + self._period_in) // self._period_in) + 1
        self._block_samples = max(1, int(block_seconds * self.sample_rate))

    def _decode_whole(self) -> np.ndarray:
        from lhotse import Recording  # lazy: Lhotse imports torch (the commands' --help does not load it)

        try:
            rec = Recording.from_file(self.path)
            if rec.sampling_rate != self.sample_rate:
                rec = rec.resample(self.sample_rate)
            audio = rec.load_audio()
        except Exception as err:  # noqa: BLE001 - any decoder failure
            raise AudioReadError(f"cannot decode it: {decoder_reason(err) or type(err).__name__}") from None
        return np.asarray(audio.mean(axis=0) if self.channels == "mean" else audio[0], dtype=np.float32)

    def read(self, start: int, length: int) -> np.ndarray:
        """Samples ``[start, start + length)`` at ``sample_rate`` (float32; fewer at the end of the file)."""
        start, end = max(0, int(start)), min(self.num_samples, int(start) + int(length))
        if end <= start:
            return np.zeros(0, np.float32)
        if self._whole is not None:
            return self._whole[start:end]
        first, block = self._block
        if not (first <= start and end <= first + block.size):
            first = start - start % self._period_out
            block = self._read_block(first, max(end, first + self._block_samples))
            self._block = (first, block)
        return block[start - first : end - first]

    def _read_block(self, first: int, end: int) -> np.ndarray:
        """Samples ``[first, end)`` at ``sample_rate`` (``first`` on a resampling period); reads the file."""
        end = min(end, self.num_samples)
        if self._resampler is None:
            return self._read_frames(first, end)
        period = first // self._period_out
        lead = min(period, self._margin)  # periods read before the block (none at the file's start)
        begin = (period - lead) * self._period_in
        stop = min(self._frames, (-(-end // self._period_out) + self._margin) * self._period_in)
        frames = self._read_frames(begin, stop)[None]
        try:
            resampled = self._resampler(frames)[0]
        except Exception as err:  # noqa: BLE001 - e.g. no memory for the kernel: this file, not the run
            raise AudioReadError(f"cannot resample it from {self._rate} Hz to {self.sample_rate} Hz: {err}") from None
        samples = resampled[lead * self._period_out :][: end - first]
        if samples.size < end - first:  # Lhotse's count rounds the whole file's length, at most a sample over
            samples = np.pad(samples, (0, end - first - samples.size), mode="reflect")
        return np.ascontiguousarray(samples, dtype=np.float32)

    def _read_frames(self, begin: int, stop: int) -> np.ndarray:
        """The file's own samples ``[begin, stop)``, one channel (the first or the mean)."""
        assert self._sound is not None
        try:
            self._sound.seek(begin)
            frames = self._sound.read(stop - begin, dtype="float32", always_2d=True)
        except Exception as err:  # noqa: BLE001 - a decoder failure mid-file
            raise AudioReadError(f"cannot decode it at {begin / self._rate:.2f} s: {err}") from None
        if len(frames) < stop - begin:
            raise AudioReadError(f"cannot decode it: {stop - begin - len(frames)} samples missing from "
                                 f"{begin / self._rate:.2f} s")
        wave = frames.mean(axis=1) if self.channels == "mean" else frames[:, 0]
        return _checked(np.ascontiguousarray(wave, dtype=np.float32))

    def close(self) -> None:
        if self._sound is not None:
            self._sound.close()
            self._sound = None
        self._block = (0, np.zeros(0, np.float32))

    def __enter__(self) -> "AudioFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Samples:
    """Samples already in memory, read as an :class:`AudioFile` is (``num_samples``, :meth:`read`, :meth:`close`)."""

    streamed = False

    def __init__(self, samples: np.ndarray, sample_rate: int) -> None:
        self.samples, self.sample_rate, self.num_samples = samples, int(sample_rate), samples.size

    def read(self, start: int, length: int) -> np.ndarray:
        start = max(0, int(start))
        return self.samples[start : start + max(0, int(length))]

    def close(self) -> None:
        pass

    def __enter__(self) -> "Samples":
        return self

    def __exit__(self, *exc) -> None:
        pass


def load_audio(path: str | os.PathLike, sample_rate: int, channels: str = "first") -> np.ndarray:
    """The whole of ``path`` at ``sample_rate`` (see :class:`AudioFile`; raises :class:`AudioReadError`)."""
    with AudioFile(path, sample_rate, channels) as audio:
        return audio.read(0, audio.num_samples)


def audio_suffixes() -> str:
    """:data:`AUDIO_SUFFIXES` as messages and help name them: ``.wav, .flac, ...``."""
    return ", ".join(AUDIO_SUFFIXES)


def folder_audio(folder: str | os.PathLike) -> list[Path]:
    """What a folder given to ``predict.py`` or ``embed.py`` stands for: its audio files (:data:`AUDIO_SUFFIXES`)
    at any depth, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def repeat_to(wave, clip: int):
    """A clip shorter than ``clip`` samples repeated and cut to ``clip`` (``data.pad: repeat``: in training, in
    ``predict`` and in embeddings alike): ``wave`` a 1-D numpy array or tensor, returned as the same kind (a tensor
    on its device); an empty or long enough one is returned as it is."""
    size = wave.shape[-1]
    return wave[np.arange(clip) % size] if 0 < size < clip else wave


def pad_windows(pieces: Sequence[np.ndarray], clip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows read from files as one batch for a model, as ``predict.py`` and ``embed.py`` give it: ``[N, clip]``
    float32, each window's samples first and zeros after (a window shorter than the clip is zero-padded as in
    training), and ``[N]`` each window's length in samples."""
    import torch  # lazy: the commands' --help does not load torch

    batch = torch.zeros(len(pieces), clip)
    lengths = torch.zeros(len(pieces), dtype=torch.long)
    for i, piece in enumerate(pieces):
        batch[i, : piece.size] = torch.from_numpy(piece)
        lengths[i] = piece.size
    return batch, lengths


def hop_seconds(text: str) -> float:
    """``--hop``: seconds between windows, a finite number above 0 (infinity or NaN would make no sample count)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds between windows, a number above 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"seconds between windows, a finite number above 0, got {text!r}")
    return value


def hop_samples(seconds: float | None, rate: int, default: int) -> int:
    """Samples between windows: ``seconds`` (a finite number above 0) at ``rate`` Hz, ``default`` for None."""
    if seconds is None:
        return default
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--hop must be a finite number of seconds above 0, got {seconds}")
    return max(1, int(round(seconds * rate)))


def windows(num_samples: int, clip: int, hop: int) -> list[int]:
    """Start offsets of the windows covering ``num_samples`` samples (one window if it fits)."""
    if num_samples <= clip:
        return [0]
    starts = list(range(0, num_samples - clip + 1, hop))
    if starts[-1] != num_samples - clip:
        starts.append(num_samples - clip)
    return starts


def window_weights(starts: list[int], hop: int, clip: int) -> np.ndarray:
    """Each window's weight in a ``mean``: 1, but the last window where :func:`windows` placed it closer than a hop
    to the one before (to end with the file): the new audio it covers, as a share of what a hop's window covers
    (``min(hop, clip)``: windows more than a clip apart leave gaps)."""
    weights = np.ones(len(starts))
    if len(starts) > 1 and starts[-1] - starts[-2] < hop:
        weights[-1] = min(starts[-1] - starts[-2], clip) / min(hop, clip)
    return weights
