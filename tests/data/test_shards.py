"""Equal shards: every rank gets the same number of batches from every loader path (in-memory shuffle,
streaming buffer, weighted mix, Shar, balanced sampling, the whole-set shuffle through a manifest index,
evaluation), resumed or not and after a change of
world size, at 2 and 3 ranks; validation scores every clip once. First the samplers in this process, then
real training (epoch-based fine-tuning and step-based pretraining) in 2 and 3 processes on gloo."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lhotse import CutSet
from safetensors.torch import load_file

from common.data.balanced import balanced_weights
from common.data.clips import ClipDataset
from common.data.config import ManifestSpec
from common.data.loader import ClipLoader, eval_loader
from common.data.manifests import open_cuts
from common.data.shar_stream import SharSet
from common.data.shards import equal_shards, reshard_index, shard_batches
from tests.ranks import launch_cases

ROOT = Path(__file__).resolve().parents[2]
CLIPS, VALID, BATCH = 41, 25, 4  # neither divides into batches of 4 on 2 or 3 ranks
RESHARD_BATCH = 12  # a global batch that splits on 2 ranks (6 clips each) and on 3 (4 each): 3 steps per epoch


@pytest.fixture(scope="module")
def odd(synth_corpus, tmp_path_factory):
    """The built-in corpus's clips regrouped: 41 labeled training clips (also as two manifests of 24 + 17,
    and as a Shar folder), 25 validation clips (also as a Shar folder: the Shar task's), a task file for each."""
    out = tmp_path_factory.mktemp("odd")
    cuts = [c for split in ("train", "test", "valid")
            for c in CutSet.from_file(synth_corpus / f"synth_{split}.jsonl.gz")]
    train, valid = cuts[:CLIPS], cuts[-VALID:]
    CutSet.from_cuts(train).to_file(out / "train.jsonl.gz")
    CutSet.from_cuts(train[:24]).to_file(out / "part_a.jsonl.gz")
    CutSet.from_cuts(train[24:]).to_file(out / "part_b.jsonl.gz")
    CutSet.from_cuts(valid).to_file(out / "valid.jsonl.gz")
    (out / "shar").mkdir()
    CutSet.from_cuts(train).to_shar(out / "shar", fields={"recording": "flac"}, shard_size=16, num_jobs=1)
    (out / "valid_shar").mkdir()
    CutSet.from_cuts(valid).to_shar(out / "valid_shar", fields={"recording": "flac"}, shard_size=8, num_jobs=1)
    shutil.copy(synth_corpus / "synth_classes.json", out / "classes.json")
    for name, manifest, balanced in (("task", "train.jsonl.gz", False), ("task_shar", "shar", False),
                                     ("task_balanced", "train.jsonl.gz", True), ("task_test", "train.jsonl.gz", False)):
        (out / f"{name}.yaml").write_text(
            f"name: odd\ntrain: [{manifest}]\nvalid: [{'valid_shar' if manifest == 'shar' else 'valid.jsonl.gz'}]\n"
            f"classes: classes.json\ntarget_frames: 128\n"
            f"norm: audioset\nmetric: acc\nloss: ce\nbalanced: {str(balanced).lower()}\n" +
            ("test: [valid.jsonl.gz]\n" if name == "task_test" else ""))
    return out


def _loader(odd, path: str, rank: int, world_size: int, batch: int = BATCH, drop_last: bool = True) -> ClipLoader:
    """The loader of one path, as ``train_loader`` / ``eval_loader`` build them (metadata only here)."""
    if path.startswith("eval"):  # eval_shar: a Shar folder of the 41 training clips, each rank reading its part
        return eval_loader([odd / ("valid.jsonl.gz" if path == "eval" else "shar")], None, 16000, 16000, batch,
                           rank=rank, world_size=world_size)
    one = [ManifestSpec(str(odd / "train.jsonl.gz"))]
    specs = {"memory": one, "stream": one, "balanced": one, "shar": [ManifestSpec(str(odd / "shar"))],
             "mix": [ManifestSpec(str(odd / "part_a.jsonl.gz"), 2.0), ManifestSpec(str(odd / "part_b.jsonl.gz"), 1.0)],
             "index": [ManifestSpec(str(odd / "part_a.jsonl.gz")), ManifestSpec(str(odd / "part_b.jsonl.gz"))],
             "balanced_index": one}  # AudioSet-2M's balanced sampling, over an index
    indexed = path in ("index", "balanced_index")
    if path == "shar":  # Shar folders alone: each rank reads its own part of every epoch
        return ClipLoader(SharSet([odd / "shar"]), ClipDataset(16000), batch, shuffle=True, drop_last=drop_last, seed=3,
                          rank=rank, world_size=world_size)
    cuts = open_cuts(specs[path], seed=3, in_memory_max=1000 if path in ("memory", "balanced", "mix") else
                     0 if indexed else None, index_dir=str(odd / "index") if indexed else None)
    weights = balanced_weights(cuts, []) if path.startswith("balanced") else None
    return ClipLoader(cuts, ClipDataset(16000), batch, shuffle=True, drop_last=drop_last, seed=3, rank=rank,
                      world_size=world_size, weights=weights)


def _epochs(loader: ClipLoader, epochs: int = 2, skip: int = 0) -> list[list[list[str]]]:
    """Per epoch, the clip ids of each of this rank's batches."""
    out: list[list[list[str]]] = [[] for _ in range(epochs)]
    for epoch, _, cuts in loader.cut_batches(0, skip, epochs):
        out[epoch].append([c.id for c in cuts])
    return out


def test_equal_shards_deals_rounds_and_splits_an_incomplete_last_round():
    stream = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14], [15]]
    assert [list(equal_shards(iter(stream), r, 2, drop_last=True)) for r in (0, 1)] == [
        [[0, 1, 2], [6, 7, 8], [12, 13, 14]], [[3, 4, 5], [9, 10, 11], [15]]]
    assert [list(equal_shards(iter(stream), r, 4, drop_last=True)) for r in range(4)] == [
        [[0, 1, 2]], [[3, 4, 5]], [[6, 7, 8]], [[9, 10, 11]]]
    # without drop_last the last round's clips (12..15) are split; ranks left without a clip get an empty batch
    assert [list(equal_shards(iter(stream), r, 4, drop_last=False))[-1] for r in range(4)] == [[12], [13], [14], [15]]
    assert [list(equal_shards(iter(stream[:5]), r, 3, drop_last=False))[-1] for r in range(3)] == [[9, 10], [11, 12],
                                                                                                   [13, 14]]
    assert [list(equal_shards(iter(stream[:3] + [[9]]), r, 3, drop_last=False)) for r in range(3)] == [
        [[0, 1, 2], [9]], [[3, 4, 5], []], [[6, 7, 8], []]]
    assert shard_batches(41, 4, 3, drop_last=True) == 3 and shard_batches(41, 4, 3, drop_last=False) == 4
    assert shard_batches(41, 4, 2, drop_last=True) == 5 and shard_batches(41, 4, 2, drop_last=False) == 6


