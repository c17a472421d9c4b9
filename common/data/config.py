"""What a recipe's ``data`` section says: the manifests a split reads (:class:`ManifestSpec`) and how the
training and evaluation loaders read them (:class:`DataConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from common.data.cache import CacheMode

__all__ = ["ManifestSpec", "DataConfig"]


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
        if not 0 < self.weight < math.inf:  # also NaN
            raise ValueError(f"manifest weight must be positive and finite, got {self.weight} for {self.path}")


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
        if not 1 <= self.batch_size <= 2**20:  # a bound: 1e30 reached torch as a traceback in --dry-run
            raise ValueError(f"batch_size must be from 1 to {2**20}, got {self.batch_size}")
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
