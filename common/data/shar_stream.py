"""A training set of Lhotse Shar folders read shard by shard, each rank reading only its own part of every epoch.

    the shards of every folder --permuted with (seed, epoch)--> the epoch's sequence of clips
      --rank r of R: clips [r * n, (r + 1) * n), n = clips // R--> the shards holding them, read in order
      --Lhotse's shuffle buffer (seed + epoch, ``data.shuffle_buffer`` clips)--> this rank's batches

Every rank computes the same split from the shards' line counts (``cuts.*.jsonl.gz``, no audio read), so each
reads 1/R of the audio (the clips of its first shard before its range are passed over by seeking in the tars,
header by header: ``SharShard.cuts``), instead of all of it (a
whole folder streamed by every rank and dealt in rounds, :func:`common.data.shards.equal_shards`, grows the
reading with the ranks). Every rank gets ``n`` clips and so the same number of batches; the last ``clips % R``
clips of an epoch's sequence (fewer than the ranks, other clips every epoch) wait for another epoch, and each
rank drops its incomplete last batch as training always does.

Resume. A rank's stream depends on (seed, epoch, rank, ranks) alone and its clip order not on the batch size:
``(epoch, batches consumed)`` continues exactly, and reads no audio of the batches it passes over: a first pass
replays the sampler on the clips' metadata to find the clips still to come (the shuffle buffer's and those after
it), and only their audio is read (``RankShardSampler.resume_at``). A
position converted to clips (:func:`common.data.shards.reshard_index`) continues exactly at another per-rank
batch. On another number of ranks every rank's part of the epoch changes: the converted position keeps the
share of the epoch consumed and the epoch's length, and the rest of that epoch is the new parts' rest (some
clips seen again, some left for the next epoch); the trainer says so when it resumes.
"""

from __future__ import annotations

import functools
import os
import tarfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from lhotse import CutSet
from lhotse.dataset import DynamicCutSampler
from lhotse.lazy import LazyJsonlIterator, LazyManifestIterator
from lhotse.serialization import decode_json_line, deserialize_item
from lhotse.shar.readers.lazy import LazySharIterator
from lhotse.shar.readers.tar import parse_tarinfo
from lhotse.shar.utils import fill_shar_placeholder

from common.data.manifest_lines import count_lines, manifest_path
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
        partial = sorted(p.name for p in folder.glob(".partial-*"))  # common.data.corpora.shar's staging folder
        if partial:
            raise ValueError(f"Shar folder {folder} holds {partial[0]}, left by an export that did not finish: run "
                             f"the same export again (it removes it, with any shards the killed one moved up), or "
                             f"remove {partial[0]} if the folder's shards are whole") from None
        raise ValueError(f"Shar folder {folder}: its files do not pair up with its cuts shards ({err}; a Shar "
                         f"folder holds its shards only)") from None


def shar_only(specs: Sequence) -> bool:
    """Whether manifests (``ManifestSpec`` objects) are Lhotse Shar folders alone (and at least one)."""
    return bool(specs) and all(is_shar_folder(s.path) for s in specs)


def reads_per_rank(data) -> bool:
    """Whether a run's ``data`` (a ``DataConfig``) trains through a :class:`SharSet`: only Shar folders, of equal
    weights, without balanced sampling (which draws from the whole set with replacement: read into memory)."""
    return shar_only(data.train) and len({s.weight for s in data.train}) == 1 and not data.balanced


