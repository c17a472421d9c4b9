"""A training set of Lhotse Shar folders read shard by shard, each rank reading only its own part of every epoch.

    the shards of every folder --permuted with (seed, epoch)--> the epoch's sequence of clips
      --rank r of R: clips [r * n, (r + 1) * n), n = clips // R--> the shards holding them, read in order
      --Lhotse's shuffle buffer (seed + epoch, ``data.shuffle_buffer`` clips)--> this rank's batches

Every rank computes the same split from the shards' line counts (``cuts.*.jsonl.gz``, no audio read), so each
reads about 1/R of the audio, plus the part of its first shard before its range, instead of all of it (a
whole folder streamed by every rank and dealt in rounds, :func:`common.data.shards.equal_shards`, grows the
reading with the ranks). Every rank gets ``n`` clips and so the same number of batches; the last ``clips % R``
clips of an epoch's sequence (fewer than the ranks, other clips every epoch) wait for another epoch, and each
rank drops its incomplete last batch as training always does.

Resume. A rank's stream depends on (seed, epoch, rank, ranks) alone and its clip order not on the batch size:
``(epoch, batches consumed)`` continues exactly (the batches skipped are read again, this rank's only), and a
position converted to clips (:func:`common.data.shards.reshard_index`) continues exactly at another per-rank
batch. On another number of ranks every rank's part of the epoch changes: the converted position keeps the
share of the epoch consumed and the epoch's length, and the rest of that epoch is the new parts' rest (some
clips seen again, some left for the next epoch); the trainer says so when it resumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from lhotse import CutSet
from lhotse.dataset import DynamicCutSampler
from lhotse.shar.readers.lazy import LazySharIterator

from common.data.manifest_index import count_lines, manifest_path
from common.data.shards import shard_batches

__all__ = ["SharShard", "SharSet", "RankShardSampler", "is_shar_folder", "folder_shards", "shar_only", "reads_per_rank"]


def is_shar_folder(path: str | os.PathLike) -> bool:
    """A folder, which a split names only as a Lhotse Shar folder (``common.data.manifests`` checks its shards)."""
    return manifest_path(path).is_dir()


def folder_shards(folder: str | os.PathLike) -> list[dict]:
    """A Shar folder's shards, each its files by field (``cuts``, ``recording``, ...), as Lhotse reads the folder.

    Raises:
        FileNotFoundError: no ``cuts.*.jsonl.gz`` shard in the folder.
        ValueError: a field without a file per cuts shard (a missing tar, or another file in the folder).
    """
    folder = manifest_path(folder)
    if not list(folder.glob("cuts.*.jsonl*")):
        raise FileNotFoundError(f"{folder} is a folder but not a Lhotse Shar folder (no cuts.*.jsonl.gz shards)")
    try:
        return LazySharIterator(in_dir=folder).shards
    except AssertionError as err:  # Lhotse checks that every field has a file per cuts shard
        raise ValueError(f"Shar folder {folder}: its files do not pair up with its cuts shards ({err}; a Shar "
                         f"folder holds its shards only)") from None


def shar_only(specs: Sequence) -> bool:
    """Whether manifests (``ManifestSpec`` objects) are Lhotse Shar folders alone (and at least one)."""
    return bool(specs) and all(is_shar_folder(s.path) for s in specs)


def reads_per_rank(data) -> bool:
    """Whether a run's ``data`` (a ``DataConfig``) trains through a :class:`SharSet`: only Shar folders, of equal
    weights, without balanced sampling (which draws from the whole set with replacement: read into memory)."""
    return shar_only(data.train) and len({s.weight for s in data.train}) == 1 and not data.balanced


@dataclass(frozen=True)
class SharShard:
    """One shard: its files by field (``cuts``, ``recording``, ...) and its clips (the cuts file's lines)."""

    fields: Mapping[str, str]
    clips: int

    def cuts(self, first: int, stop: int) -> Iterator:
        """Clips ``first`` to ``stop`` of the shard, their audio attached (the tar entries before ``first`` are read
        and passed over: the shard is a sequential file).

        Raises:
            ValueError: the shard's other files hold fewer clips than its cuts file lists (Lhotse stops at the
                shorter one without a word, and this rank would fall out of step with the others).
        """
        reader = LazySharIterator(fields={name: [path] for name, path in self.fields.items()})
        got = 0
        for cut in islice(iter(reader), first, stop):
            got += 1
            yield cut
        if got < stop - first:
            others = ", ".join(Path(path).name for name, path in self.fields.items() if name != "cuts")
            raise ValueError(f"Shar shard {self.fields['cuts']} lists {self.clips} clips but {others or 'its data'} "
                             f"ended after {first + got}: the folder is damaged (write it again with `c2f-corpora "
                             f"shar`)")


class SharSet:
    """The shards of one or more Shar folders (equal weights: pooled, as manifests of equal weights are
    concatenated), with each rank's part of an epoch (see the module's text).

    Args:
        folders: Lhotse Shar folders (``cuts.NNNNNN.jsonl.gz`` with their ``recording.NNNNNN.tar`` etc.).
    """

    is_lazy = True  # streamed: never held in memory as a whole

    def __init__(self, folders: Sequence[str | os.PathLike]) -> None:
        self.folders = [manifest_path(f) for f in folders]
        shards = []
        for folder in self.folders:
            shards += [SharShard({name: str(path) for name, path in shard.items()}, count_lines(Path(shard["cuts"])))
                       for shard in folder_shards(folder)]
        self.shards = [s for s in shards if s.clips]
        if not self.shards:
            raise ValueError(f"Shar folder(s) {', '.join(map(str, self.folders))} hold no clips")

    def __len__(self) -> int:
        return sum(s.clips for s in self.shards)

    def order(self, epoch: int, seed: int, shuffle: bool = True) -> list[SharShard]:
        """The shards in epoch ``epoch``'s order: a permutation drawn from ``(seed, epoch)``, the same on every rank
        (``shuffle`` False: as found)."""
        if not shuffle:
            return list(self.shards)
        return [self.shards[i] for i in np.random.default_rng([seed, epoch]).permutation(len(self.shards))]

    def part(self, epoch: int, seed: int, rank: int, world_size: int, shuffle: bool = True,
             whole: bool = False) -> CutSet:
        """Rank ``rank``'s clips of the epoch, a lazy CutSet that reads the shards holding them when iterated:
        ``len(self) // world_size`` of them (training), or with ``whole`` every clip once over the ranks, the first
        ``len(self) % world_size`` ranks one more (evaluation)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not a rank of a world of {world_size}")
        share, extra = divmod(len(self), world_size)
        if not whole:
            extra = 0
        start = rank * share + min(rank, extra)
        return CutSet(_Range(self.order(epoch, seed, shuffle), start, start + share + (rank < extra)))


class _Range:
    """Clips ``start`` to ``stop`` of a sequence of shards, read shard by shard (an iterable a lazy CutSet wraps)."""

    def __init__(self, shards: Sequence[SharShard], start: int, stop: int) -> None:
        self.shards, self.start, self.stop = list(shards), start, stop

    def __iter__(self) -> Iterator:
        offset = 0
        for shard in self.shards:
            first, stop = max(self.start - offset, 0), min(self.stop - offset, shard.clips)
            if first < stop:
                yield from shard.cuts(first, stop)
            offset += shard.clips
            if offset >= self.stop:
                return


class RankShardSampler:
    """Batches of this rank's part of each epoch of a :class:`SharSet`: the sampler of
    :class:`common.data.loader.ClipLoader` for such a set, whose stream is this rank's already (``per_rank``: not
    dealt again over the ranks). Training (``drop_last``) drops an incomplete last batch; evaluation reads every
    clip once over the ranks and pads a rank's batches with empty ones up to the count of the rank with most
    clips, so that every rank gets the same number (:func:`common.data.shards.shard_batches`)."""

    per_rank = True
    yields_numbers = False

    def __init__(self, shar: SharSet, batch_size: int, *, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, shuffle_buffer: int = 20_000, drop_last: bool = True) -> None:
        self.shar, self.batch_size, self.rank, self.world_size = shar, batch_size, rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer, self.drop_last = seed, shuffle, shuffle_buffer, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[CutSet]:
        part = self.shar.part(self.epoch, self.seed, self.rank, self.world_size, self.shuffle,
                              whole=not self.drop_last)
        sampler = DynamicCutSampler(part, max_cuts=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
                                    world_size=1, rank=0, seed=self.seed, shuffle_buffer_size=self.shuffle_buffer)
        sampler.set_epoch(self.epoch)  # the shuffle buffer's draws: seed + epoch
        batches = 0
        for batch in sampler:
            batches += 1
            yield batch
        if not self.drop_last:  # a rank with fewer clips (or none) than the first: empty batches, never a duplicate
            for _ in range(shard_batches(len(self.shar), self.batch_size, self.world_size, drop_last=False) - batches):
                yield CutSet.from_cuts([])
