"""Waveform batches from Lhotse manifests, sharded over ranks, resumable to the exact next batch (:class:`ClipLoader`;
a run's training and evaluation loaders: :func:`train_loader`, :func:`eval_loader`).

    manifests (common.data.manifests) --(weighted mux)--> CutSet --sampler (seeded shuffle)--> global batches
      --equal_shards (common.data.shards)--> this rank's cut batches
      --DataLoader workers (common.data.workers): decode (common.data.decode), resample to the model's rate,
        crop / pad (common.data.clips)--> Batch(waveforms [B, S], lengths, targets)
      --bad audio counted and judged (common.data.bad_audio)

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
clip near the same place in every epoch. AST's balanced sampling: ``common.data.balanced``.

Equal shards (``common.data.shards``): every rank gets the same number of batches in every epoch;
``ClipLoader`` checks the count at every epoch end.

Resume. The loader's position is ``(epoch, batches consumed in that epoch)``, counted as batches reach
the training loop, not as the sampler hands them to prefetching workers (whose state runs ahead: with
2 workers prefetching 2 batches each, a sampler state taken after 10 trained batches records 14).
Restoring makes a fresh sampler, sets the epoch and skips the consumed batches (metadata only, no audio),
so the next batch is exactly the one an uninterrupted run would see; random crops are drawn from
``(seed, epoch, cut id)``, so they are the same after a resume as well. A position converted to clips of the
epoch (:func:`common.data.shards.reshard_index`) continues the same epoch on another number of ranks (Shar
folders alone: close to it, as ``common.data.shar_stream`` says).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Iterator, Sequence

import torch
from lhotse import CutSet
from lhotse.dataset import DynamicCutSampler, SimpleCutSampler
from torch.utils.data import DataLoader

from common.data.bad_audio import BadAudioTracker
from common.data.balanced import WeightedCutSampler, balanced_weights
from common.data.cache import ClipCache
from common.data.clips import Batch, ClipDataset
from common.data.config import DataConfig, ManifestSpec
from common.data.manifest_index import DEFAULT_INDEX_DIR, IndexShuffleSampler, ManifestIndex
from common.data.manifest_lines import manifest_path
from common.data.manifests import epoch_clips, open_cuts
from common.data.prefetch import background
from common.data.shar_stream import RankShardSampler, SharSet, is_shar_folder, reads_per_rank, shar_only
from common.data.shards import equal_shards, shard_batches
from common.data.shared_memory import check_room, check_socket_dir
from common.data.workers import end_with, end_workers, start_worker, start_workers
from common.system import launcher
from common.system.cpu import available_memory, loader_workers, local_ranks, total_memory
from common.system.logger import logging_for_workers

__all__ = ["ClipLoader", "train_loader", "eval_loader"]

log = logging.getLogger(__name__)


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
        self.cuts = cuts
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = launcher.rank() if rank is None else rank
        self.world_size = launcher.world_size() if world_size is None else world_size
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
                                    seed=self.seed, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer,
                                    drop_last=self.drop_last)
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
        if isinstance(self.cuts, SharSet):  # what dealing rounds of batches gives (common.data.shar_stream)
            return shard_batches(len(self.cuts), self.batch_size, self.world_size, self.drop_last)
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
                except json.JSONDecodeError as err:  # a streamed manifest's line that is no JSON (a blank line)
                    named = ", ".join(self.tracker.source) or "a manifest"
                    raise ValueError(f"{named}: a line is not a clip's entry (JSONDecodeError: {err}); prepare the "
                                     f"manifest again") from None

        epoch = start_epoch
        while epochs is None or epoch < start_epoch + epochs:
            sampler.set_epoch(epoch)
            if skip and hasattr(sampler, "resume_at"):  # a Shar part: the skipped batches' audio is not read
                sampler.resume_at(skip)
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
        if self.num_workers > 0:
            check_socket_dir()
            check_room(self.dataset.batch_bytes(self.batch_size), self.num_workers, self.prefetch_factor,
                       local_ranks())
        return DataLoader(self.dataset, sampler=stream, batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.pin_memory,
                          worker_init_fn=partial(start_worker, logs=logging_for_workers()),
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
        try:
            while True:
                if iteration != self._iteration:  # before drawing: the batch would be the newer iteration's
                    raise RuntimeError("this iteration of the loader was ended by a newer call of batches() or "
                                       "close()")
                batch = next(iterator, None)
                if batch is None:
                    break
                if batch.epoch != last_epoch:
                    self.tracker.check()  # a whole epoch was seen: judge it even if it is small
                    last_epoch = batch.epoch
                if count:
                    self.tracker.update(batch)
                yield batch
        finally:  # closed with this iteration, not left to the collector (common.data.prefetch.background)
            if hasattr(iterator, "close"):
                iterator.close()
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
    which may be empty). Shar folders alone are read in one part per rank, in their order: each rank reads the
    audio of the clips it scores, not the whole set.

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
        channels: ``first`` or ``mean`` of a multi-channel file (:func:`common.data.decode.load_clip`).
    """
    dataset = ClipDataset(clip_samples, sample_rate, classes, crop=crop, pad=pad, cache=cache, channels=channels)
    specs = [m if isinstance(m, ManifestSpec) else ManifestSpec(str(m)) for m in manifests]
    counts = [epoch_clips(spec.path) for spec in specs]  # the progress bar's total (lines: no clip parsed)
    # Shar folders alone: each rank reads only the clips it scores (common.data.shar_stream), in the folders' order
    cuts = SharSet([spec.path for spec in specs]) if shar_only(specs) else open_cuts(specs)
    return ClipLoader(cuts, dataset, batch_size, shuffle=False, drop_last=False, rank=rank,
                      world_size=world_size, num_workers=num_workers,
                      tracker=tracker or BadAudioTracker(1.0, split="eval"),
                      pin_memory=pin_memory, keep_workers=keep_workers,
                      epoch_clips=None if None in counts else sum(counts))