class _TarPairs:
    """A Shar field's tar read pair by pair (data, then its metadata), each pair's bytes read only when wanted:
    the tar is opened seekable (``r:``), so a pair passed over costs two header reads, not its audio."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.tar = tarfile.open(path, mode="r:")
        except (tarfile.TarError, EOFError) as err:
            raise self._damaged(err) from None

    def _damaged(self, err: Exception) -> ValueError:
        return ValueError(f"Shar tar {self.path} cannot be read ({type(err).__name__}: {err}): a truncated or damaged "
                          f"copy? Write the Shar folder again (`python -m common.data.corpora shar`) or copy it again")

    def next(self, read: bool) -> tuple[object | None, Path] | None:
        """``(manifest with its data attached or None, data path)`` of the next pair (``read`` False: no manifest),
        or None at the end of the tar.

        Raises:
            ValueError: the tar is cut short or damaged (naming it).
        """
        try:
            return self._next(read)
        except (tarfile.TarError, EOFError) as err:
            raise self._damaged(err) from None

    def _next(self, read: bool) -> tuple[object | None, Path] | None:
        data_info, meta_info = self.tar.next(), self.tar.next()
        if data_info is None or meta_info is None:
            return None
        if not read:
            return None, Path(data_info.path)
        data, data_path = parse_tarinfo(data_info, self.tar)
        meta, _ = parse_tarinfo(meta_info, self.tar)
        if meta is not None:
            meta = deserialize_item(decode_json_line(meta.decode("utf-8")))
            fill_shar_placeholder(manifest=meta, data=data, tarpath=data_path)
        return meta, data_path

    def close(self) -> None:
        self.tar.close()


class _JsonlPairs:
    """A Shar field written as JSON lines (no audio), read as :class:`_TarPairs` reads a tar."""

    def __init__(self, path: str, field: str) -> None:
        self.items, self.field = iter(LazyJsonlIterator(path)), field

    def next(self, read: bool) -> tuple[object | None, Path] | None:
        item = next(self.items, None)
        if item is None:
            return None
        return (item.get(self.field) if read else None), Path(f"{item['cut_id']}.dummy")

    def close(self) -> None:
        pass


def _seekable(path: str) -> bool:
    """A field file this module reads pair by pair: a local uncompressed tar, or JSON lines."""
    if path.endswith((".jsonl", ".jsonl.gz")):
        return True
    if not (path.endswith(".tar") and os.path.isfile(path)):
        return False
    try:
        with tarfile.open(path, mode="r:"):
            return True
    except tarfile.TarError:
        return False


@dataclass(frozen=True)
class SharShard:
    """One shard: its files by field (``cuts``, ``recording``, ...) and its clips (the cuts file's lines)."""

    fields: Mapping[str, str]
    clips: int

    @functools.cached_property
    def seekable(self) -> bool:
        """Whether its data is read pair by pair (local uncompressed tars, JSON lines): clips passed over without
        reading their audio."""
        return all(_seekable(path) for name, path in self.fields.items() if name != "cuts")

    def cuts(self, first: int, stop: int, audio: Callable[[int], bool] | None = None) -> Iterator:
        """Clips ``first`` to ``stop`` of the shard, their audio attached; ``audio(i)`` False: clip ``i`` comes
        without it (its metadata only). Local tars are read pair by pair and a clip without audio, or before
        ``first``, is passed over by seeking; other files (Lhotse reads every entry) are read whole.

        Raises:
            ValueError: the shard's other files hold fewer clips than its cuts file lists (Lhotse stops at the
                shorter one without a word, and this rank would fall out of step with the others).
        """
        others = {name: path for name, path in self.fields.items() if name != "cuts"}
        if self.seekable:
            got = yield from self._paired(first, stop, others, audio)
        else:
            got = 0
            reader = LazySharIterator(fields={name: [path] for name, path in self.fields.items()})
            for cut in islice(iter(reader), first, stop):
                got += 1
                yield cut
        if got < stop - first:
            names = ", ".join(Path(path).name for path in others.values())
            raise ValueError(f"Shar shard {self.fields['cuts']} lists {self.clips} clips but {names or 'its data'} "
                             f"ended after {first + got}: the folder is damaged (write it again with `c2f-corpora "
                             f"shar`)")

    def _paired(self, first: int, stop: int, others: Mapping[str, str], audio: Callable[[int], bool] | None):
        """As Lhotse's ``LazySharIterator`` pairs a shard's files (the n-th entry of each field belongs to the
        n-th cut), reading the entries wanted only; returns the number of clips yielded."""
        readers = {name: _TarPairs(path) if path.endswith(".tar") else _JsonlPairs(path, name)
                   for name, path in others.items()}
        got = 0
        try:
            for index, cut in enumerate(islice(LazyManifestIterator(self.fields["cuts"]), stop)):
                wanted = index >= first and (audio is None or audio(index))
                for name, reader in readers.items():
                    pair = reader.next(wanted)
                    if pair is None:
                        return got
                    manifest, data_path = pair
                    if str(data_path.parent / data_path.stem) != cut.id:
                        raise ValueError(f"Shar shard {self.fields['cuts']}: clip {index} is {cut.id!r} but its "
                                         f"{name} entry is {str(data_path)!r}: the folder is damaged (write it again "
                                         f"with `c2f-corpora shar`)")
                    if manifest is not None:
                        setattr(cut, name, manifest)
                if index >= first:
                    cut.shard_origin, cut.shar_epoch = self.fields["cuts"], 0  # as Lhotse's reader marks them
                    got += 1
                    yield cut
        finally:
            for reader in readers.values():
                reader.close()
        return got


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

    @functools.cached_property
    def seekable(self) -> bool:
        """Whether every shard's data is read pair by pair (local uncompressed tars, JSON lines), so that clips
        are passed over without reading their audio (a resume's skipped batches)."""
        return all(shard.seekable for shard in self.shards)

    def order(self, epoch: int, seed: int, shuffle: bool = True) -> list[SharShard]:
        """The shards in epoch ``epoch``'s order: a permutation drawn from ``(seed, epoch)``, the same on every rank
        (``shuffle`` False: as found)."""
        if not shuffle:
            return list(self.shards)
        return [self.shards[i] for i in np.random.default_rng([seed, epoch]).permutation(len(self.shards))]

    def part(self, epoch: int, seed: int, rank: int, world_size: int, shuffle: bool = True,
             whole: bool = False, audio: Callable[[int], bool] | None = None) -> CutSet:
        """Rank ``rank``'s clips of the epoch, a lazy CutSet that reads the shards holding them when iterated:
        ``len(self) // world_size`` of them (training), or with ``whole`` every clip once over the ranks, the first
        ``len(self) % world_size`` ranks one more (evaluation); ``audio(i)`` False: the part's clip ``i`` comes
        without its audio (metadata only)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not a rank of a world of {world_size}")
        share, extra = divmod(len(self), world_size)
        if not whole:
            extra = 0
        start = rank * share + min(rank, extra)
        return CutSet(_Range(self.order(epoch, seed, shuffle), start, start + share + (rank < extra), audio))


class _Range:
    """Clips ``start`` to ``stop`` of a sequence of shards, read shard by shard (an iterable a lazy CutSet wraps);
    ``audio(i)`` False: the range's clip ``i`` comes without its audio."""

    def __init__(self, shards: Sequence[SharShard], start: int, stop: int,
                 audio: Callable[[int], bool] | None = None) -> None:
        self.shards, self.start, self.stop, self.audio = list(shards), start, stop, audio

    def __iter__(self) -> Iterator:
        offset = 0
        for shard in self.shards:
            first, stop = max(self.start - offset, 0), min(self.stop - offset, shard.clips)
            if first < stop:
                base = offset - self.start  # the range's index of the shard's first clip
                wanted = None if self.audio is None else (lambda i, base=base: self.audio(base + i))
                yield from shard.cuts(first, stop, wanted)
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
        self._resume = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, batches: int) -> None:
        """The next epoch iterated is resumed ``batches`` in: its first ``batches`` batches (which the loader passes
        over) come without their clips' audio, read from the tars by seeking over it (see :meth:`_audio_wanted`)."""
        self._resume = batches

    def _part(self, audio: Callable[[int], bool] | None = None) -> CutSet:
        return self.shar.part(self.epoch, self.seed, self.rank, self.world_size, self.shuffle,
                              whole=not self.drop_last, audio=audio)

    def _sampler(self, part: CutSet) -> DynamicCutSampler:
        sampler = DynamicCutSampler(part, max_cuts=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
                                    world_size=1, rank=0, seed=self.seed, shuffle_buffer_size=self.shuffle_buffer)
        sampler.set_epoch(self.epoch)  # the shuffle buffer's draws: seed + epoch
        return sampler

    def _audio_wanted(self, batches: int) -> Callable[[int], bool] | None:
        """Which of this epoch's clips a resume ``batches`` in reads the audio of.

        A first pass replays the sampler on the clips' metadata alone (no audio read): the clips it drew from the
        stream up to its ``batches``-th batch are those batches' clips and the shuffle buffer's. The audio of the
        buffered ones and of every clip after them is read; the skipped batches' clips come without it. The second
        pass draws the same clips in the same order (the sampler's draws depend on the seed and the clip count
        alone), so the batches after the skipped ones are those of an uninterrupted epoch, audio attached. None
        (read everything, once) when the part repeats a clip id, or when its tars cannot be sought (compressed,
        remote: the replay would read the skipped audio too)."""
        if not self.shar.seekable:
            return None
        drawn: list[str] = []

        def recorded():
            for cut in self._part(audio=lambda i: False):
                drawn.append(cut.id)
                yield cut

        skipped: set[str] = set()
        sampler = iter(self._sampler(CutSet(_Generated(recorded))))
        for _ in range(batches):
            batch = next(sampler, None)
            if batch is None:  # fewer batches than the position: the loader names the problem
                return None
            skipped.update(cut.id for cut in batch)
        if len(set(drawn)) != len(drawn):
            return None
        count = len(drawn)
        buffered = {i for i, cut_id in enumerate(drawn) if cut_id not in skipped}
        return lambda i: i >= count or i in buffered

    def __iter__(self) -> Iterator[CutSet]:
        resume, self._resume = self._resume, 0
        audio = self._audio_wanted(resume) if resume else None
        batches = 0
        for batch in self._sampler(self._part(audio)):
            if audio is not None and batches >= resume and any(map(_passed_over, batch)):
                raise RuntimeError(f"resuming a Shar epoch {resume} batches in: batch {batches} holds a clip whose "
                                   f"audio was passed over (the sampler drew another order than its replay)")
            batches += 1
            yield batch
        if not self.drop_last:  # a rank with fewer clips (or none) than the first: empty batches, never a duplicate
            for _ in range(shard_batches(len(self.shar), self.batch_size, self.world_size, drop_last=False) - batches):
                yield CutSet.from_cuts([])


def _passed_over(cut) -> bool:
    """A Shar clip read without its audio (its recording still the folder's placeholder)."""
    return cut.has_recording and any(source.type == "shar" for source in cut.recording.sources)


class _Generated:
    """An iterable over what a generator function yields, made anew for every iteration (a lazy CutSet's source)."""

    def __init__(self, make: Callable[[], Iterator]) -> None:
        self.make = make

    def __iter__(self) -> Iterator:
        return self.make()