PATHS = [("memory", True), ("stream", True), ("mix", True), ("shar", True), ("balanced", True), ("index", True),
         ("balanced_index", True),
         ("memory", False), ("stream", False), ("balanced", False), ("index", False), ("eval", False),
         ("eval_shar", False)]


def test_a_shar_folder_mixed_with_a_manifest_file_is_said_to_be_read_by_every_rank(odd, caplog):
    """Shar folders alone are read in one part per rank (quiet); mixed with a manifest file every rank streams the
    whole mix (audio included) and keeps its share: rank 0 says so once on several ranks, one rank is quiet; balanced
    sampling reads the folder into memory, audio included, which rank 0 says on any number of ranks."""
    import logging

    from common.data.bad_audio import BadAudioTracker
    from common.data.config import DataConfig
    from common.data.loader import train_loader
    from common.data.shar_stream import SharSet

    alone = [ManifestSpec(str(odd / "shar"))]
    mixed = alone + [ManifestSpec(str(odd / "valid.jsonl.gz"))]
    for train, balanced, rank, world_size, said in ((alone, False, 0, 2, None), (mixed, False, 0, 2, "every epoch"),
                                                     (mixed, False, 1, 2, None), (mixed, False, 0, 1, None),
                                                     (alone, True, 0, 1, "into memory, audio included")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loader = train_loader(DataConfig(train=train, balanced=balanced, num_workers=0), None, 16000, 16000, 2, 0,
                                  rank, world_size, BadAudioTracker())
        assert isinstance(loader.cuts, SharSet) == (train is alone and not balanced)
        lines = [r.getMessage() for r in caplog.records if "is a Lhotse Shar folder" in r.getMessage()]
        assert len(lines) == (said is not None) and all(said in line for line in lines), (rank, world_size, lines)


def test_a_shar_folder_read_for_a_mean_of_channels_says_it_holds_one(odd, caplog):
    """HTS-AT mixes a file's channels down (data.channels: mean); a Shar export kept one channel: said on rank 0."""
    import logging

    from common.data.bad_audio import BadAudioTracker
    from common.data.config import DataConfig
    from common.data.loader import train_loader

    data = DataConfig(train=[ManifestSpec(str(odd / "shar"))], num_workers=0)
    for channels, rank, said in (("mean", 0, 1), ("mean", 1, 0), ("first", 0, 0)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train_loader(data, None, 16000, 16000, 2, 0, rank, 2, BadAudioTracker(), channels=channels)
        assert sum("has one channel to mix" in r.getMessage() for r in caplog.records) == said, (channels, rank)


def test_balanced_sampling_refuses_a_shar_folder_that_does_not_fit_in_memory(odd, monkeypatch):
    """Balanced sampling draws from the whole set at random, so a Shar folder is read into memory with its audio:
    refused, with the sizes, when its tars are larger than the machine's memory (every local rank reads them)."""
    from common.data import loader
    from common.data.bad_audio import BadAudioTracker
    from common.data.config import DataConfig
    from common.data.loader import train_loader

    tars = sum(f.stat().st_size for f in (odd / "shar").glob("recording.*"))
    data = DataConfig(train=[ManifestSpec(str(odd / "shar"))], balanced=True, num_workers=0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(loader, "total_memory", lambda: 2 * tars - 1)
    with pytest.raises(ValueError, match=r"would be read into memory, audio included: .* on this machine \(2 rank"):
        train_loader(data, None, 16000, 16000, 2, 0, 0, 2, BadAudioTracker())
    monkeypatch.setattr(loader, "total_memory", lambda: 2 * tars)
    assert train_loader(data, None, 16000, 16000, 2, 0, 0, 2, BadAudioTracker()).weights is not None


class _Reads(Counter):
    """Clips whose audio was read from Shar tars, per rank (``rank``: the rank reading now)."""
    rank = 0


def _count_reads(monkeypatch) -> _Reads:
    from common.data import shar_stream

    read = _Reads()
    real = shar_stream._TarPairs.next

    def counted(self, wanted: bool):
        read[read.rank] += bool(wanted)
        return real(self, wanted)

    monkeypatch.setattr(shar_stream._TarPairs, "next", counted)
    return read


@pytest.mark.parametrize("world_size", [2, 3])
def test_shar_folders_are_read_in_one_part_per_rank(odd, world_size, monkeypatch):
    """Each rank reads the audio of its own part of an epoch alone (the clips of its first shard before them are
    passed over by seeking in the tar), not the whole folder; the shards are dealt in a new order every epoch."""
    read = _count_reads(monkeypatch)
    parts = {}
    for rank in range(world_size):
        read.rank = rank
        parts[rank] = _epochs(_loader(odd, "shar", rank, world_size))
    assert read == {r: 2 * (CLIPS // world_size) for r in range(world_size)}  # two epochs
    for rank, epochs in parts.items():  # another order of shards, so (here) another part of the clips per rank
        assert {i for b in epochs[0] for i in b} != {i for b in epochs[1] for i in b}, rank


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_shar_evaluation_set_is_read_in_one_part_per_rank(odd, world_size, monkeypatch):
    """Evaluating Shar folders, each rank reads the audio of the clips it scores alone, not the whole set; between
    them the ranks score every clip once, in the folder's order."""
    read = _count_reads(monkeypatch)
    scored = []
    for rank in range(world_size):
        read.rank = rank
        batches = _epochs(_loader(odd, "eval_shar", rank, world_size), epochs=1)[0]
        assert len(batches) == shard_batches(CLIPS, BATCH, world_size, drop_last=False)
        scored += [i for b in batches for i in b]
    assert scored == [c.id for c in CutSet.from_file(odd / "train.jsonl.gz")]  # the folder's order, each once
    share, extra = divmod(CLIPS, world_size)
    assert read == {r: share + (r < extra) for r in range(world_size)}  # every clip's audio read once


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_shar_resume_at_another_per_rank_batch_continues_exactly(odd, world_size):
    """A rank's part of a Shar epoch comes in the same clip order whatever its batch, so a position converted to
    clips (the same ranks, another per-rank batch) continues exactly."""
    for rank in range(world_size):
        by4, by6 = ([i for b in _epochs(_loader(odd, "shar", rank, world_size, batch), epochs=1)[0] for i in b]
                    for batch in (4, 6))
        common = min(len(by4), len(by6))
        assert common >= 12 and by4[:common] == by6[:common]
        index = reshard_index(2, 4, world_size, 6, world_size)  # 8 clips: one batch of 6, two clips seen again
        resumed = [i for b in _epochs(_loader(odd, "shar", rank, world_size, 6), epochs=1, skip=index)[0] for i in b]
        assert index == 1 and resumed == by6[6:]


@pytest.mark.parametrize("world_size,buffer", [(1, 5), (2, 20_000), (3, 7)])
def test_a_shar_resume_reads_no_audio_of_the_batches_it_passes_over(odd, world_size, buffer, monkeypatch):
    """Resumed mid-epoch, a rank reads the audio of the clips still to come alone (the shuffle buffer's and those
    after it), not of the batches it passes over: a first pass replays the sampler on metadata. The batches it
    trains on, audio included, are those of the uninterrupted epoch."""
    def loader(rank: int) -> ClipLoader:
        return ClipLoader(SharSet([odd / "shar"]), ClipDataset(16000), BATCH, shuffle=True, drop_last=True, seed=3,
                          rank=rank, world_size=world_size, shuffle_buffer=buffer)

    read = _count_reads(monkeypatch)
    for rank in range(world_size):
        whole = list(loader(rank).batches(1, 0, 1))
        for skip in (1, len(whole) // 2, len(whole) - 1):
            read.clear()
            resumed = list(loader(rank).batches(1, skip, 1))
            assert [b.ids for b in resumed] == [b.ids for b in whole[skip:]]
            assert all(torch.equal(a.waveforms, b.waveforms) for a, b in zip(resumed, whole[skip:]))
            later = sum(len(b.ids) for b in whole[skip:])  # what the resumed epoch trains on
            assert later <= read[0] <= CLIPS // world_size - skip * BATCH, (skip, later, read)
            assert read[0] < CLIPS // world_size  # before: every clip of the part up to the position was read


@pytest.mark.slow
def test_a_shar_run_checkpointed_before_the_parts_per_rank_says_its_order_changed(tmp_path, synth_corpus, odd):
    """A Shar run whose checkpoint was written when every rank read the whole folder (its ``sampler``: shuffle)
    resumes mid-epoch in the per-rank order: said and recorded in the ledger; a checkpoint of this version is not."""
    from tests.helpers import run

    shar = f"data.train=[{{path: {odd / 'shar'}}}]"
    run_dir = tmp_path / "run"
    assert run(run_dir, synth_corpus, shar, "train.save_every=100", stop=2) == 0
    saved = run_dir / "checkpoints" / (run_dir / "checkpoints" / "LATEST").read_text() / "trainer_state.json"
    state = json.loads(saved.read_text())
    assert state["sampler"] == "shar-per-rank" and state["state"]["data_index"] == 2
    state["sampler"] = "shuffle"
    saved.write_text(json.dumps(state))
    assert run(run_dir, synth_corpus, shar, "train.save_every=100") == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [i["changes"] for i in ledger["interventions"]] == [{"sampler": {"from": "shuffle", "to": "shar-per-rank"}}]
    assert "read in one part per rank, in another order" in (run_dir / "train.log").read_text()


def test_a_shar_shard_whose_audio_ends_early_is_named(odd, tmp_path):
    """A shard whose tar holds fewer clips than its cuts file lists (Lhotse stops at the shorter without a word): the
    rank reading it names the shard, rather than falling out of step with the others at the epoch's end."""
    import tarfile

    damaged = tmp_path / "shar"
    shutil.copytree(odd / "shar", damaged)
    tar = damaged / "recording.000000.tar"
    with tarfile.open(odd / "shar" / "recording.000000.tar") as src, tarfile.open(tar, "w") as out:
        members = src.getmembers()
        assert len(members) == 2 * 16  # a clip's audio and its metadata
        for member in members[:-4]:
            out.addfile(member, src.extractfile(member))
    shar = SharSet([damaged])
    with pytest.raises(ValueError, match=r"recording.000000.tar ended after 14: the folder is damaged"):
        list(shar.part(0, 0, 0, 1, shuffle=False))


def test_a_shar_shard_whose_audio_belongs_to_other_clips_is_named(odd, tmp_path):
    damaged = tmp_path / "shar"
    shutil.copytree(odd / "shar", damaged)
    shutil.copy(odd / "shar" / "recording.000001.tar", damaged / "recording.000000.tar")  # 16 clips each, others
    with pytest.raises(ValueError, match=r"cuts.000000.jsonl.gz: clip 0 is '.+' but its recording entry is '.+': "
                                         r"the folder is damaged"):
        list(SharSet([damaged]).part(0, 0, 0, 1, shuffle=False))


def test_a_shar_shard_that_cannot_be_sought_is_read_through_lhotse(odd, tmp_path):
    """A compressed tar cannot be sought: Lhotse reads it entry by entry; the clips and their audio are the same."""
    import gzip

    from common.data.shar_stream import SharShard

    plain = SharSet([odd / "shar"]).shards[0]
    packed = tmp_path / "recording.000000.tar.gz"
    packed.write_bytes(gzip.compress(Path(plain.fields["recording"]).read_bytes()))
    other = SharShard({**plain.fields, "recording": str(packed)}, plain.clips)
    for a, b in zip(plain.cuts(3, 9), other.cuts(3, 9), strict=True):
        assert a.id == b.id and np.array_equal(a.load_audio(), b.load_audio())


def test_a_resume_over_tars_that_cannot_be_sought_reads_each_clip_once(odd, tmp_path, monkeypatch):
    """Compressed tars are read through Lhotse, entry by entry: a resume reads the epoch's clips once, as before
    (no replay, which would read the skipped clips' audio a second time), and its batches are the same."""
    import gzip

    from lhotse.shar.readers.lazy import LazySharIterator

    from common.data import shar_stream

    packed = tmp_path / "shar"
    shutil.copytree(odd / "shar", packed)
    for tar in packed.glob("recording.*.tar"):
        tar.with_name(tar.name + ".gz").write_bytes(gzip.compress(tar.read_bytes()))
        tar.unlink()
    read = Counter()

    class Counted(LazySharIterator):
        def __iter__(self):
            for cut in super().__iter__():
                read["clips"] += 1
                yield cut

    monkeypatch.setattr(shar_stream, "LazySharIterator", Counted)

    def loader(folder):
        return ClipLoader(SharSet([folder]), ClipDataset(16000), BATCH, shuffle=True, drop_last=True, seed=3,
                          rank=0, world_size=1, shuffle_buffer=6)

    assert not SharSet([packed]).seekable and SharSet([odd / "shar"]).seekable
    whole = [b.ids for b in loader(odd / "shar").batches(0, 0, 1)]
    read.clear()
    resumed = [b.ids for b in loader(packed).batches(0, 4, 1)]
    assert resumed == whole[4:] and read["clips"] <= CLIPS


def test_a_streamed_sets_shuffle_buffer_is_the_recipes(odd):
    """data.shuffle_buffer: a buffer of one clip passes a streamed set nearly in its own order (a Shar folder's: its
    shards in the epoch's order), the default one mixes it."""
    from dataclasses import replace

    from common.data.bad_audio import BadAudioTracker
    from common.data.config import DataConfig
    from common.data.loader import train_loader

    def ids(data: DataConfig) -> list[str]:
        loader = train_loader(data, None, 16000, 16000, BATCH, 0, 0, 1, BadAudioTracker())
        return [c.id for _, _, cuts in loader.cut_batches(epochs=1) for c in cuts]

    stream = DataConfig(train=[ManifestSpec(str(odd / "train.jsonl.gz"))], full_shuffle_max=0, shuffle="buffer",
                        shuffle_buffer=1, num_workers=0)
    shar = replace(stream, train=[ManifestSpec(str(odd / "shar"))])
    in_file = [c.id for c in CutSet.from_file(odd / "train.jsonl.gz")]
    in_shards = [c.id for shard in SharSet([odd / "shar"]).order(0, 0) for c in CutSet.from_file(shard.fields["cuts"])]
    assert in_shards != in_file and sorted(in_shards) == sorted(in_file)
    for data, order in ((stream, in_file), (shar, in_shards)):
        moved = [abs(order.index(i) - k) for k, i in enumerate(ids(data))]  # Lhotse's buffer of 1 swaps neighbours
        mixed = [abs(order.index(i) - k) for k, i in enumerate(ids(replace(data, shuffle_buffer=20_000)))]
        assert len(moved) == CLIPS // BATCH * BATCH and max(moved) <= 1 and max(mixed) > 10
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 1"):
        DataConfig(shuffle_buffer=0)


def test_a_shar_folders_epoch_is_counted_from_its_shards(odd):
    """A Shar training folder's epoch, counted from its cuts shards' lines: the progress bar's total and the steps an
    epoch-based cosine schedule decays over (a Shar run with cosine stopped at its start, 'unknown')."""
    from common.data.bad_audio import BadAudioTracker
    from common.data.config import DataConfig
    from common.data.loader import train_loader
    from common.data.manifests import epoch_clips

    assert epoch_clips(odd / "shar") == CLIPS
    data = DataConfig(train=[ManifestSpec(str(odd / "shar"))], num_workers=0)
    for world_size in (1, 2):
        loader = train_loader(data, None, 16000, 16000, BATCH, 0, 0, world_size, BadAudioTracker())
        assert loader.estimated_batches_per_epoch() == len(list(loader.cut_batches(epochs=1)))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("path,drop_last", PATHS)
def test_every_loader_path_gives_every_rank_the_same_batches(odd, path, drop_last, world_size):
    loaders = [_loader(odd, path, r, world_size, drop_last=drop_last) for r in range(world_size)]
    shards = [_epochs(loader) for loader in loaders]
    known = loaders[0].batches_per_epoch()
    assert known == (None if path in ("stream", "mix", "eval") else
                     shard_batches(CLIPS, BATCH, world_size, drop_last))
    clips = VALID if path == "eval" else CLIPS
    for epoch in range(2):
        counts = [len(shard[epoch]) for shard in shards]
        assert counts == [shard_batches(clips, BATCH, world_size, drop_last)] * world_size, (epoch, counts)
        ids = [i for shard in shards for batch in shard[epoch] for i in batch]
        if drop_last:  # full batches only
            assert all(len(b) == BATCH for shard in shards for b in shard[epoch])
        if path.startswith("balanced"):  # drawn with replacement: only the counts are the sampler's promise
            continue
        assert len(ids) == len(set(ids)) and not any("_dup" in i for i in ids)  # no clip twice, no padding clip
        if not drop_last:
            assert len(ids) == clips  # every clip once
    # a resume mid-epoch and one at the end of an epoch continue every rank exactly
    for loader, shard in zip(loaders, shards):
        for skip in (1, len(shard[0])):
            resumed = _epochs(loader, skip=skip)
            assert resumed[0] == shard[0][skip:] and resumed[1] == shard[1]


def test_balanced_sampling_over_an_index_draws_what_it_draws_in_memory(odd):
    """AudioSet-2M (larger than data.full_shuffle_max) is balanced-sampled over the manifest index instead of 2
    million cuts in memory: the same weights and draws, so the same clips."""
    for rank in (0, 1):
        assert _epochs(_loader(odd, "balanced_index", rank, 2)) == _epochs(_loader(odd, "balanced", rank, 2))


def _global(odd, path: str, world_size: int, batch: int, skip: int = 0) -> list[str]:
    """The clips of epoch 0 in the order the ranks' batches take them (round by round, rank by rank)."""
    shards = [_epochs(_loader(odd, path, r, world_size, batch), epochs=1, skip=skip)[0] for r in range(world_size)]
    return [i for batches in zip(*shards) for b in batches for i in b]


@pytest.mark.parametrize("path", ["memory", "stream", "mix", "balanced", "index"])
@pytest.mark.parametrize("before,after", [((2, 4), (3, 4)), ((3, 4), (2, 4)), ((2, 6), (3, 4)), ((3, 4), (2, 6))])
def test_a_resume_on_another_number_of_ranks_continues_the_epoch(odd, path, before, after):
    """(ranks, per-rank batch) before and after: the same batch, or the same global batch of 12 clips (a recipe's
    global ``data.batch_size``). The epoch's clip order is the same; the resumed ranks take it up at most one
    global batch before where the others stopped, never after."""
    (ranks0, batch0), (ranks1, batch1) = before, after
    first = _global(odd, path, ranks0, batch0)
    order = _global(odd, path, ranks1, batch1)
    consumed = 2  # batches per rank before the stop
    seen = consumed * batch0 * ranks0
    assert first[:seen] == order[:seen]  # the clip order does not depend on the ranks or the batch
    index = reshard_index(consumed, batch0, ranks0, batch1, ranks1)
    start = index * batch1 * ranks1
    assert seen - batch1 * ranks1 < start <= seen
    assert _global(odd, path, ranks1, batch1, skip=index) == order[start:]
    assert reshard_index(consumed, batch0, ranks0, batch0, ranks0) == consumed  # nothing changes: exact


@pytest.mark.slow
def test_a_resume_at_another_per_rank_batch_converts_the_position_in_clips(tmp_path, synth_corpus):
    """A checkpoint written at 2 clips per rank (a global batch over twice the ranks) resumes at 4 clips per
    rank from the same clips of the epoch: 4 batches of 2 are 2 batches of 4, so the run ends exactly as an
    uninterrupted one."""

    from tests.helpers import run

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(straight, synth_corpus, "train.save_every=100") == 0
    assert run(resumed, synth_corpus, "train.save_every=100", stop=2) == 0
    saved = resumed / "checkpoints" / (resumed / "checkpoints" / "LATEST").read_text() / "trainer_state.json"
    state = json.loads(saved.read_text())
    assert (state["batch_per_rank"], state["world_size"], state["state"]["data_index"]) == (4, 1, 2)
    state["batch_per_rank"], state["state"]["data_index"] = 2, 4
    saved.write_text(json.dumps(state))
    assert run(resumed, synth_corpus, "train.save_every=100") == 0
    ledger = json.loads((resumed / "ledger.json").read_text())
    assert [i["changes"] for i in ledger["interventions"]] == [{"batch_per_rank": {"from": 2, "to": 4}}]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_a_phase_closed_on_another_layout_is_not_converted_twice(tmp_path, synth_corpus, monkeypatch):
    """A phase-end checkpoint written at 2 clips per rank (before its close was recorded) resumes at 4: the run
    converts its data position, closes the phase and writes the state again, in its own layout's terms; stopped
    right after, the next start does not convert the position a second time."""
    from common.training.loop import Trainer
    from tests.helpers import run

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(straight, synth_corpus, "train.save_every=100") == 0
    assert run(resumed, synth_corpus, "train.save_every=100", stop=3) == 0  # phase 1 (3 steps), closed
    saved = resumed / "checkpoints" / "phase01-step000000003" / "trainer_state.json"
    state = json.loads(saved.read_text())
    assert state["state"]["phase_closed"] and (state["batch_per_rank"], state["state"]["data_index"]) == (4, 3)
    del state["state"]["phase_closed"]  # as written before the close was recorded, by 2 clips per rank
    state["batch_per_rank"], state["state"]["data_index"] = 2, 6
    saved.write_text(json.dumps(state))

    def killed(self, model, index):
        raise KeyboardInterrupt  # the job ends right after the phase was closed

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_next_phase", killed)
        assert run(resumed, synth_corpus, "train.save_every=100") == 130
    state = json.loads(saved.read_text())
    assert (state["batch_per_rank"], state["state"]["data_index"], state["state"]["phase_closed"]) == (4, 3, True)
    assert run(resumed, synth_corpus, "train.save_every=100") == 0
    ledger = json.loads((resumed / "ledger.json").read_text())
    assert [i["changes"] for i in ledger["interventions"]] == [{"batch_per_rank": {"from": 2, "to": 4}}]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


# ------------------------------------------------------------------ real training in 2 and 3 processes
FINETUNE = ["model.size=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
            "data.num_workers=0", "train.log_every=100", "optim.warmup_steps=0", "train.deterministic=true",
            "phases=[{compression: none, epochs: 2}]",
            "train.save_every=2"]  # checkpoints within the epochs too, on every rank (an epoch's end is one besides)
PRETRAIN = ["data.num_workers=0", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=2", "phases.0.steps=3", "phases.1.steps=3", "train.log_every=100", "train.eval_every=3",
            "train.save_every=3", "train.deterministic=true", "optim.warmup_steps=2", "baseline=null"]
TRAIN_SETS = {"memory": "[{path: DIR/train.jsonl.gz}]", "stream": "[{path: DIR/train.jsonl.gz}]",
              "index": "[{path: DIR/part_a.jsonl.gz}, {path: DIR/part_b.jsonl.gz}]",
              "shar": "[{path: DIR/shar}]",
              "mix": "[{path: DIR/part_a.jsonl.gz, weight: 2}, {path: DIR/part_b.jsonl.gz, weight: 1}]",
              "workers": "[{path: DIR/train.jsonl.gz}]"}


def _argv(odd, run_dir: Path, kind: str, path: str, stop: int | None, batch: int) -> tuple[str, list[str]]:
    """``(entry, argv)`` of a fine-tuning (epoch-based) or pretraining (step-based) run on loader ``path`` at the
    global batch ``batch`` (``data.batch_size``: clips per step over every rank)."""
    sets = [f"data.batch_size={batch}"] + {"stream": ["data.full_shuffle_max=0", "data.shuffle=buffer"],
                                           "index": ["data.full_shuffle_max=0", f"data.index_dir={odd / 'index'}"]
                                           }.get(path, [])
    if kind == "finetune":
        task = {"balanced": "task_balanced", "shar": "task_shar", "memory": "task_test"}.get(path, "task")
        argv = ["--init", "none", "--task", str(odd / f"{task}.yaml")]
        sets = FINETUNE + sets
    else:
        argv = ["--recipe", str(ROOT / "recipes" / "synth_pretrain.yaml")]
        sets = PRETRAIN + sets + [f"data.valid=[{odd / 'valid.jsonl.gz'}]",
                                  "data.train=" + TRAIN_SETS[path].replace("DIR", str(odd))]
        if path == "workers":  # the memory path read by a worker process the run keeps across its phases
            sets.append("data.num_workers=1")
    argv += ["--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]
    return kind, argv + (["--stop-after-steps", str(stop)] if stop else [])


def _check_equal_shards(name: str, ranks: list[dict], valid_ids: set[str]) -> None:
    """Every rank trained on the same number of batches in each epoch, and validated on the same number of
    batches, which together scored every validation clip the same number of times (once per round)."""
    epochs = [sorted({e for e, _, _ in r["train"]}) for r in ranks]
    assert all(e == epochs[0] for e in epochs), (name, epochs)
    for epoch in epochs[0]:
        counts = [sum(e == epoch for e, _, _ in r["train"]) for r in ranks]
        assert len(set(counts)) == 1, (name, epoch, counts)
    valid = [r.get("valid", []) for r in ranks]
    assert len({len(v) for v in valid}) == 1, (name, [len(v) for v in valid])
    scored = [i for v in valid for _, _, ids in v for i in ids]
    rounds = sum(index == 0 for _, index, _ in valid[0])
    assert Counter(scored) == (dict.fromkeys(valid_ids, rounds) if rounds else {}), (name, rounds, len(scored))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_on_2_and_3_ranks_every_loader_path_resumed_and_resharded(odd, tmp_path):
    """Fine-tuning (epoch-based: every epoch end is collective) and pretraining (step-based) on every loader
    path in 2 processes, then in 3; a run stopped mid-epoch (or at an epoch's end) resumes on the same ranks,
    and runs stopped on 2 ranks resume on 3 (the same global batch, 6 clips per rank then 4). A task's test split is
    scored by every rank, each clip once. A hang fails after the launch's timeout."""
    valid_ids = {c.id for c in CutSet.from_file(odd / "valid.jsonl.gz")}
    runs = tmp_path / "runs"
    paths = [("finetune", "memory", None), ("finetune", "stream", 2), ("finetune", "balanced", None),
             ("finetune", "shar", None), ("pretrain", "memory", None), ("pretrain", "mix", 2),  # mix: streamed
             ("pretrain", "shar", 2), ("pretrain", "workers", 2), ("pretrain", "index", 2)]
    reshards = [("finetune", "memory", 2), ("finetune", "balanced", 3), ("pretrain", "memory", 4),
                ("pretrain", "shar", 4)]
    for world_size in (2, 3):
        cases = []
        for kind, path, stop in paths:
            name = f"{kind}-{path}-{world_size}"
            if stop:  # stopped mid-epoch, then resumed
                cases.append((f"{name}-stopped", *_argv(odd, runs / name, kind, path, stop, BATCH * world_size)))
            cases.append((name, *_argv(odd, runs / name, kind, path, None, BATCH * world_size)))
        for kind, path, stop in reshards:  # stopped on 2 ranks (balanced: at the epoch's end), resumed on 3
            name = f"{kind}-{path}-resharded"
            cases.append((name if world_size == 3 else f"{name}-stopped",
                          *_argv(odd, runs / name, kind, path, None if world_size == 3 else stop, RESHARD_BATCH)))
        for name, ranks in launch_cases(world_size, cases, tmp_path / f"job{world_size}", timeout=240).items():
            _check_equal_shards(name, ranks, valid_ids)
            assert [r["children"] for r in ranks] == [0] * world_size, name  # no loader worker outlives its run
            if name.endswith("-stopped"):
                continue
            ledger = json.loads((runs / name / "ledger.json").read_text())
            if name.startswith("finetune"):  # each epoch validated on all 25 clips, none counted twice
                assert [(e["epoch"], e["metrics"]["clips"]) for e in ledger["evals"]] == [(1, VALID), (2, VALID)], name
                tested = runs / name / "test_metrics.json"  # its test split (here the 25 clips) scored by every rank
                assert json.loads(tested.read_text())["clips"] == VALID if "memory" in name else not tested.exists()
            else:
                assert ledger["total"]["steps"] == 6, name
        # a worker process kept across both phases, stopped and resumed, trains the weights of the inline loader
        a, b = (load_file(str(runs / f"pretrain-{p}-{world_size}" / "model.safetensors")) for p in ("memory", "workers"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for kind, path, _ in reshards:
        ledger = json.loads((runs / f"{kind}-{path}-resharded" / "ledger.json").read_text())
        assert [i["changes"] for i in ledger["interventions"]] == [{"world_size": {"from": 2, "to": 3}}]
        log = (runs / f"{kind}-{path}-resharded" / "train.log").read_text()
        assert ("(its Shar folders are read in one part per rank" in log) == (path == "shar"), (kind, path)


@pytest.mark.parametrize("say", [True, False])
def test_a_reshard_is_said_by_the_rank_asked_to_and_recorded_alike(say, caplog):
    """Every rank reshards its data position alike on a resume on other ranks; only rank 0 says so (the paragraph
    came once per rank on the console), and each rank's ledger copy gets the same intervention."""
    import logging
    from types import SimpleNamespace

    from common.data.config import DataConfig
    from common.training.interventions import reshard_position
    from common.training.ledger import Ledger
    from common.training.train_state import TrainState

    ledger, state = Ledger(), TrainState()
    state.data_index = 6
    with caplog.at_level(logging.DEBUG, logger="common.training.interventions"):
        reshard_position(ledger, SimpleNamespace(data=DataConfig()), state, 2, 4, 3, 4, say=say)
    said = [r for r in caplog.records if r.levelno == logging.WARNING and "resuming on 3 rank(s)" in r.getMessage()]
    assert len(said) == int(say)
    assert state.data_index == 4  # 6 batches of 4 on 2 ranks: 48 clips, 4 batches of 4 on 3 ranks
    assert [i["changes"] for i in ledger.interventions] == [{"world_size": {"from": 2, "to": 3}}]
