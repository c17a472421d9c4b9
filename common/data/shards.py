"""Equal shards: every rank gets the same number of batches in every epoch, whatever the sampler (in-memory
shuffle, streaming buffer, balanced), so that all ranks enter the same collectives.

One global stream of batches is dealt in rounds of ``world_size`` (:func:`equal_shards`); training drops an
incomplete last round, evaluation splits its clips over the ranks and gives a rank left without one an empty
batch, never a duplicate, so every clip is scored exactly once. The order of an epoch's clips depends on neither
the number of ranks nor the batch size, so a position converted to clips of the epoch (:func:`reshard_index`)
continues the same epoch on another number of ranks. Shar folders alone are dealt in equal parts of clips
instead, each rank reading only its own (``common.data.shar_stream``).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

__all__ = ["shard_batches", "reshard_index", "equal_shards"]


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
