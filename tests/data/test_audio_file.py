"""A user's audio file read a window at a time: the same samples as Lhotse's whole-file decode, in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from common.data.audio_file import AudioFile, AudioReadError, load_audio


def _write(path, rate, seconds, channels=1, seed=0, subtype=None):
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)[:, None] + 0.1 * rng.standard_normal((t.size, channels))
    sf.write(path, (tone * np.linspace(0.5, 1, channels)).astype(np.float32), rate, subtype=subtype)
    return path


def _lhotse_whole(path, rate, channels):
    from lhotse import Recording

    rec = Recording.from_file(path)
    if rec.sampling_rate != rate:
        rec = rec.resample(rate)
    audio = rec.load_audio()
    return audio.mean(axis=0) if channels == "mean" else audio[0]


@pytest.mark.parametrize("source_rate,rate,suffix,channels,count", [
    (16000, 16000, "wav", "first", 1),
    (44100, 16000, "flac", "first", 1),
    (48000, 32000, "wav", "mean", 2),
    (22050, 16000, "wav", "first", 2),
    (8000, 16000, "flac", "mean", 3),
])
def test_windows_read_from_blocks_are_the_whole_decode(tmp_path, source_rate, rate, suffix, channels, count):
    """Windows anywhere in a file read through several small blocks (resampled block by block) have the samples
    and the length that Lhotse's decode of the whole file at the model's rate gives."""
    path = _write(tmp_path / f"a.{suffix}", source_rate, 2.37, count)
    whole = _lhotse_whole(path, rate, channels)
    with AudioFile(path, rate, channels, block_seconds=0.3) as audio:
        assert audio.streamed and audio.num_samples == whole.size
        rng = np.random.default_rng(1)
        starts = [0, whole.size - 100, *rng.integers(0, whole.size, 12), 5, 4800 - 7]
        for start in starts:
            length = int(rng.integers(1, 9000))
            got = audio.read(start, length)
            want = whole[start : start + length]
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.allclose(got, want, atol=2e-6), (start, length, np.abs(got - want).max())
    assert np.allclose(load_audio(path, rate, channels), whole, atol=2e-6)


def test_a_long_file_is_read_in_bounded_memory(tmp_path):
    """A 60 s 48 kHz stereo file (23 MB of float32) read at 16 kHz a second at a time never holds the file: the
    peak of what is allocated stays near a block's size."""
    path = _write(tmp_path / "long.wav", 48000, 60.0, 2, subtype="PCM_16")
    tracemalloc.start()
    try:
        with AudioFile(path, 16000, "mean", block_seconds=2.0) as audio:
            total = sum(float(audio.read(start, 16000).sum()) for start in range(0, audio.num_samples, 8000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.isfinite(total)
    assert peak < 3_000_000, f"peak {peak / 1e6:.1f} MB for a file of {60 * 48000 * 2 * 4 / 1e6:.0f} MB as float32"


def test_other_formats_are_decoded_whole(tmp_path):
    path = _write(tmp_path / "a.ogg", 22050, 1.5)
    with AudioFile(path, 16000) as audio:
        assert not audio.streamed
        assert np.array_equal(audio.read(0, audio.num_samples), _lhotse_whole(path, 16000, "first"))


def test_bad_files_name_the_reason(tmp_path):
    with pytest.raises(AudioReadError, match="no such file"):
        AudioFile(tmp_path / "missing.wav", 16000)
    with pytest.raises(AudioReadError, match="is a directory"):
        AudioFile(tmp_path, 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioReadError, match="empty"):
        AudioFile(tmp_path / "empty.wav", 16000)
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(AudioReadError, match="cannot decode"):
        AudioFile(tmp_path / "text.wav", 16000)
    whole = _write(tmp_path / "cut.wav", 16000, 1.0, subtype="PCM_16").read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(AudioReadError, match="truncated"):
        AudioFile(tmp_path / "cut.wav", 16000)


def test_non_finite_samples_are_found_in_the_window_that_holds_them(tmp_path):
    wave = np.zeros(16000 * 4, np.float32)
    wave[16000 * 3 + 5] = np.nan
    sf.write(tmp_path / "nan.wav", wave, 16000, subtype="FLOAT")
    with AudioFile(tmp_path / "nan.wav", 16000, block_seconds=1.0) as audio:
        assert audio.read(0, 16000).size == 16000
        with pytest.raises(AudioReadError, match="non-finite"):
            audio.read(16000 * 3, 16000)
    with pytest.raises(AudioReadError, match="non-finite"):
        load_audio(tmp_path / "nan.wav", 16000)


def test_a_rate_the_resampler_cannot_take_is_this_files_problem(tmp_path, monkeypatch):
    """The resampler failing (a rate whose kernel does not fit in memory) names the file's problem as any unreadable
    file's is, and leaves no file open; under Lhotse's sox resampling, whose stages do not line up with blocks, a
    file to resample is decoded whole."""
    import common.data.audio_file as audio_file

    path = _write(tmp_path / "a.wav", 22050, 1.0)
    opened = []
    real_soundfile = sf.SoundFile

    def tracked(*args, **kwargs):
        opened.append(real_soundfile(*args, **kwargs))
        return opened[-1]

    class Refusing:
        def __init__(self, *args):
            raise RuntimeError("can't allocate memory")

    monkeypatch.setattr(audio_file.sf, "SoundFile", tracked)
    monkeypatch.setattr("lhotse.augmentation.torchaudio.Resample", Refusing)
    with pytest.raises(AudioReadError, match=r"cannot resample it from 22050 Hz to 16000 Hz: can't allocate memory"):
        AudioFile(path, 16000)
    assert opened and all(f.closed for f in opened)
    monkeypatch.undo()

    class Failing:
        resampler = type("Kernel", (), {"width": 8})()

        def __init__(self, *args):
            pass

        def __call__(self, samples):
            raise RuntimeError("no memory")

    monkeypatch.setattr("lhotse.augmentation.torchaudio.Resample", Failing)
    with AudioFile(path, 16000) as audio, pytest.raises(AudioReadError, match="cannot resample it .*: no memory"):
        audio.read(0, 100)
    monkeypatch.undo()
    monkeypatch.setattr("lhotse.audio.resampling_backend.get_current_resampling_backend", lambda: "sox")
    with AudioFile(path, 16000) as resampled, AudioFile(path, 22050) as native:
        assert not resampled.streamed and native.streamed
        assert np.array_equal(resampled.read(0, resampled.num_samples), _lhotse_whole(path, 16000, "first"))
