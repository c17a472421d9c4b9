"""Shar folders on several ranks: what one rank reads in an epoch, read whole and dealt (the old path) or in its
own part (``common.data.shar_stream``).

Exports the built-in corpus's training clips as Shar shards, then for each rank of ``--ranks`` draws one epoch of
batches both ways (the sampler's work: the shards read, their audio attached to the cuts, nothing decoded) and
reports the clips each rank read from the tars and the seconds it took (median over ``--repeats``); then the
second half of an epoch, resumed halfway, with the skipped batches' audio read (as before
``RankShardSampler.resume_at``) and passed over.

    python -m bench.shar_ranks [--ranks 4] [--shard-size 32] [--batch 8] [--repeats 3] [--data demo_out/data]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path


def _epoch(loader, skip: int = 0) -> int:
    return sum(len(cuts) for _, _, cuts in loader.cut_batches(0, skip, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shar_ranks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4, help="ranks to simulate (default 4)")
    parser.add_argument("--shard-size", type=int, default=32, help="clips per Shar shard (default 32)")
    parser.add_argument("--batch", type=int, default=8, help="clips per rank per batch (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per rank and path (default 3)")
    parser.add_argument("--data", default="demo_out/data", help="where the built-in corpus is (prepared if absent)")
    args = parser.parse_args(argv)  # --help answers without loading torch

    import lhotse.shar
    from lhotse import CutSet
    from lhotse.shar.readers.lazy import LazySharIterator

    from common.data import shar_stream
    from common.data.clips import ClipDataset
    from common.data.corpora import get_corpus
    from common.data.loader import ClipLoader
    from common.data.manifests import open_cuts

    manifest = Path(args.data) / "synth" / "synth_train.jsonl.gz"
    if not manifest.is_file():
        get_corpus("synth").prepare(None, Path(args.data) / "synth", size="demo")
    read = Counter()

    class Counted(LazySharIterator):  # counts the clips taken out of the tars (audio attached)
        def __iter__(self):
            for cut in super().__iter__():
                read["clips"] += 1
                yield cut

    real_next = shar_stream._TarPairs.next

    def counted_next(self, wanted: bool):  # the part reader's tars, read pair by pair (audio attached if wanted)
        read["clips"] += bool(wanted)
        return real_next(self, wanted)

    shar_stream._TarPairs.next = counted_next
    resume_at = shar_stream.RankShardSampler.resume_at
    with tempfile.TemporaryDirectory() as tmp:
        shar = Path(tmp) / "shar"
        shar.mkdir()
        CutSet.from_file(manifest).to_shar(shar, fields={"recording": "flac"}, shard_size=args.shard_size, num_jobs=1)
        total = sum(1 for _ in CutSet.from_file(manifest))
        size = sum(p.stat().st_size for p in shar.iterdir())
        print(f"{total} clips in {len(list(shar.glob('cuts.*')))} shards ({size / 2**20:.1f} MiB), {args.ranks} "
              f"ranks, {args.batch} clips per rank per batch")
        shar_stream.LazySharIterator = Counted  # the part reader's
        lhotse.shar.LazySharIterator = Counted  # CutSet.from_shar's, which imports it from there when called
        rows = []
        half = total // args.ranks // args.batch // 2
        for name, make, skip, passed_over in (
                ("whole folder, dealt", lambda: open_cuts([shar]), 0, True),
                ("own part", lambda: shar_stream.SharSet([shar]), 0, True),
                (f"own part, resumed {half} batches in, their audio read", lambda: shar_stream.SharSet([shar]),
                 half, False),
                (f"own part, resumed {half} batches in, their audio passed over", lambda: shar_stream.SharSet([shar]),
                 half, True)):
            shar_stream.RankShardSampler.resume_at = resume_at if passed_over else (lambda self, batches: None)
            clips, seconds, batches = [], [], []
            for rank in range(args.ranks):
                loader = ClipLoader(make(), ClipDataset(16000), args.batch, shuffle=True, drop_last=True, seed=0,
                                    rank=rank, world_size=args.ranks)
                times = []
                for _ in range(args.repeats):
                    read.clear()
                    start = time.perf_counter()
                    batches.append(_epoch(loader, skip) // args.batch)
                    times.append(time.perf_counter() - start)
                clips.append(read["clips"])
                seconds.append(statistics.median(times))
            rows.append((name, clips, seconds, set(batches)))
        print("| path | clips read per rank | seconds per rank per epoch | batches per rank |")
        print("|---|---|---|---:|")
        for name, clips, seconds, batches in rows:
            print(f"| {name} | {', '.join(map(str, clips))} | {', '.join(f'{s:.3f}' for s in seconds)} | "
                  f"{', '.join(map(str, sorted(batches)))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
