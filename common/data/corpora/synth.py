"""``synth``: the built-in corpus, generated deterministically from a seed into real 16 kHz FLAC files.

Twelve sound classes whose differences live both in spectral content (low / high / swept / noisy) and in
temporal structure (steady, slow pulses, fast pulses, alternations, clicks). Pairs such as
``low_pulse_slow`` / ``low_pulse_fast`` differ only in how fast they pulse (3-4 Hz against 11-14 Hz):
at a 40 ms frame shift (Fshift x4) the fast pulses are barely resolved, so time compression matters, yet
most classes stay separable from the coarse input. Durations vary around the task's clip length, so
padding and cropping are exercised. Each clip has its own random pitch, rate, level, onset and
background noise.

Splits written (``--size demo``): ``synth_pool`` (unlabeled, for pretraining), ``synth_train``,
``synth_valid``, ``synth_test`` (labeled). ``--size small`` and ``--size test`` write fewer clips (tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

from common.data.corpora.base import ClipEntry, PrepareReport, killed_writes_age, write_corpus
from common.system.atomic import atomic_path, remove_orphans
from common.system.disk import output_folder
from common.system.prog import whole_number

NAME = "synth"
DESCRIPTION = "built-in generated corpus (12 classes, unlabeled pool + train/valid/test), no download"
NEEDS_SRC = False
SRC_HELP = "not needed: the corpus is generated"
SAMPLE_RATE = 16000

# clips per split (pool: total, unlabeled; the others: per class)
SIZES = {
    "demo": {"pool": 960, "train": 40, "valid": 10, "test": 10},
    "small": {"pool": 192, "train": 12, "valid": 4, "test": 4},
    "test": {"pool": 24, "train": 2, "valid": 1, "test": 1},
}
DURATION = (0.8, 2.0)  # seconds, uniform


def _harmonic(t: np.ndarray, f0: np.ndarray | float, n: int = 5) -> np.ndarray:
    phase = 2 * np.pi * np.cumsum(np.broadcast_to(f0, t.shape)) / SAMPLE_RATE
    return sum(np.sin(k * phase) / k for k in range(1, n + 1))


def _gate(t: np.ndarray, rate: float, duty: float, rng: np.random.Generator) -> np.ndarray:
    phase = (t * rate + rng.random()) % 1.0
    return (phase < duty).astype(np.float64)


def _band_noise(n: int, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spec[(freqs < lo) | (freqs > hi)] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9)


def _sweeps(t: np.ndarray, lo: float, hi: float, period: float, up: bool) -> np.ndarray:
    frac = (t % period) / period
    f = lo * (hi / lo) ** (frac if up else 1 - frac)
    return np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE)


def _low_hum(t, rng):
    return _harmonic(t, rng.uniform(140, 240))


def _low_pulse_slow(t, rng):
    return _harmonic(t, rng.uniform(140, 240)) * _gate(t, rng.uniform(3, 4), 0.5, rng)


def _low_pulse_fast(t, rng):
    return _harmonic(t, rng.uniform(140, 240)) * _gate(t, rng.uniform(11, 14), 0.5, rng)


def _high_whistle(t, rng):
    return np.sin(2 * np.pi * rng.uniform(2000, 3000) * t)


def _high_trill(t, rng):
    return np.sin(2 * np.pi * rng.uniform(2000, 3000) * t) * _gate(t, rng.uniform(11, 14), 0.5, rng)


def _chirp_up(t, rng):
    return _sweeps(t, rng.uniform(250, 400), rng.uniform(2500, 3500), rng.uniform(0.25, 0.45), up=True)


def _chirp_down(t, rng):
    return _sweeps(t, rng.uniform(250, 400), rng.uniform(2500, 3500), rng.uniform(0.25, 0.45), up=False)


def _noise_band(t, rng):
    lo = rng.uniform(900, 1400)
    return _band_noise(t.size, lo, lo * rng.uniform(2.5, 3.5), rng)


def _noise_clicks(t, rng):
    clicks = np.zeros(t.size)
    period = int(SAMPLE_RATE / rng.uniform(7, 10))
    for start in range(int(rng.integers(0, period)), t.size, period):
        width = int(0.006 * SAMPLE_RATE)
        clicks[start : start + width] = rng.standard_normal(min(width, t.size - start)) * np.exp(
            -np.arange(min(width, t.size - start)) / 30)
    return clicks / (np.abs(clicks).max() + 1e-9)


def _vibrato(t, rng):
    f0 = rng.uniform(300, 500)
    return _harmonic(t, f0 * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(5, 7) * t)), n=4)


def _two_tone(t, rng):
    lo, period = rng.uniform(350, 450), rng.uniform(0.1, 0.15)
    f = np.where((t % (2 * period)) < period, lo, 3 * lo)
    return np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE)


def _rain(t, rng):
    x = np.zeros(t.size)
    for start in rng.integers(0, t.size, size=int(rng.uniform(15, 30) * t.size / SAMPLE_RATE)):
        length = int(rng.uniform(0.01, 0.04) * SAMPLE_RATE)
        seg = rng.standard_normal(min(length, t.size - start)) * np.exp(-np.arange(min(length, t.size - start))
                                                                       / (length / 4))
        x[start : start + seg.size] += seg * rng.uniform(0.3, 1.0)
    return x / (np.abs(x).max() + 1e-9)


CLASSES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "low_hum": _low_hum,
    "low_pulse_slow": _low_pulse_slow,
    "low_pulse_fast": _low_pulse_fast,
    "high_whistle": _high_whistle,
    "high_trill": _high_trill,
    "chirp_up": _chirp_up,
    "chirp_down": _chirp_down,
    "noise_band": _noise_band,
    "noise_clicks": _noise_clicks,
    "vibrato": _vibrato,
    "two_tone": _two_tone,
    "rain": _rain,
}


def generate_clip(label: str, rng: np.random.Generator) -> np.ndarray:
    """One clip of class ``label``: random duration, onset, level and background noise; float32."""
    n = int(rng.uniform(*DURATION) * SAMPLE_RATE)
    onset = int(rng.uniform(0, 0.15) * SAMPLE_RATE)
    t = np.arange(n - onset) / SAMPLE_RATE
    sound = CLASSES[label](t, rng)
    sound = sound / (np.abs(sound).max() + 1e-9) * rng.uniform(0.2, 0.6)
    fade = np.minimum(1.0, np.minimum(np.arange(sound.size), np.arange(sound.size)[::-1]) / (0.005 * SAMPLE_RATE))
    x = np.concatenate([np.zeros(onset), sound * fade])
    x += rng.standard_normal(n) * rng.uniform(0.002, 0.01)
    return np.clip(x, -1, 1).astype(np.float32)


def add_arguments(parser) -> None:
    parser.add_argument("--seed", type=whole_number(0, ">= 0"), default=0, help="generation seed (default 0)")
    parser.add_argument("--size", choices=sorted(SIZES), default="demo",
                        help="demo (the default): 960 pool + 40/10/10 clips per class; small: 192 + 12/4/4; "
                             "test: 24 + 2/1/1")


def prepare(src: Path | None, out: Path, num_jobs: int = 4, seed: int = 0, size: str = "demo") -> PrepareReport:
    """Generate the corpus into ``out/synth_audio/`` and write its manifests into ``out``.

    Generation is deterministic: the same seed and size give the same files, sample for sample.
    """
    if size not in SIZES:
        raise ValueError(f"unknown synth size {size!r}; choose one of {sorted(SIZES)}")
    out = output_folder(out)  # a file or a dangling link named before any clip is written
    if (out / "synth_audio").is_dir():  # files of a prepare killed part-way
        remove_orphans(out / "synth_audio", ("*",), older_than=killed_writes_age(out))  # synth_audio/<split>/
    labels = list(CLASSES)
    entries = []
    for split_index, (split, count) in enumerate(SIZES[size].items()):
        items = ([(labels[i % len(labels)], i) for i in range(count)] if split == "pool"
                 else [(label, i) for i in range(count) for label in labels])
        for label, i in items:
            rng = np.random.default_rng([seed, split_index, labels.index(label), i])
            cut_id = f"synth-{split}-{label}-{i:04d}"
            path = out / "synth_audio" / split / f"{cut_id}.flac"
            with atomic_path(path) as tmp:  # a run reading the corpus meanwhile reads the earlier file, whole
                sf.write(str(tmp), generate_clip(label, rng), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
            entries.append(ClipEntry(cut_id, path, split, () if split == "pool" else (label,)))
    return write_corpus(NAME, entries, out, classes=labels, names={c: c.replace("_", " ") for c in labels},
                        num_jobs=num_jobs)
