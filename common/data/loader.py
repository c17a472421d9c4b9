"""Waveform batches from Lhotse manifests: sampling, decoding, cropping, bad-audio handling, exact resume.

    manifests --(weighted mux)--> CutSet --sampler (seeded shuffle)--> global batches
      --equal_shards--> this rank's cut batches
      --DataLoader workers: decode, resample to the model's rate, crop / pad--> Batch(waveforms [B, S], lengths,
      targets)

Shuffling. AST and SSAST shuffle the whole training set every epoch; so does this loader. A set of at most
``data.full_shuffle_max`` clips (counted from the manifests' lines, without parsing them) that is one manifest
or an equal-weight mix is read into memory (an eager CutSet: Lhotse's ``SimpleCutSampler`` permutes it with
``seed + epoch``): every task set of the paper (VGGSound, VoxCeleb, Kinetics-Sounds, SpeechCommands,
AudioSet-20K, ESC-50) fits. A larger one (AudioSet-2M; SSAST's AudioSet-2M + LibriSpeech, concatenated as the
official code does) is indexed on disk and permuted with ``(seed, epoch)`` (``common.data.manifest_index``,
``data.shuffle: full``). Lhotse Shar folders (alone: one part per rank, ``common.data.shar_stream``), mixes with
unequal weights and ``data.shuffle: buffer`` stream through Lhotse's shuffle buffer (``DynamicCutSampler``,
``data.shuffle_buffer`` clips), which mixes within the buffer only because every corpus is written in a seeded
shuffled order (``common.data.corpora.base.write_corpus``; source order is often sorted by class), and keeps a
clip near the same place in every epoch.

Equal shards. Every rank gets the same number of batches in every epoch, whatever the sampler (in-memory
shuffle, streaming buffer, balanced, Shar), so that all ranks enter the same collectives: one global
stream of batches is dealt in rounds of ``world_size`` (:func:`equal_shards`; Shar folders alone are dealt in
equal parts of clips instead, each rank reading only its own); training drops an incomplete last round,
evaluation splits its clips over the ranks and gives a rank left without one an empty batch, never a
duplicate, so every clip is scored exactly once. ``ClipLoader`` checks the count at every epoch end.

Features are made later, on the training device (``common.audio.pipeline``), so one loader serves every
compression method.

Resume. The loader's position is ``(epoch, batches consumed in that epoch)``, counted as batches reach
the training loop, not as the sampler hands them to prefetching workers (whose state runs ahead: with
2 workers prefetching 2 batches each, a sampler state taken after 10 trained batches records 14).
Restoring makes a fresh sampler, sets the epoch and skips the consumed batches (metadata only, no audio),
so the next batch is exactly the one an uninterrupted run would see.
Random crops are drawn from ``(seed, epoch, cut id)``, so they are the same after a resume as well.
The order of an epoch's clips depends on neither the number of ranks nor the batch size, so a position
converted to clips of the epoch (:func:`reshard_index`) continues the same epoch on another number of ranks
(Shar folders alone: close to it, as ``common.data.shar_stream`` says).

Bad audio. A clip whose file is missing, cannot be decoded, is empty or truncated, or holds
non-finite samples is left out of its batch, and named with its reason in ``Batch.bad``;
:class:`BadAudioTracker` counts them per split (training and validation), lists each once in the run's
``bad_audio.tsv``, and stops the run with :class:`TooMuchBadAudio` past a configurable fraction or when
no clip of a split can be used; on several ranks it judges the counts of all ranks together, at points
every rank reaches together (epoch and pass ends; the trainer's log windows, checkpoints, validations).
Nothing is replaced with silence.

Resampling up. A clip recorded below the model's rate (16 kHz VGGSound clips into HTS-AT's 32 kHz front end)
holds nothing above its own Nyquist frequency, so the model's upper mel bins stay empty for it. Such clips
are counted per batch (``Batch.upsampled``, in the loader workers); the tracker says so once per run, with
the rates, and keeps the counts, which the trainer adds up over ranks into ``ledger.json`` (``upsampled``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
import soundfile as sf
import torch
from lhotse import CutSet, Recording
from lhotse.audio.utils import set_audio_duration_mismatch_tolerance
from lhotse.dataset import DynamicCutSampler, SimpleCutSampler
from torch.utils.data import DataLoader

from common.data.cache import CacheMode, ClipCache, make_cache
from common.data.corpora.base import AUDIO_SUFFIXES
from common.data.integrity import truncation
from common.data.manifest_index import (
    DEFAULT_INDEX_DIR,
    IndexShuffleSampler,
    ManifestIndex,
    count_lines,
    manifest_path,
    open_lines,
)
from common.data.prefetch import background
from common.data.shar_stream import RankShardSampler, SharSet, folder_shards, is_shar_folder, reads_per_rank
from common.data.workers import end_with, end_workers, start_worker, start_workers
from common.system.atomic import atomic_write_text
from common.system.cpu import available_memory, loader_workers, local_ranks, total_memory

__all__ = [
    "ManifestSpec",
    "DataConfig",
    "Batch",
    "BadAudioTracker",
    "TooMuchBadAudio",
    "open_cuts",
    "count_clips",
    "epoch_clips",
    "balanced_weights",
    "LabelEncoder",
    "ClipDataset",
    "ClipLoader",
    "equal_shards",
    "shard_batches",
    "reshard_index",
    "load_clip",
    "train_loader",
    "eval_loader",
    "make_cache",
]

log = logging.getLogger(__name__)

CROPS = ("random", "start", "center")


class TooMuchBadAudio(RuntimeError):
    """More than the allowed fraction of clips could not be used."""


class BadClip(Exception):
    """A clip that cannot be used; the message is the reason."""


@dataclass(frozen=True)
class ManifestSpec:
    """One manifest of a (possibly weighted) mix.

    Args:
        path: a ``*.jsonl.gz`` CutSet or a Lhotse Shar folder.
        weight: relative weight in a streamed mix (``CutSet.mux``): at each draw a manifest is picked with
            probability proportional to its weight among those not yet used up, and every clip still comes
            once per epoch. So the weights shape the interleaving, not the epoch's content: equal weights on
            manifests of unequal sizes use up the small one early in each epoch when streamed. Manifests of
            equal weights are concatenated and shuffled as a whole (in memory or through an index), which
            interleaves them evenly (SSAST's AudioSet + LibriSpeech, as the official code).
    """

    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"manifest weight must be positive, got {self.weight} for {self.path}")


@dataclass(frozen=True)
class DataConfig:
    """Where the clips come from and how they are batched.

    Args:
        train: training manifests; several are mixed by their weights (AudioSet + LibriSpeech in SSAST).
        valid: validation manifests (empty: no validation).
        batch_size: the global batch: clips per optimiser step over every rank and accumulated micro-batch
            (the number the paper's sources state); each launch splits it (``common.training.batch``).
        max_batch_per_rank: the most clips one rank takes in one forward / backward pass (None: no cap);
            gradient accumulation grows until the per-rank micro-batch fits (``common.training.batch``).
        eval_batch_size: clips per rank per validation batch (default: the phase's training micro-batch
            per rank, which keeps a partial validation round's clip count on any launch).
        num_workers: decoding processes per rank; a rank starts at most its cores minus one (``common.system.cpu``).
        max_bad_fraction: stop the run when more than this share of clips is unusable.
        balanced: AST's balanced sampling (weights 1000 / (label count + 0.01)); a fine-tuning run's is its task's
            (``task.balanced``).
        eval_crop: where validation clips longer than the clip length are cut: ``start`` (AST) or ``center``.
        train_crop: where training clips longer than the clip length are cut: ``start`` (AST and SSAST
            always cut from the start) or ``random`` (a random window per clip and epoch).
        full_shuffle_max: a training set of at most this many clips is read into memory and shuffled as
            a whole every epoch (AST / SSAST); a larger one is shuffled as a whole through an index of its
            manifests on disk (``shuffle: full``, ``common.data.manifest_index``) or streamed through
            Lhotse's 20k-clip shuffle buffer (``shuffle: buffer``). 0: never in memory.
        shuffle: how a training set larger than ``full_shuffle_max`` is shuffled: ``full`` (the whole set
            every epoch, as AST and SSAST; ``.jsonl(.gz)`` manifests of equal weights) or ``buffer`` (streamed;
            also Shar folders and mixes of unequal weights, which are always streamed).
        shuffle_buffer: clips a streamed training set's shuffle buffer holds (Lhotse's default, 20,000); a clip
            of a Shar folder holds its audio there (AudioSet's 10 s FLAC clips: 3 to 5 GB per rank at 20,000),
            whose shards are put in a new order every epoch as well (``common.data.shar_stream``).
        index_dir: the folder of the ``full`` shuffle's manifest index (default
            ``~/.cache/coarse2fine/manifests``; about the manifests' uncompressed size).
        pad: how a clip shorter than the clip length is filled: ``zeros`` (AST / SSAST) or ``repeat`` (the
            clip again, as HTS-AT's ESC-50 preparation concatenates each 5 s clip twice to 10 s).
        channels: how a multi-channel file becomes one: ``first`` (AST's and SSAST's ``kaldi.fbank`` reads the
            first channel), ``mean`` (HTS-AT's ``librosa.load(mono=True)`` mixes them down) or ``auto``: the
            official code's of the run's architecture (``Architecture.channels``).
        cache: keep decoded clips (``none``, ``memory`` or ``disk``; ``common.data.cache`` says when each fits).
        cache_dir: the folder of a ``disk`` cache (default ``~/.cache/coarse2fine/clips``).
    """

    train: list[ManifestSpec] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    batch_size: int = 24
    max_batch_per_rank: int | None = None
    eval_batch_size: int | None = None
    num_workers: int = 4
    max_bad_fraction: float = 0.02
    balanced: bool = False
    eval_crop: Literal["start", "center"] = "start"
    train_crop: Literal["start", "random"] = "start"
    full_shuffle_max: int = 500_000
    shuffle: Literal["full", "buffer"] = "full"
    shuffle_buffer: int = 20_000
    index_dir: str | None = None
    pad: Literal["zeros", "repeat"] = "zeros"
    channels: Literal["auto", "first", "mean"] = "auto"
    cache: CacheMode = "none"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.full_shuffle_max < 0:
            raise ValueError(f"full_shuffle_max must be >= 0, got {self.full_shuffle_max}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.max_batch_per_rank is not None and self.max_batch_per_rank < 1:
            raise ValueError(f"max_batch_per_rank must be >= 1, got {self.max_batch_per_rank}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.cache == "memory" and self.num_workers > 0:
            raise ValueError("cache: 'memory' keeps clips in the training process and needs num_workers: 0; "
                             "use cache: disk with loader workers")

    def channels_for(self, arch) -> str:
        """``channels`` for a run of architecture ``arch`` (``auto``: its ``channels``, its official code's)."""
        return arch.channels if self.channels == "auto" else self.channels


def _open_one(path: str | os.PathLike):
    path = manifest_path(path)
    if path.is_dir():
        folder_shards(path)  # its shards pair up, or an error that names the folder
        return CutSet.from_shar(in_dir=path)
    if not path.is_file():
        raise FileNotFoundError(
            f"manifest {path} does not exist; write it with `python -m common.data.corpora prepare NAME --src DIR "
            f"--out {path.parent}` (see `python -m common.data.corpora list`)"
        )
    problem = manifest_problem(path)
    if problem:
        raise ValueError(f"manifest {path}: {problem}")
    cuts = CutSet.from_file(path)  # lazy for .jsonl.gz
    if cuts is None:  # what Lhotse returns for an empty file
        raise ValueError(f"manifest {path} holds no clips (an empty file); prepare it again")
    return cuts


def manifest_problem(path: str | os.PathLike) -> str | None:
    """Why a file is not a Lhotse manifest: a name no Lhotse manifest has, or for a ``.jsonl(.gz)`` its first line
    (None: it may be one; an empty file is left to the callers, which say that it holds no clips)."""
    path = manifest_path(path)
    if not any(ext in path.name for ext in (".jsonl", ".json", ".yaml", ".yml")):  # what Lhotse reads
        audio = path.suffix.lower() in AUDIO_SUFFIXES
        return ("is not a Lhotse manifest (a .jsonl.gz of cuts, as `python -m common.data.corpora prepare` writes "
                "it)" + ("; to score audio files use predict.py" if audio else ""))
    if not path.name.endswith((".jsonl", ".gz")):
        return None
    number, line = 0, b""
    try:
        with open_lines(path) as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    break
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        return f"cannot be read as {'gzip' if path.name.endswith('.gz') else 'text'} ({err})"
    if not line.strip():
        return None
    try:
        cut = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return (f"line {number} is not JSON ({line.strip()[:40]!r}); a Lhotse manifest holds one JSON cut per line, "
                f"as `python -m common.data.corpora prepare` writes it")
    if not isinstance(cut, dict) or "id" not in cut:
        return f"line {number} is JSON but not a Lhotse cut (no 'id' field)"
    return None


def count_clips(path: str | os.PathLike, limit: int | None = None) -> int | None:
    """Clips in a ``.jsonl(.gz)`` manifest, counted from its lines without parsing them.

    Returns None for what cannot be counted this way (a Shar folder, another format), and ``limit + 1``
    as soon as the count exceeds ``limit``.
    """
    path = manifest_path(path)
    if not path.is_file() or not path.name.endswith((".jsonl", ".jsonl.gz")):
        return None
    return count_lines(path, limit)


def epoch_clips(path: str | os.PathLike) -> int | None:
    """Clips in a ``.jsonl(.gz)`` manifest or a Lhotse Shar folder (its ``cuts.*`` shards' lines), counted without
    parsing them; None for what cannot be counted so."""
    path = manifest_path(path)
    if path.is_dir():
        counts = [count_clips(shard) for shard in sorted(path.glob("cuts.*.jsonl*"))]
        return None if not counts or None in counts else sum(counts)
    return count_clips(path)


def open_cuts(specs: Sequence[ManifestSpec | str], seed: int = 0, in_memory_max: int | None = None,
              index_dir: str | None = None):
    """A CutSet over one manifest, or a weighted mix of several (``CutSet.mux``); or the manifests indexed on
    disk for a whole-set shuffle (:class:`~common.data.manifest_index.ManifestIndex`, ``index_dir`` given).

    Args:
        specs: manifests (paths or :class:`ManifestSpec`).
        seed: seed of the mix.
        in_memory_max: read the clips into memory (an eager CutSet, which :class:`ClipLoader` shuffles as
            a whole every epoch) when there are at most this many, the manifests are ``.jsonl(.gz)``
            files and their weights are equal (a mix with unequal weights stays a weighted stream).
            None: always lazy.
    """
    specs = [s if isinstance(s, ManifestSpec) else ManifestSpec(str(s)) for s in specs]
    if not specs:
        raise ValueError("no manifests given")
    sets = [_open_one(s.path) for s in specs]
    if in_memory_max and len({s.weight for s in specs}) == 1:
        total = 0
        for spec in specs:
            count = count_clips(spec.path, in_memory_max - total)
            total = in_memory_max + 1 if count is None else total + count
            if total > in_memory_max:
                break
        if total <= in_memory_max:
            cuts = [cut for one in sets for cut in one]
            log.info("read %d clips into memory: every epoch is a shuffle of the whole set", len(cuts))
            return CutSet.from_cuts(cuts)
    if index_dir is not None and len({s.weight for s in specs}) == 1 and \
            all(count_clips(s.path, 0) is not None for s in specs):  # .jsonl(.gz) files of equal weights
        index = ManifestIndex([manifest_path(s.path) for s in specs], index_dir)
        log.info("%d clips indexed on disk (%s): every epoch is a shuffle of the whole set", len(index), index_dir)
        return index
    if in_memory_max is not None:
        shar = [s.path for s in specs if count_clips(s.path, 0) is None]
        log.info("training set %s: streamed through Lhotse's shuffle buffer",
                 "a mix of manifests with unequal weights" if len({s.weight for s in specs}) > 1 else
                 f"{shar[0]}, a Lhotse Shar folder (neither counted nor indexed)" if shar else
                 f"larger than data.full_shuffle_max={in_memory_max} clips (data.shuffle: buffer)")
    if len(sets) == 1:
        return sets[0]
    return CutSet.mux(*sets, weights=[s.weight for s in specs], seed=seed)


class LabelEncoder:
    """Class ids -> multi-hot target vectors, in the order of the class list."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.index = {c: i for i, c in enumerate(self.classes)}
        if len(self.index) != len(self.classes):
            raise ValueError("class list has duplicates")

    def __len__(self) -> int:
        return len(self.classes)

    def encode(self, labels: Iterable[str], cut_id: str = "?") -> torch.Tensor:
        target = torch.zeros(len(self.classes))
        for label in labels:
            if label not in self.index:
                raise ValueError(f"clip {cut_id} has label {label!r}, which is not in the task's class list")
            target[self.index[label]] = 1.0
        return target


def clip_labels(cuts) -> list[tuple[str, ...]]:
    """Each clip's labels, in order, read once: from the records of an on-disk index (no cut is built: AudioSet-2M
    in about a minute), the cuts otherwise; equal labels share one string."""
    shared: dict[str, str] = {}
    records = (r.get("custom") or {} for r in cuts.records()) if isinstance(cuts, ManifestIndex) else \
        (cut.custom or {} for cut in cuts)
    return [tuple(shared.setdefault(label, label) for label in custom.get("labels", [])) for custom in records]


def balanced_weights(cuts, classes: Sequence[str]) -> list[float]:
    """AST's balanced-sampling weights: a clip weighs ``sum(1000 / (count(label) + 0.01))`` over its labels
    (``cuts``: a CutSet held in memory or a :class:`~common.data.manifest_index.ManifestIndex`)."""
    labels = clip_labels(cuts)
    counts = Counter(label for row in labels for label in row)
    missing = [c for c in classes if c not in counts]
    if missing:
        log.info("balanced sampler: %d classes have no clip (e.g. %s)", len(missing), missing[0])
    return [sum(1000.0 / (counts[label] + 0.01) for label in row) or 1e-3 for row in labels]


# Lhotse pads a decoded clip that falls short of its manifest's length by up to 0.5 s by default (mirroring its
# end), which hides a clip that lost a fifth of itself or more when it is under 2.5 s; a few compressed-audio
# frames of difference are all this package lets through (a shorter clip is then bad audio, named).
AUDIO_LENGTH_TOLERANCE = 0.1


def _set_length_tolerance(seconds: float) -> None:
    # Lhotse says so with logging.info on the root logger, which would install logging's default console handler
    # (every line printed twice); its warning is about Lhotse's augmentation transforms, which are not used here
    root, guard = logging.getLogger(), logging.NullHandler()
    root.addHandler(guard)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_audio_duration_mismatch_tolerance(seconds)
    finally:
        root.removeHandler(guard)


_set_length_tolerance(AUDIO_LENGTH_TOLERANCE)

# Lhotse audio sources this package reads: a file, bytes in the manifest or a Shar tar. Lhotse would also run a
# ``command`` source through the shell and fetch a ``url`` one; nothing a user loads may run code or reach out.
SAFE_SOURCES = ("file", "memory", "shar")


def refused_source(cut) -> str | None:
    """Why a cut's audio is not read (a ``command`` or ``url`` source: the reason, as :class:`BadClip` gives it),
    or None."""
    recordings = [getattr(cut, "recording", None)] + [getattr(getattr(t, "cut", None), "recording", None)
                                                      for t in getattr(cut, "tracks", None) or ()]
    for recording in recordings:
        for source in getattr(recording, "sources", None) or ():
            if source.type not in SAFE_SOURCES:
                return (f"refused (a Lhotse {source.type!r} audio source: this package runs no command and fetches "
                        f"no URL named in a manifest; give the audio as files)")
    return None


def _file_source(cut) -> str | None:
    """The audio file a cut reads, or None (in-memory or Shar audio)."""
    try:
        source = cut.recording.sources[0]
    except (AttributeError, IndexError):
        return None
    return str(source.source) if source.type == "file" else None


def _source_path(cut) -> str:
    return _file_source(cut) or cut.id


def _unreadable(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if "Libsndfile" in line), lines[0] if lines else "")
    return f"unreadable ({type(err).__name__}: {detail.split('>: ', 1)[-1][:200]})"


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
    except Exception as err:  # noqa: BLE001 - every decoder failure is a bad clip
        if source is not None and not os.path.exists(source):
            raise BadClip("missing (no such file)") from None
        problem = truncation(source) if source is not None else None
        if problem:
            raise BadClip(problem) from None
        raise BadClip(_unreadable(err)) from None
    if source is not None and source.lower().endswith(".wav"):
        problem = truncation(source)  # a few header bytes: the decoder pads a WAV that lost its end
        if problem:
            raise BadClip(problem)
    audio = np.asarray(audio, dtype=np.float32)
    wave = audio[0] if audio.ndim == 2 else audio.reshape(-1)
    if wave.size == 0:
        raise BadClip("empty (0 samples)")
    expected = int(round(cut.duration * sample_rate))
    if wave.size < 0.9 * expected:
        raise BadClip(f"truncated ({wave.size} of {expected} samples)")
    if not np.isfinite(wave).all():
        raise BadClip("non-finite samples (NaN or inf)")
    return wave


@dataclass
class Batch:
    """A batch of clips, zero-padded to the clip length.

    Attributes:
        waveforms: ``[B, S]`` float32.
        lengths: ``[B]`` valid samples per clip.
        targets: ``[B, K]`` multi-hot targets, or None for unlabeled data.
        ids: cut ids.
        bad: ``(path, reason)`` of the clips of this batch that were left out.
        epoch, index: position of the batch in the stream (index within the epoch).
        upsampled: ``{(clip rate, target rate): clips}`` for the clips resampled up to a higher rate.
    """
    waveforms: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor | None
    ids: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)
    epoch: int = 0
    index: int = 0
    upsampled: dict[tuple[int, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def pin_memory(self) -> "Batch":
        self.waveforms = self.waveforms.pin_memory()
        self.lengths = self.lengths.pin_memory()
        if self.targets is not None:
            self.targets = self.targets.pin_memory()
        return self


class ClipDataset(torch.utils.data.Dataset):
    """Turns a batch of cuts into a :class:`Batch` (runs in DataLoader workers).

    Args:
        clip_samples: every clip is cropped / zero-padded to this many samples.
        sample_rate: target sampling rate.
        classes: class list for targets (None: unlabeled).
        crop: where a longer clip is cut: ``start`` (AST and SSAST, training and evaluation), ``random``
            (a window drawn from ``(seed, epoch, clip id)``) or ``center``.
        seed: seed of the random crops.
        pad: ``zeros`` (a shorter clip is zero-padded) or ``repeat`` (it is repeated to the clip length).
        cache: decoded clips kept between epochs (``common.data.cache``), or None.
        channels: ``first`` or ``mean`` (:func:`load_clip`).
    """

    def __init__(self, clip_samples: int, sample_rate: int = 16000, classes: Sequence[str] | None = None,
                 crop: str = "start", seed: int = 0, pad: str = "zeros", cache: ClipCache | None = None,
                 channels: str = "first") -> None:
        if crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}; choose one of {list(CROPS)}")
        if pad not in ("zeros", "repeat"):
            raise ValueError(f"unknown pad {pad!r}; choose 'zeros' or 'repeat'")
        if channels not in CHANNELS:
            raise ValueError(f"unknown channels {channels!r}; choose one of {list(CHANNELS)}")
        self.channels = channels
        self._decode = partial(load_clip, channels=channels)  # and the clip cache's name for it (first: none)
        self._variant = "" if channels == "first" else channels
        self.pad = pad
        self.clip_samples = clip_samples
        self.sample_rate = sample_rate
        self.encoder = LabelEncoder(classes) if classes is not None else None
        self.crop = crop
        self.seed = seed
        self.cache = cache

    def _crop(self, wave: np.ndarray, cut_id: str, epoch: int) -> np.ndarray:
        extra = wave.size - self.clip_samples
        if extra < 0 and self.pad == "repeat":
            return np.tile(wave, -(-self.clip_samples // wave.size))[: self.clip_samples]
        if extra <= 0:
            return wave
        if self.crop == "start":
            start = 0
        elif self.crop == "center":
            start = extra // 2
        else:
            rng = np.random.default_rng([self.seed, epoch, zlib.crc32(cut_id.encode())])
            start = int(rng.integers(0, extra + 1))
        return wave[start : start + self.clip_samples]

    def __getitem__(self, item) -> Batch:
        epoch, index, cuts = item
        waves, lengths, targets, ids, bad, upsampled = [], [], [], [], [], Counter()
        for cut in cuts:
            try:
                wave = self._decode(cut, self.sample_rate) if self.cache is None else \
                    self.cache.load(cut, self.sample_rate, self._decode, self._variant)
                wave = self._crop(wave, cut.id, epoch)
            except BadClip as err:
                bad.append((_source_path(cut), str(err)))
                continue
            if self.encoder is not None:
                targets.append(self.encoder.encode(cut.custom.get("labels", []), cut.id))
            waves.append(wave)
            lengths.append(wave.size)
            ids.append(cut.id)
            if cut.sampling_rate < self.sample_rate:
                upsampled[(int(cut.sampling_rate), int(self.sample_rate))] += 1
        out = torch.zeros(len(waves), self.clip_samples)
        for i, wave in enumerate(waves):
            out[i, : wave.size] = torch.from_numpy(wave)
        target = None
        if self.encoder is not None:
            target = torch.stack(targets) if targets else torch.zeros(0, len(self.encoder))
        return Batch(out, torch.tensor(lengths, dtype=torch.long), target, ids, bad, epoch, index, dict(upsampled))


class _BadAudioList:
    """A run's ``bad_audio.tsv``: one line per bad clip and split (``split, path, reason``), however many
    epochs skip it. Clips already listed by an earlier invocation (a resumed run) are read back;
    :meth:`recheck` drops those that read fine now."""

    HEADER = "split\tpath\treason"
    # reasons that compare a file with its manifest (another sampling rate, fewer samples than it says): a file
    # read alone cannot show them gone, so they stay listed (the clip is still read whenever it is met)
    AGAINST_MANIFEST = re.compile(r"changed since its manifest was written|truncated \(\d+ of \d+ samples\)|"
                                  r"unreadable \(AudioLoadingError: The number of declared samples")

    def __init__(self, path: str | os.PathLike | None, write: bool = True) -> None:
        self.path = Path(path) if path else None
        self.write = write  # False: another process (rank 0) keeps the file; this one only remembers
        self._listed: set[tuple[str, str]] | None = None

    def _rows(self) -> list[tuple[str, str, str]]:
        rows = []
        if self.write and self.path is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                cols = line.split("\t")
                if line == self.HEADER or len(cols) < 2:
                    continue
                rows.append((cols[0], cols[1], cols[2]) if len(cols) >= 3 else ("train", cols[0], cols[1]))  # older
        return rows

    def _read(self) -> set[tuple[str, str]]:
        return {(split, path) for split, path, _ in self._rows()}

    def recheck(self) -> tuple[list[str], int]:
        """Check the listed files again and rewrite the list with those still bad (their reason of now);
        a clip dropped here is listed again if it turns out bad later. Entries that name no file (a clip of a
        Shar shard) stay. Returns the paths dropped and the number still listed."""
        rows = self._rows()
        if not rows:
            return [], 0

        kept, dropped, problems = [], [], {}
        for split, path, reason in rows:
            if path not in problems:
                problems[path] = audio_file_problem(path) if os.path.exists(path) or reason.startswith("missing") \
                    else reason
            problem = problems[path]
            if problem is None and self.AGAINST_MANIFEST.match(reason):  # only its manifest could clear it
                problem = reason
            if problem is None:
                dropped.append(path)
            else:
                kept.append(f"{split}\t{path}\t{problem}")
        atomic_write_text(self.path, "\n".join([self.HEADER, *kept]) + "\n")
        self._listed = self._read()
        return sorted(set(dropped)), len(kept)

    def add(self, split: str, path: str, reason: str) -> bool:
        """List a bad clip; False if it was listed before."""
        if self._listed is None:
            self._listed = self._read()
        if (split, path) in self._listed:
            return False
        self._listed.add((split, path))
        if self.write and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.is_file() or self.path.stat().st_size == 0
            with self.path.open("a") as handle:
                handle.write((self.HEADER + "\n" if new else "") + f"{split}\t{path}\t{reason}\n")
        return True


class BadAudioTracker:
    """Counts the clips of a split seen and left out; lists each bad one once; stops the run past ``max_fraction``.

    Every skip is counted (a clip that is bad in every epoch counts in every epoch, so the share is that
    of the data); the console warning and the line in ``log_path`` come once per clip and split per run.
    Clips resampled up to a higher rate (``Batch.upsampled``) are counted too, and said once per run (all
    splits together): :meth:`take_upsampled` hands the new counts to the trainer's ledger.

    Args:
        max_fraction: largest tolerated share of bad clips.
        min_clips: the share is checked once this many clips were seen (and at every epoch end), so that
            two bad clips in the first batch do not stop a run.
        log_path: the run's TSV file (``split``, ``path``, ``reason``; a header line first), written by rank 0
            of ``dist``.
        split: the split counted (``train``; :meth:`for_split` makes trackers of the others).
        source: the manifests the clips come from, named when none of them can be used.
        dist: a :class:`common.system.distributed.Dist` of several ranks: the judgement is collective (below);
            None: this process's clips alone.

    On several ranks (``dist``) each rank counts its own clips and the decision is taken on the totals of
    every rank, so that all ranks stop together with the same message instead of one rank stopping while
    the others wait for it in a collective. The counts are summed (:meth:`settle`) only where every rank
    takes the decision at the same point: :meth:`check`, which the loader calls at each epoch end and at the
    end of a pass (every rank has the same number of batches: :func:`equal_shards`), and which the trainer
    calls at its log windows, before each checkpoint and after each validation; between those points a
    rank's clips are counted but not judged (no collective per batch). Rank 0 writes ``bad_audio.tsv``
    (``log_path``) and lists the other ranks' bad clips there when it learns of them.
    """
    def __init__(self, max_fraction: float = 0.02, min_clips: int = 200, log_path: str | None = None,
                 split: str = "train", source: Sequence[str] | str = (), dist=None) -> None:
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = max_fraction
        self.min_clips = min_clips
        self.log_path = Path(log_path) if log_path else None
        self.split = split
        self.source = [source] if isinstance(source, str) and source else [str(s) for s in source]
        self.seen = 0
        self.bad = 0
        self.reasons: Counter = Counter()
        self._list = _BadAudioList(self.log_path, write=dist is None or dist.is_main)
        self._splits: dict[str, BadAudioTracker] = {}
        self._saved_splits: dict[str, dict] = {}
        self.upsampled: Counter = Counter()  # (clip rate, target rate) -> clips, this split, the whole run
        self._untaken: Counter = Counter()  # what take_upsampled has not handed out yet
        self._said = [False]  # the resampling warning, shared with the other splits' trackers
        self.dist = dist
        self._since = Counter()  # this rank's seen / bad / reasons since the last settle (several ranks)
        self._new: list[tuple[str, str]] = []  # this rank's bad clips listed since the last settle

    def for_split(self, split: str, source: Sequence[str] | str = (), max_fraction: float | None = None,
                  dist=None) -> "BadAudioTracker":
        """The tracker of another split (``valid``): same file and threshold (unless ``max_fraction``), its own
        counts (kept in this tracker's :meth:`state_dict`), judged over the ranks of ``dist`` (None: this
        process alone, e.g. a test split that rank 0 scores). The same object is returned for the same split."""
        if split == self.split:
            return self
        tracker = self._splits.get(split)
        if dist is not None and tracker is not None:
            tracker.dist = dist
        if tracker is None:
            tracker = BadAudioTracker(self.max_fraction if max_fraction is None else max_fraction, self.min_clips,
                                      None, split, source, dist)
            tracker.log_path, tracker._list, tracker._said = self.log_path, self._list, self._said
            if split in self._saved_splits:
                tracker.load_state_dict(self._saved_splits.pop(split))
            self._splits[split] = tracker
        elif source:
            tracker.source = [source] if isinstance(source, str) else [str(s) for s in source]
        return tracker

    @property
    def collective(self) -> bool:
        """Judged over several ranks (see the class docstring)."""
        return self.dist is not None and self.dist.world_size > 1

    def update(self, batch: Batch) -> None:
        """Count a batch's clips and list its bad ones; alone (not :attr:`collective`), judge once ``min_clips``
        clips were seen."""
        self.seen += len(batch) + len(batch.bad)
        self._since["seen"] += len(batch) + len(batch.bad)
        for path, reason in batch.bad:
            self.bad += 1
            self.reasons[reason.split(" (")[0]] += 1
            self._since["bad"] += 1
            self._since["reason:" + reason.split(" (")[0]] += 1
            if self._list.add(self.split, path, reason):
                if self.collective:
                    self._new.append((path, reason))
                if not self.collective or self.dist.is_main:  # rank 0 says the others' clips when it lists them
                    log.warning("skipped bad audio (%s) %s: %s", self.split, path, reason)
        if batch.upsampled:
            self.upsampled.update(batch.upsampled)
            self._untaken.update(batch.upsampled)
            if not self._said[0]:
                self._said[0] = True
                rates = ", ".join(f"{n} at {a} Hz" for (a, _), n in sorted(batch.upsampled.items()))
                low = min(a for a, _ in batch.upsampled)
                counted = "; ledger.json counts them (upsampled)" if self.log_path is not None else ""  # a run's
                log.warning("resampling clips up to the model's %d Hz (%s of the first %d %s clips): they hold nothing "
                            "above %g Hz, so the model's upper frequency bins stay empty for them%s",
                            next(iter(batch.upsampled))[1], rates, self.seen, self.split, low / 2, counted)
        if not self.collective and self.seen >= self.min_clips:
            self.check()

    def settle(self) -> None:
        """Several ranks: add the other ranks' counts since the last call to this rank's, so that every rank
        holds the totals of all (collective: every rank calls it at the same point); rank 0 lists the other
        ranks' new bad clips in ``bad_audio.tsv``. One small all-reduce, and a gather only when some rank met
        a bad clip. Alone: nothing to do."""
        if not self.collective:
            self._since.clear()
            return
        dist = self.dist
        own = self._since
        totals = dist.all_reduce_sum(torch.tensor([own["seen"], own["bad"]], dtype=torch.int64,
                                                  device=dist.device)).tolist()
        self.seen += totals[0] - own["seen"]
        self.bad += totals[1] - own["bad"]
        if totals[1]:
            parts = dist.gather_objects(({k[7:]: n for k, n in own.items() if k.startswith("reason:")}, self._new))
            for rank, (reasons, rows) in enumerate(parts):
                if rank == dist.rank:
                    continue
                self.reasons.update(reasons)
                for path, reason in rows if dist.is_main else ():
                    if self._list.add(self.split, path, reason):
                        log.warning("skipped bad audio (%s, rank %d) %s: %s", self.split, rank, path, reason)
        self._since = Counter()
        self._new = []

    def take_upsampled(self, dist=None) -> dict[str, dict[tuple[int, int], int]]:
        """The clips resampled up since the last call, per split (this tracker's and its other splits'), and
        forget them: ``{split: {(clip rate, target rate): clips}}``.

        Args:
            dist: a :class:`common.system.distributed.Dist`: the counts of every rank's tracker, summed (collective:
                every rank calls it at the same point); None: this tracker's only.
        """
        out: dict[str, Counter] = {}
        for tracker in (self, *self._splits.values()):
            if tracker._untaken:
                out[tracker.split] = Counter(tracker._untaken)
                tracker._untaken.clear()
        if dist is not None and dist.world_size > 1:
            total: dict[str, Counter] = {}
            for counts in dist.gather_objects({split: dict(c) for split, c in out.items()}):
                for split, pairs in counts.items():
                    total.setdefault(split, Counter()).update(pairs)
            out = total
        return {split: dict(pairs) for split, pairs in out.items()}

    def check(self, whole: bool = True) -> None:
        """Stop with :class:`TooMuchBadAudio` when no clip was usable or more than ``max_fraction`` were bad.

        Args:
            whole: a whole epoch or pass was seen: judged however few clips it had; False: judged only once
                ``min_clips`` clips were seen.

        Collective when :attr:`collective` (the totals of every rank are judged: :meth:`settle`).
        """
        self.settle()
        if not whole and self.seen < self.min_clips:
            return
        where = f"; the list is in {self.log_path}" if self.log_path else ""
        if self.seen and self.bad == self.seen:
            source = f" of {', '.join(self.source)}" if self.source else ""
            raise TooMuchBadAudio(
                f"none of the {self.seen} {self.split} clips{source} could be used ({dict(self.reasons)}){where}"
            )
        if self.seen and self.bad / self.seen > self.max_fraction:
            split = "" if self.split == "train" else f" ({self.split})"
            raise TooMuchBadAudio(
                f"{self.bad} of {self.seen} clips ({self.bad / self.seen:.1%}) could not be used{split}, more than "
                f"max_bad_fraction={self.max_fraction:.1%} ({dict(self.reasons)}){where}. Restore the files and run "
                f"the same command again, or tolerate more with --set data.max_bad_fraction=F (a resumed run may "
                f"change it; recorded in ledger.json)"
            )

    def recheck_listed(self) -> None:
        """At the start of an invocation: the clips an earlier attempt listed that read fine now (files that
        came back) leave ``bad_audio.tsv``, so that it lists what is bad now (the counts keep the run's history)."""
        dropped, kept = self._list.recheck()
        if dropped:
            log.warning("%s: %d clip(s) listed by an earlier attempt read fine now and are no longer listed (%s%s); "
                        "%d still are", self.log_path, len(dropped), ", ".join(dropped[:3]),
                        ", ..." if len(dropped) > 3 else "", kept)

    def state_dict(self) -> dict:
        """The counts (on several ranks, the totals of all as of the last :meth:`settle`: the trainer settles
        before each checkpoint, which rank 0 writes), the other splits' and the clips resampled up."""
        splits = {**self._saved_splits, **{name: t.state_dict() for name, t in self._splits.items()}}
        return {"seen": self.seen, "bad": self.bad, "reasons": dict(self.reasons), "splits": splits,
                "upsampled": [[a, b, n] for (a, b), n in sorted(self.upsampled.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.bad, self.reasons = state["seen"], state["bad"], Counter(state["reasons"])
        self._since, self._new = Counter(), []
        self.upsampled = Counter({(a, b): n for a, b, n in state.get("upsampled", [])})
        self._said[0] = self._said[0] or bool(self.upsampled)  # said when the run first met them
        self._saved_splits = dict(state.get("splits", {}))
        for name in list(self._saved_splits):
            if name in self._splits:
                self._splits[name].load_state_dict(self._saved_splits.pop(name))


class WeightedCutSampler:
    """Balanced sampling as AST: each epoch draws ``len(cuts)`` clips *with replacement*, with
    probability proportional to their weights, reproducibly from ``(seed, epoch)``, in batches of
    ``batch_size`` (the global stream: :func:`equal_shards` deals it to the ranks).

    (Lhotse's ``WeightedSimpleCutSampler`` draws without replacement from numpy's global random state,
    which neither matches AST nor can be resumed exactly.) From an on-disk index its batches are clip numbers
    (``yields_numbers``), read only for the batches a rank keeps, as :class:`IndexShuffleSampler`'s.
    """
    def __init__(self, cuts, weights: Sequence[float], batch_size: int, *, drop_last: bool, seed: int) -> None:
        self.cuts = cuts if not cuts.is_lazy else cuts.to_eager()
        self.yields_numbers = isinstance(self.cuts, ManifestIndex)
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.cuts),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"need one non-negative weight per clip ({len(self.cuts)}), got {w.shape}")
        self.p = w / w.sum()
        self.batch_size, self.drop_last, self.seed = batch_size, drop_last, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        draw = np.random.default_rng([self.seed, self.epoch]).choice(len(self.p), size=len(self.p), p=self.p)
        for start in range(0, len(draw), self.batch_size):
            chunk = draw[start : start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield chunk.tolist() if self.yields_numbers else [self.cuts[int(i)] for i in chunk]


def shard_batches(clips: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Batches each rank gets from an epoch of ``clips`` clips (see :func:`equal_shards`)."""
    if drop_last:
        return clips // batch_size // world_size
    batches = -(-clips // batch_size)
    return -(-batches // world_size)


def reshard_index(index: int, saved_batch: int, saved_ranks: int, batch: int, ranks: int) -> int:
    """The batch to resume an epoch at on ``ranks`` ranks of ``batch`` clips, after ``index`` batches of
    ``saved_batch`` clips on each of ``saved_ranks``: the clips of the epoch already consumed, in whole new
    global batches (rounded down: nothing is skipped, less than one global batch is seen again). The global
    stream's clip order does not depend on the ranks or the batch, so nothing changes when neither does."""
    return index * saved_batch * saved_ranks // (batch * ranks)


def equal_shards(batches: Iterable[Sequence], rank: int, world_size: int, drop_last: bool) -> Iterator[list]:
    """This rank's share of a global stream of batches: the same number of batches on every rank.

    The batches are dealt in rounds of ``world_size``, batch ``rank`` of each round to this rank. An
    incomplete last round is dropped with ``drop_last``; without it, its clips are split into
    ``world_size`` contiguous parts of near-equal size (as Lhotse does), and a rank left without a clip
    gets an empty batch rather than Lhotse's duplicate, which evaluation would count twice.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not a rank of a world of {world_size}")
    round_: list[Sequence] = []
    for batch in batches:
        round_.append(batch)
        if len(round_) == world_size:
            yield list(round_[rank])
            round_ = []
    if round_ and not drop_last:
        clips = [cut for batch in round_ for cut in batch]
        size, extra = divmod(len(clips), world_size)
        start = rank * size + min(rank, extra)
        yield clips[start : start + size + (rank < extra)]


class _Stream:
    """The iterable DataLoader draws cut batches from (in the main process); a kept loader's next iteration
    swaps in its own generator (:meth:`ClipLoader.batches`)."""
    def __init__(self, generator) -> None:
        self.generator = generator

    def __iter__(self):
        return self.generator


class ClipLoader:
    """Batches of clips from a CutSet, sharded over ranks in equal shares, resumable to the exact next batch.

    Args:
        cuts: the CutSet (lazy or eager).
        dataset: decodes and crops (see :class:`ClipDataset`).
        batch_size: clips per batch on this rank.
        shuffle: shuffle with ``seed`` and the epoch: an eager (in-memory) CutSet is permuted as a whole
            (Lhotse's ``SimpleCutSampler``), a lazy one streams through a shuffle buffer of ``shuffle_buffer`` clips
            (``DynamicCutSampler``); see the module docstring.
        drop_last: drop the last incomplete batch of an epoch, and an incomplete last round of batches over
            the ranks (without it, a rank may get an empty last batch: see :func:`equal_shards`).
        seed: sampler seed, the same on every rank.
        rank, world_size: this process's shard (default: from the environment, as Lhotse infers it); every
            rank gets the same number of batches per epoch (:meth:`batches_per_epoch`).
        num_workers: decoding processes (0: decode in this process).
        weights: per-cut sampling weights (balanced sampling, :class:`WeightedCutSampler`); an epoch
            then draws ``len(cuts)`` clips with replacement.
        tracker: bad-audio accounting (a default one is made if None).
        pin_memory: pin batches for fast host-to-GPU copies.
        prefetch_factor: batches each worker prepares ahead.
        prefetch: without workers, batches a background thread of this process prepares ahead
            (``common.data.prefetch``; 0: decode inline).
        epoch_clips: clips in one epoch of a streamed (lazy) set, counted from its manifests' lines, for
            :meth:`estimated_batches_per_epoch` (an in-memory set counts its own); None: unknown.
        shuffle_buffer: clips in the shuffle buffer of a streamed (lazy) set.
        keep_workers: keep the worker processes between calls of :meth:`batches` (a training run's phases:
            the clips are the same, only the batch size and the position change), until :meth:`close`; the
            batches are the same as with workers started per call.

    ``batch_size`` may be changed between calls of :meth:`batches` (the next phase's): the sampler, in this
    process, reads it; the workers only decode the clips they are handed.
    """

    def __init__(self, cuts, dataset: ClipDataset, batch_size: int, *, shuffle: bool, drop_last: bool,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                 weights: Sequence[float] | None = None, tracker: BadAudioTracker | None = None,
                 pin_memory: bool = False, prefetch_factor: int = 2, prefetch: int = 2,
                 epoch_clips: int | None = None, keep_workers: bool = False, shuffle_buffer: int = 20_000) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if isinstance(cuts, SharSet) and not drop_last:
            raise ValueError("a SharSet is a training set, read in parts of equal size per rank: drop_last must be "
                             "True (an evaluation pass reads its folder with open_cuts)")
        self.cuts = cuts
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        self.num_workers = loader_workers(num_workers)  # no more than the rank's cores (common.system.cpu)
        self.weights = list(weights) if weights is not None else None
        self.tracker = tracker or BadAudioTracker()
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.prefetch = prefetch
        self.epoch_clips = epoch_clips
        self.shuffle_buffer = shuffle_buffer
        self.keep_workers = keep_workers
        self._kept: tuple[DataLoader, _Stream] | None = None  # keep_workers: the loader and its swappable stream
        self._iteration = 0  # the latest call of batches(): an older iteration of a kept loader may not go on

    def _sampler(self):
        """The global stream of batches (every rank draws the same; :func:`equal_shards` deals it)."""
        if self.weights is not None:
            return WeightedCutSampler(self.cuts, self.weights, self.batch_size, drop_last=self.drop_last,
                                      seed=self.seed)
        if isinstance(self.cuts, SharSet):  # this rank's part of the epoch only (common.data.shar_stream)
            return RankShardSampler(self.cuts, self.batch_size, rank=self.rank, world_size=self.world_size,
                                    seed=self.seed, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer)
        if isinstance(self.cuts, ManifestIndex):  # batches of clip numbers: read as they are kept (_cut_batches)
            return IndexShuffleSampler(len(self.cuts), self.batch_size, drop_last=self.drop_last, seed=self.seed,
                                       shuffle=self.shuffle)
        if not self.cuts.is_lazy:  # eager: shuffled as a whole
            return SimpleCutSampler(self.cuts, max_cuts=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
                                    world_size=1, rank=0, seed=self.seed)
        return DynamicCutSampler(self.cuts, max_cuts=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
                                 world_size=1, rank=0, seed=self.seed, shuffle_buffer_size=self.shuffle_buffer)

    def batches_per_epoch(self) -> int | None:
        """Batches this rank (and every other) gets per epoch; None for a streamed set, whose size is not known
        before it is read."""
        if self.weights is not None:  # an epoch draws one clip per weight
            return shard_batches(len(self.weights), self.batch_size, self.world_size, self.drop_last)
        if isinstance(self.cuts, SharSet):  # clips // ranks // batch per rank: what dealing rounds of batches gives
            return shard_batches(len(self.cuts), self.batch_size, self.world_size, drop_last=True)
        if self.cuts.is_lazy:
            return None
        return shard_batches(len(self.cuts), self.batch_size, self.world_size, self.drop_last)

    def estimated_batches_per_epoch(self) -> int | None:
        """For a progress bar: :meth:`batches_per_epoch`, or for a streamed set the batches its manifests' clips
        (``epoch_clips``) would give; None when unknown."""
        exact = self.batches_per_epoch()
        if exact is not None or self.epoch_clips is None:
            return exact
        return shard_batches(self.epoch_clips, self.batch_size, self.world_size, self.drop_last)

    def _cut_batches(self, start_epoch: int, skip: int, epochs: int | None) -> Iterator:

        sampler = self._sampler()
        indexed = getattr(sampler, "yields_numbers", False)  # clip numbers, read only for the batches kept
        expected = self.batches_per_epoch()
        if expected is not None and skip > expected:
            raise ValueError(f"cannot resume at batch {skip} of epoch {start_epoch}: an epoch has {expected} batches "
                             f"per rank (did the manifest change?)")

        def stream():  # not `for`: a Lhotse sampler's __iter__ restarts the epoch
            iterator = iter(sampler)
            while True:
                try:
                    yield next(iterator)
                except StopIteration:
                    return

        epoch = start_epoch
        while epochs is None or epoch < start_epoch + epochs:
            sampler.set_epoch(epoch)
            shard = stream() if getattr(sampler, "per_rank", False) else \
                equal_shards(stream(), self.rank, self.world_size, self.drop_last)
            index = 0
            for _ in range(skip):  # fast-forward over batches already trained on (metadata only)
                if next(shard, None) is None:
                    raise ValueError(f"cannot resume at batch {skip} of epoch {epoch}: the epoch has {index} "
                                     f"batches (did the manifest change?)")
                index += 1
            for cuts in shard:
                yield epoch, index, CutSet.from_cuts([self.cuts[i] for i in cuts] if indexed else cuts)
                index += 1
            if index == 0:
                raise ValueError(
                    f"the manifest gives no batch of {self.batch_size} clips on rank {self.rank} of "
                    f"{self.world_size} (too few clips{' with drop_last' if self.drop_last else ''})"
                )
            if expected is not None and index != expected:  # not with equal_shards; every rank would stop here
                raise RuntimeError(f"rank {self.rank} of {self.world_size} got {index} batches in epoch {epoch}, "
                                   f"not {expected}: the ranks would fall out of step")
            skip = 0
            epoch += 1

    def cut_batches(self, start_epoch: int = 0, skip: int = 0, epochs: int | None = None) -> Iterator:
        """The sampled clips only (metadata, nothing decoded): ``(epoch, index, CutSet)`` per batch, in the
        order :meth:`batches` decodes them."""
        return self._cut_batches(start_epoch, skip, epochs)

    def _loader(self, stream: _Stream, keep: bool) -> DataLoader:
        # A DataLoader draws its workers' base seed from its generator at every iteration it starts; without
        # one, from the global torch RNG, which training's dropout and stochastic depth draw from and a
        # checkpoint saves: a resumed run would start its loader at another point of that stream than an
        # uninterrupted one. Nothing in the workers draws from torch's RNG (crops: ``ClipDataset``).
        return DataLoader(self.dataset, sampler=stream, batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, worker_init_fn=start_worker,
                          prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
                          persistent_workers=keep, generator=torch.Generator().manual_seed(self.seed))

    def batches(self, start_epoch: int = 0, skip: int = 0, epochs: int | None = None,
                count: bool = True) -> Iterator[Batch]:
        """Iterate batches from ``(start_epoch, skip)``; forever when ``epochs`` is None.

        Every batch carries its ``epoch`` and ``index``: after training on it, the position to save is
        ``(batch.epoch, batch.index + 1)``. The worker processes start (or, kept, resume) and begin decoding
        here, not at the first batch: a caller timing its steps calls this before its clock. With
        ``keep_workers``, a new call ends the previous iteration (which then raises if drawn from again).

        ``count``: the tracker counts each batch as it is drawn; False: the caller counts the batches it uses
        (``tracker.update``), as the trainer does, which draws the next epoch's first batch to see an epoch end and
        checkpoints there (counted at the draw, that batch would be counted again by a run resumed from there).
        Each epoch is judged when the next one's first batch is drawn, and the pass at its end, either way.
        """
        source = self._cut_batches(start_epoch, skip, epochs)
        self._iteration += 1
        if self.keep_workers and self.num_workers > 0:
            if self._kept is None:
                stream = _Stream(source)
                self._kept = (self._loader(stream, keep=True), stream)
            else:  # the workers stay; what they were still decoding for the last iteration is dropped
                self._kept[1].generator.close()
                self._kept[1].generator = source
            iterator = start_workers(self._kept[0])  # forks the workers the first time; ended by close()
            return self._tracked(iterator, start_epoch, self._iteration, count)
        iterator = start_workers(self._loader(_Stream(source), keep=False))
        if self.num_workers == 0 and self.prefetch:
            iterator = background(iterator, self.prefetch)
        tracked = self._tracked(iterator, start_epoch, self._iteration, count)
        end_with(tracked, iterator)  # its workers end with this iteration (the loader is reachable from them)
        return tracked

    def close(self) -> None:
        """Stop the kept worker processes (nothing to do without ``keep_workers``); :meth:`batches` may start
        new ones afterwards. Without it they live until the process exits (``common.data.workers``)."""
        if self._kept is not None:
            self._kept[1].generator.close()
            if self._kept[0]._iterator is not None:
                end_workers(self._kept[0]._iterator)
            self._kept = None
            self._iteration += 1

    def _tracked(self, iterator, start_epoch: int, iteration: int, count: bool = True) -> Iterator[Batch]:
        last_epoch = start_epoch
        while True:
            if iteration != self._iteration:  # before drawing: the batch would be the newer iteration's
                raise RuntimeError("this iteration of the loader was ended by a newer call of batches() or close()")
            batch = next(iterator, None)
            if batch is None:
                break
            if batch.epoch != last_epoch:
                self.tracker.check()  # a whole epoch was seen: judge it even if it is small
                last_epoch = batch.epoch
            if count:
                self.tracker.update(batch)
            yield batch
        self.tracker.check()


def train_loader(data: DataConfig, classes: Sequence[str] | None, clip_samples: int, sample_rate: int,
                 batch_size: int, seed: int, rank: int, world_size: int, tracker: BadAudioTracker,
                 pin_memory: bool = False, cache: ClipCache | None = None, keep_workers: bool = False,
                 channels: str = "first") -> ClipLoader:
    """The training stream of a run: ``data.train`` mixed by weight, shuffled per epoch (the whole set when it
    fits ``data.full_shuffle_max``, or AST's balanced sampling when ``data.balanced``), cropped as
    ``data.train_crop`` says, incomplete last batches dropped.

    A run keeps one for all its phases (``keep_workers``, setting each phase's ``batch_size``): the training
    set is read and weighed once (AudioSet-2M: about a minute) and the worker processes start once.

    Args:
        data: the recipe's data section.
        classes: the task's classes (None: unlabeled data).
        clip_samples, sample_rate: every clip is resampled and cropped / padded to this.
        batch_size: clips per rank per batch (the first phase's).
        seed: sampler, crop and mix seed.
        rank, world_size: this process's shard.
        tracker: counts and logs bad audio.
        pin_memory: pin batches for host-to-GPU copies.
        cache: decoded clips kept between epochs and phases (``data.cache``; made by the caller, which keeps it).
        keep_workers: keep the worker processes between calls of ``batches`` (:class:`ClipLoader`).
        channels: ``first`` or ``mean`` of a multi-channel file (``data.channels`` resolved for the architecture).
    """
    shar = [str(spec.path) for spec in data.train if is_shar_folder(spec.path)]
    per_rank = reads_per_rank(data)
    if per_rank:  # each rank reads its own part of every epoch (common.data.shar_stream)
        cuts = SharSet([spec.path for spec in data.train])
        log.info("training set %s: %d clips in %d Shar shard(s), dealt to the ranks in a new order every epoch",
                 ", ".join(shar), len(cuts), len(cuts.shards))
    else:
        cuts = open_cuts(data.train, seed=seed, in_memory_max=data.full_shuffle_max,
                         index_dir=(data.index_dir or DEFAULT_INDEX_DIR) if data.shuffle == "full" else None)
    if shar and data.balanced:  # drawn at random from the whole set: a sequential Shar stream is held in memory
        need = sum(f.stat().st_size for path in shar for f in manifest_path(path).iterdir()
                   if f.is_file() and not f.name.startswith("cuts.")) * local_ranks()
        if need > total_memory():  # never fits (the same answer on every rank of the machine)
            raise ValueError(f"data.balanced draws clips at random from the whole training set, so the Lhotse Shar "
                             f"folder {shar[0]} would be read into memory, audio included: {need / 2**30:.1f} GiB on "
                             f"this machine ({local_ranks()} rank(s)), which has {total_memory() / 2**30:.1f} GiB; "
                             f"give a .jsonl.gz manifest of audio files (`c2f-corpora prepare`), whose clips are read "
                             f"as they are drawn")
        if rank == 0:
            log.warning("data.train: %s is a Lhotse Shar folder and data.balanced draws clips from the whole set: it "
                        "is read into memory, audio included (%.1f GiB on this machine, %.1f GiB available now); a "
                        ".jsonl.gz manifest of audio files keeps only the clips' metadata there", shar[0],
                        need / 2**30, available_memory() / 2**30)
    if shar and channels == "mean" and rank == 0:
        log.warning("data.channels: mean (HTS-AT's mix-down) has one channel to mix in Lhotse Shar folder %s: its "
                    "shards hold the channel the export kept (the first of a multi-channel file); mix such a corpus "
                    "down (ffmpeg -ac 1) before exporting it where the mean matters", shar[0])
    if shar and not data.balanced and not per_rank and world_size > 1 and rank == 0:
        log.warning("data.train: %s is a Lhotse Shar folder %s: each of the %d ranks reads the whole mix every epoch "
                    "(audio included) and keeps its share of the batches, so the reading grows with the ranks; Shar "
                    "folders of equal weights alone are read in parts, one per rank", shar[0],
                    "in a mix of unequal weights" if len({s.weight for s in data.train}) > 1 else
                    "mixed with manifest files", world_size)
    weights = None
    if data.balanced:  # weighed once a run (each clip by its labels); a stream is read into memory first
        cuts = cuts.to_eager() if cuts.is_lazy else cuts
        weights = balanced_weights(cuts, classes or [])
    clips = None
    if cuts.is_lazy and not isinstance(cuts, SharSet):  # the progress bar's, and an epoch-based cosine schedule's
        counts = [epoch_clips(spec.path) for spec in data.train]  # from the manifests' lines (AudioSet-2M: seconds)
        clips = None if None in counts else sum(counts)
    dataset = ClipDataset(clip_samples, sample_rate, classes, crop=data.train_crop, seed=seed, pad=data.pad,
                          cache=cache, channels=channels)
    return ClipLoader(cuts, dataset, batch_size, shuffle=True, drop_last=True, seed=seed, rank=rank,
                      world_size=world_size, num_workers=data.num_workers, weights=weights, tracker=tracker,
                      pin_memory=pin_memory, epoch_clips=clips, keep_workers=keep_workers,
                      shuffle_buffer=data.shuffle_buffer)


def eval_loader(manifests: Sequence[ManifestSpec | str], classes: Sequence[str] | None, clip_samples: int,
                sample_rate: int, batch_size: int, num_workers: int = 0, crop: str = "start", rank: int = 0,
                world_size: int = 1, tracker: BadAudioTracker | None = None,
                pin_memory: bool = False, pad: str = "zeros", cache: ClipCache | None = None,
                keep_workers: bool = False, channels: str = "first") -> ClipLoader:
    """One pass over evaluation manifests, every clip kept once (no shuffling within a manifest, several mixed
    with a fixed seed; no dropped batch; over several ranks, the same number of batches on each, the last of
    which may be empty).

    Args:
        manifests: the evaluation manifests.
        classes: the task's classes (None: unlabeled data).
        clip_samples, sample_rate: every clip is resampled and cropped / padded to this.
        batch_size: clips per batch.
        num_workers: decoding processes.
        crop: where a longer clip is cut (``start`` as AST, or ``center``).
        rank, world_size: this process's shard (validation during training is spread over ranks).
        tracker: counts and logs bad audio (default: counts without a limit).
        pin_memory: pin batches for host-to-GPU copies.
        pad: how shorter clips are filled (``zeros`` or ``repeat``).
        cache: decoded clips kept between validation rounds (``data.cache``), or None.
        keep_workers: keep the worker processes between passes (a run's validation rounds: :class:`ClipLoader`).
        channels: ``first`` or ``mean`` of a multi-channel file (:func:`load_clip`).
    """
    dataset = ClipDataset(clip_samples, sample_rate, classes, crop=crop, pad=pad, cache=cache, channels=channels)
    specs = [m if isinstance(m, ManifestSpec) else ManifestSpec(str(m)) for m in manifests]
    counts = [epoch_clips(spec.path) for spec in specs]  # the progress bar's total (lines: no clip parsed)
    return ClipLoader(open_cuts(specs), dataset, batch_size, shuffle=False, drop_last=False, rank=rank,
                      world_size=world_size, num_workers=num_workers,
                      tracker=tracker or BadAudioTracker(1.0, split="eval"),
                      pin_memory=pin_memory, keep_workers=keep_workers,
                      epoch_clips=None if None in counts else sum(counts))
