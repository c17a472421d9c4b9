import logging
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet

from common.data.bad_audio import BadAudioTracker, TooMuchBadAudio
from common.data.balanced import balanced_weights
from common.data.clips import ClipDataset
from common.data.config import DataConfig, ManifestSpec
from common.data.corpora.base import read_classes
from common.data.loader import ClipLoader, train_loader
from common.data.manifests import count_clips, open_cuts


def make_loader(manifest, batch_size=4, **kw):
    cuts = open_cuts([manifest], in_memory_max=kw.pop("in_memory_max", None))
    classes = kw.pop("classes", None)
    dataset = ClipDataset(kw.pop("clip_samples", 16000), classes=classes, crop=kw.pop("crop", "random"), seed=1)
    kw.setdefault("shuffle", True)
    kw.setdefault("drop_last", True)
    return ClipLoader(cuts, dataset, batch_size, seed=7, rank=kw.pop("rank", 0),
                      world_size=kw.pop("world_size", 1), **kw)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("workers,in_memory", [(0, None), (2, None), (0, 1000), (2, 1000)])
def test_resume_yields_exactly_the_uninterrupted_batches(synth_corpus, workers, in_memory):
    manifest = synth_corpus / "synth_train.jsonl.gz"  # 24 clips -> 6 batches per epoch
    kw = {"num_workers": workers, "in_memory_max": in_memory, "crop": "random"}
    straight = take(make_loader(manifest, **kw).batches(), 15)  # crosses two epochs
    first = take(make_loader(manifest, **kw).batches(), 8)
    position = (first[-1].epoch, first[-1].index + 1)  # what was trained on, not what was prefetched
    rest = take(make_loader(manifest, **kw).batches(*position), 7)
    for a, b in zip(straight, first + rest):
        assert a.ids == b.ids and (a.epoch, a.index) == (b.epoch, b.index)
        assert torch.equal(a.waveforms, b.waveforms)  # random crops included
    assert [b.epoch for b in straight] == [0] * 6 + [1] * 6 + [2] * 3
    assert straight[0].ids != straight[6].ids  # reshuffled per epoch


@pytest.mark.parametrize("in_memory", [None, 1000])
def test_ranks_get_disjoint_shards(synth_corpus, in_memory):
    manifest = synth_corpus / "synth_train.jsonl.gz"
    ids = []
    for rank in (0, 1):
        loader = make_loader(manifest, batch_size=3, rank=rank, world_size=2, drop_last=False,
                             in_memory_max=in_memory)
        ids.append([i for b in loader.batches(epochs=1) for i in b.ids])
    assert not set(ids[0]) & set(ids[1])
    assert len(ids[0]) == len(ids[1]) == 12


def test_batches_are_padded_cropped_and_labelled(synth_corpus):
    classes, _ = read_classes(synth_corpus / "synth_classes.json")
    clip = 20000  # 1.25 s: longer clips are cut, shorter ones padded
    loader = make_loader(synth_corpus / "synth_train.jsonl.gz", batch_size=24, clip_samples=clip,
                         classes=classes, shuffle=False, crop="start")
    batch = next(loader.batches(epochs=1))
    cuts = {c.id: c for c in CutSet.from_file(synth_corpus / "synth_train.jsonl.gz")}
    assert batch.waveforms.shape == (24, clip) and batch.targets.shape == (24, len(classes))
    for i, cut_id in enumerate(batch.ids):
        cut = cuts[cut_id]
        n = min(clip, cut.num_samples)
        assert batch.lengths[i] == n and torch.all(batch.waveforms[i, n:] == 0)
        assert torch.allclose(batch.waveforms[i, :n], torch.from_numpy(cut.load_audio()[0, :n]))
        assert batch.targets[i, classes.index(cut.custom["labels"][0])] == 1 and batch.targets[i].sum() == 1


def test_random_crops_depend_on_epoch_and_clip_only(synth_corpus):
    cut = next(c for c in CutSet.from_file(synth_corpus / "synth_train.jsonl.gz") if c.duration > 1.5)
    ds = ClipDataset(8000, crop="random", seed=0)
    a = ds[(0, 0, CutSet([cut]))].waveforms
    assert torch.equal(a, ds[(0, 5, CutSet([cut]))].waveforms)
    assert not torch.equal(a, ds[(1, 0, CutSet([cut]))].waveforms)
    center = ClipDataset(8000, crop="center")[(0, 0, CutSet([cut]))].waveforms[0]
    full = torch.from_numpy(cut.load_audio()[0])
    start = (full.numel() - 8000) // 2
    assert torch.equal(center, full[start : start + 8000])


@pytest.fixture
def damaged_manifest(tmp_path, synth_corpus):
    """A manifest of 12 good clips, then files damaged on disk after preparation."""
    cuts = CutSet.from_file(synth_corpus / "synth_train.jsonl.gz").to_eager().subset(first=16)
    local = []
    for cut in cuts:
        path = tmp_path / f"{cut.id}.flac"
        shutil.copy(cut.recording.sources[0].source, path)
        cut.recording.sources[0].source = str(path)
        local.append(cut)
    damage = {}
    path = tmp_path / f"{local[0].id}.flac"
    path.write_bytes(b"garbage" * 10)
    damage[str(path)] = "unreadable"
    path = tmp_path / f"{local[1].id}.flac"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    damage[str(path)] = "truncated"  # a truncated download: decoding the end of the FLAC fails
    path = tmp_path / f"{local[2].id}.flac"
    path.unlink()
    damage[str(path)] = "missing"  # deleted after preparation
    nan_path = tmp_path / f"{local[3].id}.wav"
    x = np.zeros(local[3].num_samples, dtype=np.float32)
    x[100] = np.nan
    sf.write(str(nan_path), x, 16000, subtype="FLOAT")
    local[3].recording.sources[0].source = str(nan_path)
    damage[str(nan_path)] = "non-finite"
    # a 44.1 kHz clip is resampled, not rejected
    wide = tmp_path / "wide.wav"
    sf.write(str(wide), 0.1 * np.random.default_rng(0).standard_normal(44100).astype(np.float32), 44100)
    from lhotse import MonoCut, Recording
    rec = Recording.from_file(wide, recording_id="wide")
    local.append(MonoCut("wide", 0, rec.duration, 0, recording=rec, custom={"labels": ["rain"]}))
    manifest = tmp_path / "damaged.jsonl.gz"
    CutSet.from_cuts(local).to_file(manifest)
    return manifest, damage


def test_bad_audio_is_skipped_named_and_counted(damaged_manifest, tmp_path):
    manifest, damage = damaged_manifest
    tracker = BadAudioTracker(max_fraction=0.5, min_clips=1, log_path=str(tmp_path / "bad.tsv"))
    loader = make_loader(manifest, batch_size=17, shuffle=False, drop_last=False, tracker=tracker,
                         clip_samples=32000)
    batch = next(loader.batches(epochs=1))
    assert len(batch) == 13 and len(batch.bad) == 4
    assert {p: r.split(" ")[0] for p, r in batch.bad} == damage
    assert "wide" in batch.ids and batch.lengths[batch.ids.index("wide")] == 16000  # 1 s at 16 kHz
    assert tracker.seen == 17 and tracker.bad == 4
    header, *logged = (tmp_path / "bad.tsv").read_text().splitlines()
    assert header == "split\tpath\treason"
    assert sorted(line.split("\t")[1] for line in logged) == sorted(damage)
    assert {line.split("\t")[0] for line in logged} == {"train"}
    assert torch.isfinite(batch.waveforms).all()


def test_too_much_bad_audio_stops_with_a_clear_error(damaged_manifest):
    manifest, _ = damaged_manifest
    tracker = BadAudioTracker(max_fraction=0.1, min_clips=1)
    loader = make_loader(manifest, batch_size=17, shuffle=False, drop_last=False, tracker=tracker)
    with pytest.raises(TooMuchBadAudio, match=r"4 of 17 clips \(23.5%\) could not be used.*max_bad_fraction=10.0%"):
        next(loader.batches(epochs=1))


def test_missing_manifest_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m common.data.corpora prepare NAME"):
        open_cuts([tmp_path / "audioset_eval.jsonl.gz"])


def test_weighted_mix_of_manifests(synth_corpus):
    mix = open_cuts([ManifestSpec(str(synth_corpus / "synth_pool.jsonl.gz"), 1.0),
                     ManifestSpec(str(synth_corpus / "synth_train.jsonl.gz"), 1.0)], seed=0)
    ids = [c.id for c in mix]
    assert len(ids) == 24 + 24 and {i.split("-")[1] for i in ids} == {"pool", "train"}
    first_half = ids[:24]
    assert 6 < sum(i.startswith("synth-pool") for i in first_half) < 18  # interleaved, not concatenated


def test_balanced_weights_follow_ast():
    from lhotse import MonoCut

    cuts = [MonoCut(f"c{i}", 0, 1, 0, custom={"labels": labels})
            for i, labels in enumerate([["a"], ["a"], ["a", "b"], ["c"]])]
    w = balanced_weights(cuts, ["a", "b", "c"])
    assert w[0] == pytest.approx(1000 / 3.01)
    assert w[2] == pytest.approx(1000 / 3.01 + 1000 / 1.01)
    assert w[3] == pytest.approx(1000 / 1.01)


def test_balanced_sampler_draws_rare_classes_more(synth_corpus):
    cuts = CutSet.from_file(synth_corpus / "synth_train.jsonl.gz").to_eager()
    # make 'rain' rare: keep one rain clip, drop the other
    cuts = cuts.filter(lambda c: c.id != "synth-train-rain-0001").to_eager()
    weights = balanced_weights(cuts, [])
    loader = ClipLoader(cuts, ClipDataset(8000), 23, shuffle=True, drop_last=False, seed=0, rank=0,
                        world_size=1, weights=weights)
    drawn = [i for e in range(20) for b in loader.batches(start_epoch=e, epochs=1) for i in b.ids]
    rain = sum(i.startswith("synth-train-rain") for i in drawn) / len(drawn)
    assert rain == pytest.approx(1 / 12, abs=0.03)  # its one clip is drawn as often as two of any other class


@pytest.mark.slow
def test_stats_cli_and_shar_round_trip(synth_corpus, tmp_path, caplog):
    import json

    from common.audio.fbank import resolve_norm_stats
    from common.data.corpora.__main__ import main
    from common.data.corpora.stats import compute_stats

    manifest = tmp_path / "valid.jsonl.gz"
    shutil.copy(synth_corpus / "synth_valid.jsonl.gz", manifest)
    assert main(["stats", str(manifest), "--target-frames", "128", "--workers", "0"]) == 0
    saved = json.loads((tmp_path / "valid.stats.json").read_text())
    assert saved["clips"] == 12 and saved["target_frames"] == 128
    stats = resolve_norm_stats(str(tmp_path / "valid.stats.json"))
    # the same numbers by hand
    from common.audio.fbank import Fbank, pad_or_crop
    fb, feats = Fbank(), []
    for cut in CutSet.from_file(manifest):
        wave = torch.from_numpy(cut.load_audio()[0])[: fb.samples_for_frames(128)]
        feats.append(pad_or_crop(fb(wave[None]), 128))
    allf = torch.cat(feats).double()
    assert stats.mean == pytest.approx(allf.mean().item(), rel=1e-6)
    assert stats.std == pytest.approx(allf.std(unbiased=False).item(), rel=1e-6)
    assert compute_stats(manifest, target_frames=128, max_clips=3, workers=0)["clips"] == 3

    assert main(["shar", str(manifest), "--out", str(tmp_path / "shar"), "--shard-size", "5"]) == 0
    shar = open_cuts([str(tmp_path / "shar")])
    with caplog.at_level(logging.INFO, logger="common.data.manifests"):
        open_cuts([str(tmp_path / "shar")], in_memory_max=500000, index_dir=str(tmp_path / "index"))
    assert f"training set {tmp_path / 'shar'}, a Lhotse Shar folder (neither counted nor indexed): streamed" in \
        caplog.text and "larger than" not in caplog.text  # 12 clips: its size is not why
    loader = ClipLoader(shar, ClipDataset(16000), 4, shuffle=False, drop_last=False, rank=0, world_size=1)
    expected = sorted(c.id for c in CutSet.from_file(manifest))
    assert sorted(i for b in loader.batches(epochs=1) for i in b.ids) == expected


def test_a_truncated_shar_tar_is_named(synth_corpus, tmp_path):
    """A Shar tar cut short (an interrupted copy) raised tarfile's ReadError, naming no file, from the loader's
    sampler; it is a ValueError naming the tar and what to do."""
    from common.data.corpora.__main__ import main
    from common.data.shar_stream import _TarPairs

    assert main(["shar", str(synth_corpus / "synth_valid.jsonl.gz"), "--out", str(tmp_path / "shar"),
                 "--shard-size", "12"]) == 0
    tar = next((tmp_path / "shar").glob("recording.*.tar"))
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 100])
    pairs = _TarPairs(str(tar))
    with pytest.raises(ValueError, match=f"Shar tar {tar} cannot be read .*truncated or damaged copy"):
        while pairs.next(True) is not None:
            pass


def test_a_manifest_cut_short_or_with_a_line_of_no_clip_is_named(synth_corpus, tmp_path):
    """A .jsonl.gz copy cut short (an interrupted copy) gave gzip's EOFError traceback from the fingerprint, and a
    line that is not JSON in the middle 'Expecting value: line 1 column 1' (no file, no line) or, to a
    single-label task's label check, 'clips have no label': each names the manifest now (and the line)."""
    import gzip

    from common.config.recipe import RecipeError
    from common.data.fingerprint import fingerprint
    from common.data.preflight import check_labels

    source = synth_corpus / "synth_train.jsonl.gz"
    cut_short = tmp_path / "short.jsonl.gz"
    cut_short.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"manifest {cut_short} cannot be read to its end .*truncated or damaged"):
        fingerprint(cut_short)
    with pytest.raises(RecipeError, match=f"task.train.0: manifest {cut_short} cannot be read to its end"):
        check_labels(cut_short, "task.train.0", synth_corpus / "synth_classes.json", single_label=True)
    with pytest.raises(ValueError, match=f"manifest {cut_short} cannot be read to its end"):
        open_cuts([cut_short], in_memory_max=100000)
    lines = gzip.decompress(source.read_bytes()).decode().splitlines()
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress("\n".join([*lines[:5], "<<<<<<< HEAD", *lines[5:]]).encode()))
    with pytest.raises(RecipeError, match=f"task.train.0: {bad}: line 6 is not a clip's entry .*'<<<<<<< HEAD'"):
        check_labels(bad, "task.train.0", synth_corpus / "synth_classes.json", single_label=True)
    with pytest.raises(ValueError, match=f"manifest {bad}: the entry after clip 5 is not a clip"):
        open_cuts([bad], in_memory_max=100000)


def test_manifest_lines_of_no_clip_or_of_a_duration_that_is_no_number_are_named(synth_corpus, tmp_path):
    """A first line that is JSON but no clip ("recording": null) gave evaluate and embed an AttributeError traceback
    (Lhotse reads it to know the manifest's kind); a later one, embed a TypeError; a duration written as a string
    passed, and training stopped in Lhotse's sampler with a traceback. Each is one error naming the manifest."""
    import gzip
    import json

    from finetune.embed_inputs import list_clips

    lines = gzip.decompress((synth_corpus / "synth_valid.jsonl.gz").read_bytes()).decode().splitlines()

    def manifest(name: str, rows: list[str]):
        path = tmp_path / name
        path.write_bytes(gzip.compress("\n".join(rows).encode()))
        return path

    first = json.loads(lines[0])
    nothing = manifest("nothing.jsonl.gz", [json.dumps({**first, "recording": None}), *lines[1:]])
    with pytest.raises(ValueError, match=f"manifest {nothing} is not a readable Lhotse manifest \\(AttributeError"):
        open_cuts([nothing])
    listed = manifest("listed.jsonl.gz", [*lines[:2], "[1, 2]", *lines[2:]])
    clips, _ = list_clips([str(listed)])
    with pytest.raises(ValueError, match=f"--inputs {listed}: the entry after clip 2 is not a clip"):
        list(clips)
    text = manifest("text.jsonl.gz", [*lines[:3], json.dumps({**json.loads(lines[3]), "duration": "1.5"}),
                                      *lines[4:]])
    with pytest.raises(ValueError, match=f"manifest {text}: clip .*'s duration is str '1.5', not a number of "
                                         f"seconds"):
        open_cuts([text], in_memory_max=100000)
    blank = manifest("blank.jsonl.gz", [*lines[:3], "", *lines[3:]])  # read as a stream (evaluate, the probe)
    loader = ClipLoader(open_cuts([blank]), ClipDataset(16000), 2, shuffle=False, drop_last=False, rank=0,
                        world_size=1, tracker=BadAudioTracker(1.0, split="eval", source=[str(blank)]))
    with pytest.raises(ValueError, match=f"^{blank}: a line is not a clip's entry \\(JSONDecodeError: Expecting"):
        for _ in loader.batches(epochs=1):
            pass


@pytest.fixture(scope="module")
def class_sorted_manifest(tmp_path_factory):
    """40,000 clips of 500 classes, written class after class (as VoxCeleb's or SpeechCommands' source
    order); metadata only, no audio."""
    from lhotse import MonoCut

    classes, per_class = 500, 80
    cuts = CutSet.from_cuts(MonoCut(f"c{k:03d}-{i:02d}", 0, 1.0, 0, custom={"labels": [f"k{k:03d}"]})
                            for k in range(classes) for i in range(per_class))
    path = tmp_path_factory.mktemp("sorted") / "sorted.jsonl.gz"
    cuts.to_file(path)
    return path, classes, per_class


def _mixing(loader, epoch=0):
    """Mean distinct classes per batch, and the correlation of a clip's class with its position."""
    labels = [[int(c.custom["labels"][0][1:]) for c in cuts] for _, _, cuts in loader.cut_batches(epoch, 0, 1)]
    flat = np.concatenate(labels)
    return float(np.mean([len(set(b)) for b in labels])), float(np.corrcoef(np.arange(flat.size), flat)[0, 1])


@pytest.mark.slow
@pytest.mark.parametrize("where", ["memory", "index"])
def test_training_epochs_are_a_shuffle_of_the_whole_set(class_sorted_manifest, where, tmp_path):
    """In memory (up to data.full_shuffle_max clips) or through a manifest index on disk (larger sets: SSAST's
    AudioSet-2M + LibriSpeech), every epoch is a shuffle of the whole set, drawn from (seed, epoch)."""
    path, classes, per_class = class_sorted_manifest
    batch = 128
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    uniform = np.mean([len(set(p[i:i + batch])) for p in (labels[rng.permutation(labels.size)] for _ in range(3))
                       for i in range(0, p.size - batch + 1, batch)])  # about 113 of 128
    if where == "memory":
        cuts = open_cuts([path], in_memory_max=DataConfig().full_shuffle_max)  # the trainer's default
    else:  # a set larger than full_shuffle_max with the default data.shuffle: full
        cuts = open_cuts([path], in_memory_max=classes * per_class - 1, index_dir=str(tmp_path))
    assert not cuts.is_lazy and len(cuts) == classes * per_class
    loader = ClipLoader(cuts, ClipDataset(16000), batch, shuffle=True, drop_last=True, seed=3, rank=0,
                        world_size=1)
    for epoch in (0, 1):
        distinct, corr = _mixing(loader, epoch)
        assert distinct == pytest.approx(uniform, rel=0.03)  # a 20k-clip stream buffer gives ~104 (-8 %)
        assert abs(corr) < 0.05  # the buffer leaves position and class correlated (0.38)
    first = [c.id for _, _, b in loader.cut_batches(0, 0, 1) for c in b]
    assert first == [c.id for _, _, b in loader.cut_batches(0, 0, 1) for c in b]  # from (seed, epoch)
    second = [c.id for _, _, b in loader.cut_batches(1, 0, 1) for c in b]
    assert first != second
    assert abs(_position_correlation(first, second)) < 0.05  # a clip's place in one epoch says nothing of the next
    ranks = [[c.id for _, _, b in ClipLoader(cuts, ClipDataset(16000), batch, shuffle=True, drop_last=True, seed=3,
                                             rank=r, world_size=2).cut_batches(0, 0, 1) for c in b] for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and set(ranks[0]) | set(ranks[1]) <= set(first)


_INDEXING_JOB = """
import os, sys, time
from pathlib import Path
import common.data.manifest_index as manifest_index

folder, log, manifest, ranks = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])


def slowly(name, real):
    def run(*args):
        with open(log, "a") as f:
            f.write(name + "\\n")
        time.sleep(1.0)  # a long build: the other ranks arrive while it runs
        return real(*args)
    return run


manifest_index._build = slowly("index", manifest_index._build)
manifest_index._write_labels = slowly("labels", manifest_index._write_labels)
(folder.parent / f"ready{os.getpid()}").touch()
while len(list(folder.parent.glob("ready*"))) < ranks:  # every rank starts at once
    time.sleep(0.01)
index = manifest_index.ManifestIndex([manifest], folder)
print(len(index), len(index.labels()))
"""


@pytest.mark.parametrize("ranks", [2, 3])
def test_the_ranks_of_a_job_index_a_manifest_and_its_labels_once(synth_corpus, tmp_path, ranks):
    """On a first start every rank found no index and built its own copy (a GB each for AudioSet-2M, at once) and
    its own labels cache (a pass over 2 million records each): the first builds, the others wait and read it."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    train, log = synth_corpus / "synth_train.jsonl.gz", tmp_path / "built.log"
    jobs = [subprocess.Popen([sys.executable, "-c", _INDEXING_JOB, str(tmp_path / "index"), str(log), str(train),
                              str(ranks)], cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(ranks)]
    outs = [job.communicate(timeout=120)[0].split() for job in jobs]
    assert [job.returncode for job in jobs] == [0] * ranks
    clips = len(CutSet.from_file(train))
    assert outs == [[str(clips), str(clips)]] * ranks
    assert sorted(log.read_text().split()) == ["index", "labels"]


@pytest.mark.parametrize("read_only", [False, True])
def test_a_held_index_lock_is_waited_for_in_words_and_not_for_ever(synth_corpus, tmp_path, monkeypatch, caplog,
                                                                  read_only):
    """A rank that waits for another's build says so; a lock whose holder never lets go (a host that died with the
    folder on NFS) is waited for up to LOCK_WAIT_SECONDS, then the rank builds its own copy. Another user's lock
    file in a shared folder, which this process may not open for writing, still locks (opened read-only)."""
    import fcntl
    import os

    import common.data.manifest_index as manifest_index

    train, folder = synth_corpus / "synth_train.jsonl.gz", tmp_path / "index"
    folder.mkdir()
    key = f"synth_train-{manifest_index._key(train)}"
    holder = os.open(folder / f"{key}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process's build that never ends
    if read_only:
        real_open = os.open

        def open_(path, flags, *args):
            if str(path).endswith(".lock") and flags & os.O_RDWR:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args)

        monkeypatch.setattr(manifest_index.os, "open", open_)
    monkeypatch.setattr(manifest_index, "LOCK_WAIT_SECONDS", 0.3)
    with caplog.at_level(logging.INFO, logger="common.data.manifest_index"):
        index = manifest_index.ManifestIndex([train], folder)
    assert len(index) == len(CutSet.from_file(train))
    assert f"waiting for another process that builds the index of {train} (it holds {folder / (key + '.lock')})" \
        in caplog.text
    assert "building it here too" in caplog.text
    os.close(holder)


def _position_correlation(first: list[str], second: list[str]) -> float:
    """The correlation of the clips' positions in two epochs (over the clips both hold)."""
    where = {cid: i for i, cid in enumerate(second)}
    both = [(i, where[cid]) for i, cid in enumerate(first) if cid in where]
    return float(np.corrcoef(*zip(*both))[0, 1])


def test_a_manifest_index_reads_every_clip_and_is_built_once(synth_corpus, tmp_path, monkeypatch):
    import os
    import time

    import common.data.manifest_index as manifest_index
    from common.data.manifest_index import ManifestIndex

    pool, train = synth_corpus / "synth_pool.jsonl.gz", synth_corpus / "synth_train.jsonl.gz"
    builds = []
    build = manifest_index._build
    monkeypatch.setattr(manifest_index, "_build", lambda *a: (builds.append(a[0].name), build(*a)))
    index = ManifestIndex([pool, train], tmp_path / "index")
    expected = [c.to_dict() for m in (pool, train) for c in CutSet.from_file(m)]
    assert len(index) == len(expected) == 48 and [c.to_dict() for c in index] == expected
    assert index[30].to_dict() == expected[30] and builds == [pool.name, train.name]
    with pytest.raises(IndexError):
        index[48]
    ManifestIndex([train], tmp_path / "index")  # indexed already: read as it is
    assert builds == [pool.name, train.name]
    copy = tmp_path / "train.jsonl.gz"  # an edited manifest (another size or time) is indexed again
    CutSet.from_cuts(list(CutSet.from_file(train))[:5]).to_file(copy)
    assert len(ManifestIndex([copy], tmp_path / "index")) == 5
    balanced_weights(ManifestIndex([copy], tmp_path / "index"), [])  # its labels cached too
    (five,) = (tmp_path / "index").glob("train-*.source")
    CutSet.from_cuts(list(CutSet.from_file(train))[:7]).to_file(copy)
    assert len(ManifestIndex([copy], tmp_path / "index")) == 7 and builds[-2:] == [copy.name] * 2
    assert not list((tmp_path / "index").glob("*.tmp*"))  # written atomically: no temporary left
    # the 5-clip version is kept while a run may still read it (opened within a week), removed after
    assert len(list((tmp_path / "index").glob("train-*.jsonl"))) == 2
    week = manifest_index.UNUSED_SECONDS
    os.utime(five, (time.time() - week - 60,) * 2)
    assert len(ManifestIndex([copy], tmp_path / "index")) == 7
    # its copy, offsets and labels are gone; another manifest of the same name elsewhere is kept
    assert len(list((tmp_path / "index").glob("train-*.jsonl"))) == 1
    assert not list((tmp_path / "index").glob("train-*.labels.npz"))
    (tmp_path / "other").mkdir()
    CutSet.from_cuts(list(CutSet.from_file(train))[:3]).to_file(tmp_path / "other" / "train.jsonl.gz")
    assert len(ManifestIndex([tmp_path / "other" / "train.jsonl.gz"], tmp_path / "index")) == 3
    (elsewhere,) = [p for p in (tmp_path / "index").glob("train-*.source") if "other" in p.read_text()]
    os.utime(elsewhere, (time.time() - week - 60,) * 2)  # unopened for a week, but another manifest's
    assert len(ManifestIndex([copy], tmp_path / "index")) == 7 and builds[-1] == "train.jsonl.gz"
    assert len(list((tmp_path / "index").glob("train-*.jsonl"))) == 2 and len(builds) == 5
    with pytest.raises(ValueError, match="only a .jsonl\\(.gz\\) manifest can be indexed"):
        ManifestIndex([tmp_path], tmp_path / "index")


@pytest.mark.parametrize("damage", ["empty_offsets", "empty_lines", "short_lines"])
def test_a_damaged_manifest_index_is_built_again_and_stale_temporaries_go(synth_corpus, tmp_path, damage):
    """A crash can leave an index's files empty or short under their final names: the next run indexes the manifest
    again (it crashed in every run). A temporary file of a build killed hours ago is removed."""
    import os
    import time

    from common.data.manifest_index import ManifestIndex

    train = synth_corpus / "synth_train.jsonl.gz"
    expected = [c.id for c in ManifestIndex([train], tmp_path)]
    offsets = next(tmp_path.glob("*.offsets.npy"))
    lines = offsets.with_name(offsets.name.replace(".offsets.npy", ".jsonl"))
    target = offsets if damage == "empty_offsets" else lines
    target.write_bytes(b"" if damage.startswith("empty") else target.read_bytes()[:100])
    stale, fresh = tmp_path / ".x.jsonl.c2f-0a1b2c3d.tmp", tmp_path / ".y.jsonl.c2f-4e5f6a7b.tmp"
    # not the index's: another program's temporary file, and anything in a folder below (data.index_dir: ~)
    (tmp_path / "project").mkdir()
    foreign = [tmp_path / ".draft.docx.k3j9x0qz.tmp", tmp_path / "project" / ".report.c2f-ab12cd34.tmp"]
    for tmp in (stale, fresh, *foreign):
        tmp.write_bytes(b"partial")
        os.utime(tmp, (time.time() - 7 * 3600,) * 2 if tmp != fresh else None)
    assert [c.id for c in ManifestIndex([train], tmp_path)] == expected
    assert not stale.exists() and fresh.exists()  # another host's build may still be writing a recent one
    assert all(p.exists() for p in foreign)


def test_a_manifest_is_counted_once_until_it_changes(synth_corpus, tmp_path, monkeypatch):
    """A start's checks count the clips of a manifest several times (AudioSet-2M's: six passes over the file): the
    whole count is kept for the file as it is, and a rewritten manifest is counted again."""
    import os

    import common.data.manifest_lines as manifest_lines

    path = tmp_path / "train.jsonl.gz"
    cuts = list(CutSet.from_file(synth_corpus / "synth_train.jsonl.gz"))
    CutSet.from_cuts(cuts[:7]).to_file(path)
    opened = []
    real = manifest_lines.open_lines
    monkeypatch.setattr(manifest_lines, "open_lines", lambda p: (opened.append(p), real(p))[1])
    assert count_clips(path, limit=3) == 4 and count_clips(path) == 7 and len(opened) == 2  # a limited count: not all
    assert count_clips(path) == 7 and count_clips(path, limit=3) == 4 and count_clips(path, limit=7) == 7
    assert len(opened) == 2
    CutSet.from_cuts(cuts[:5]).to_file(path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))  # another time, surely
    assert count_clips(path) == 5 and len(opened) == 3


def test_only_small_equal_weight_sets_are_read_into_memory(class_sorted_manifest, synth_corpus):
    path, classes, per_class = class_sorted_manifest
    assert count_clips(path) == classes * per_class and count_clips(path, limit=100) == 101
    assert open_cuts([path], in_memory_max=classes * per_class - 1).is_lazy  # too large: streamed
    assert open_cuts([path]).is_lazy
    pool, train = synth_corpus / "synth_pool.jsonl.gz", synth_corpus / "synth_train.jsonl.gz"
    mixed = open_cuts([ManifestSpec(str(pool)), ManifestSpec(str(train))], in_memory_max=1000)
    assert not mixed.is_lazy and len(mixed) == 48
    assert open_cuts([ManifestSpec(str(pool), 3.0), ManifestSpec(str(train))], in_memory_max=1000).is_lazy


def test_training_crops_cut_from_the_start_unless_asked(synth_corpus):
    cut = next(c for c in CutSet.from_file(synth_corpus / "synth_train.jsonl.gz") if c.duration > 1.5)
    full = torch.from_numpy(cut.load_audio()[0])
    assert DataConfig().train_crop == "start"
    start = ClipDataset(8000, crop=DataConfig().train_crop, seed=0)
    for epoch in (0, 1):
        assert torch.equal(start[(epoch, 0, CutSet([cut]))].waveforms[0], full[:8000])
    random = ClipDataset(8000, crop="random", seed=0)
    assert not torch.equal(random[(0, 0, CutSet([cut]))].waveforms[0], full[:8000])


@pytest.mark.parametrize("train_crop", ["start", "random"])
def test_the_trainer_crops_training_clips_as_the_data_config_says(tmp_path, synth_corpus, tiny_cfg, train_crop):
    from common.audio.pipeline import AudioConfig
    from common.phases.config import PhaseConfig, TransferConfig
    from common.system.distributed import Dist
    from common.training.loop import Trainer
    from common.training.optim import OptimConfig
    from common.training.spec import RunSpec, TrainConfig
    from finetune.classifier import AugmentConfig, ClassifierObjective

    classes, _ = read_classes(synth_corpus / "synth_classes.json")
    data = DataConfig(train=[ManifestSpec(str(synth_corpus / "synth_train.jsonl.gz"))],
                      valid=[str(synth_corpus / "synth_valid.jsonl.gz")], batch_size=4, num_workers=0,
                      **({} if train_crop == "start" else {"train_crop": train_crop}))
    spec = RunSpec(run_dir=tmp_path, base=tiny_cfg, audio=AudioConfig(num_mel_bins=32, target_frames=64),
                   phases=[PhaseConfig(epochs=1)], transfer=TransferConfig(), optim=OptimConfig(),
                   train=TrainConfig(), data=data)
    trainer = Trainer(spec, ClassifierObjective(classes, "acc", "ce", AugmentConfig()),
                      Dist(0, 1, 0, torch.device("cpu")))
    train, valid = trainer._train_loader(0), trainer._eval_loader(0)
    assert (train.dataset.crop, valid.dataset.crop) == (train_crop, "start")
    assert not train.cuts.is_lazy  # small: shuffled as a whole every epoch
    trainer.scalars.close()


def _ids_and_audio(batches) -> list:
    return [(b.epoch, b.index, list(b.ids), b.waveforms.clone()) for b in batches]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a, b))


@pytest.mark.timeout(120)
def test_a_kept_loader_serves_every_phase_with_the_same_workers(synth_corpus):
    """One loader for a run's phases: its worker processes start once and stay (another batch size, another
    position: the next phase), its batches are those of a loader made afresh per phase, an iteration a newer
    call ended refuses to go on, and close() stops the workers."""
    import dataclasses
    import itertools
    import multiprocessing

    classes, _ = read_classes(synth_corpus / "synth_classes.json")
    data = DataConfig(train=[ManifestSpec(str(synth_corpus / "synth_train.jsonl.gz"))], batch_size=4,
                      num_workers=1, train_crop="random")

    def loader(batch, workers, keep):
        return train_loader(dataclasses.replace(data, num_workers=workers), classes, 8000, 16000, batch, 0, 0, 1,
                            BadAudioTracker(), keep_workers=keep)

    before = set(multiprocessing.active_children())
    kept = loader(4, 1, True)
    first = kept.batches()
    phase1 = _ids_and_audio(itertools.islice(first, 3))
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 1
    kept.batch_size = 2  # the next phase: another batch size, from where the first stopped
    second = kept.batches(phase1[-1][0], phase1[-1][1] + 1)
    with pytest.raises(RuntimeError, match="ended by a newer call"):
        next(first)
    phase2 = _ids_and_audio(itertools.islice(second, 5))
    assert set(multiprocessing.active_children()) - before == workers  # the same process
    assert len(phase2[0][2]) == 2

    fresh1 = _ids_and_audio(itertools.islice(loader(4, 0, False).batches(), 3))
    fresh2 = _ids_and_audio(itertools.islice(loader(2, 0, False).batches(phase1[-1][0], phase1[-1][1] + 1), 5))
    assert _same(phase1, fresh1) and _same(phase2, fresh2)

    kept.close()
    second.close()
    worker = next(iter(workers))
    worker.join(timeout=30)
    assert not worker.is_alive()


def test_repeat_padding_fills_a_short_clip_with_itself():
    wave = np.arange(1, 4, dtype=np.float32)  # 3 samples
    dataset = ClipDataset(8, pad="repeat")
    assert dataset._crop(wave, "c", 0).tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    assert ClipDataset(8)._crop(wave, "c", 0).tolist() == [1, 2, 3]  # zeros: padded later, in the batch
    with pytest.raises(ValueError, match="unknown pad"):
        ClipDataset(8, pad="mirror")


@pytest.mark.parametrize("workers,keep", [(0, False), (1, False), (1, True)])
def test_iterating_a_loader_leaves_the_global_rng_alone(synth_corpus, workers, keep):
    """Dropout and stochastic depth draw from torch's global RNG, which checkpoints save; a loader starting an
    iteration (a DataLoader draws its workers' seed) must not move it, or a resumed run drops other units."""
    import itertools

    classes, _ = read_classes(synth_corpus / "synth_classes.json")
    data = DataConfig(train=[ManifestSpec(str(synth_corpus / "synth_train.jsonl.gz"))], batch_size=4,
                      num_workers=workers)
    loader = train_loader(data, classes, 8000, 16000, 4, 0, 0, 1, BadAudioTracker(), keep_workers=keep)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    try:
        for start in (0, 1):  # a first iteration, and another (a kept loader's workers go on)
            batches = loader.batches(0, start)
            list(itertools.islice(batches, 2))
            assert torch.equal(torch.get_rng_state(), state)
    finally:
        batches.close()
        loader.close()


def test_a_stereo_file_is_read_as_each_familys_official_code_reads_it(tmp_path):
    """`data.channels`: the AST family's kaldi.fbank reads the first channel, HTS-AT's official packing the mean
    (`librosa.load(mono=True)`); `auto` picks the architecture's; the clip cache keeps the two apart; predict reads
    a file the same way."""
    from lhotse import MonoCut, Recording

    from common.data.audio_file import load_audio
    from common.data.cache import make_cache
    from common.data.decode import load_clip
    from common.models.arch import architecture_for
    from common.models.ast.encoder import EncoderConfig
    from common.models.htsat import HTSATConfig
    from finetune.inference import clip_handling

    left = 0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, 0.5 * np.ones_like(left)], axis=1).astype(np.float32), 16000)
    rec = Recording.from_file(path)
    cut = MonoCut(id="s", start=0.0, duration=rec.duration, channel=0, recording=rec)  # as prepare writes them
    first, mean = load_clip(cut, 16000), load_clip(cut, 16000, "mean")
    assert np.allclose(first, left, atol=1e-4) and np.allclose(mean, (left + 0.5) / 2, atol=1e-4)
    resampled = load_clip(cut, 8000, "mean"), load_clip(cut, 8000)  # the filter's edges aside, the same mixdown
    assert np.allclose(resampled[0][200:-200], (resampled[1][200:-200] + 0.5) / 2, atol=2e-3)
    assert np.allclose(load_audio(path, 16000, "mean"), mean) and np.allclose(load_audio(path, 16000), first)
    mono = MonoCut(id="m", start=0.0, duration=rec.duration, channel=0,
                   recording=Recording.from_file(sf.write(str(tmp_path / "m.wav"), left, 16000) or tmp_path / "m.wav"))
    assert np.array_equal(load_clip(mono, 16000, "mean"), load_clip(mono, 16000))  # one channel: itself

    cache = make_cache("memory")
    for channels in ("first", "mean", "first"):
        wave = ClipDataset(8000, channels=channels, cache=cache)[(0, 0, [cut])].waveforms[0].numpy()
        assert np.allclose(wave, first if channels == "first" else mean, atol=1e-4)
    assert (cache.misses, cache.hits) == (2, 1)  # the mean is no hit for the first channel
    with pytest.raises(ValueError, match="unknown channels"):
        ClipDataset(8000, channels="left")

    ast, htsat = architecture_for(EncoderConfig()), architecture_for(HTSATConfig())
    assert (DataConfig().channels_for(ast), DataConfig().channels_for(htsat)) == ("first", "mean")
    assert DataConfig(channels="first").channels_for(htsat) == "first"
    assert clip_handling({"clips": {"channels": "mean"}})["channels"] == "mean"  # an export's record
    assert clip_handling({"source": "export", "arch": "htsat"})["channels"] == "first"  # trained before the record
    assert clip_handling({"source": "official", "arch": "htsat"})["channels"] == "mean"


def test_the_mean_takes_the_channels_a_cut_stands_for_and_old_recipes_resume(tmp_path):
    """A whole file's cut (prepare's first channel) mixes down every channel; a cut of chosen channels those; a cut
    of another single channel that one; a padded cut (no recording of its own) is read, not dropped. A run whose
    recipe.yaml predates data.channels resumes where `auto` reads as it did (the AST family), and an HTS-AT one is
    told what changed (`--set data.channels=first` keeps the old)."""
    from lhotse import MonoCut, MultiCut, Recording

    from common.data.decode import load_clip
    from common.training.run_recipe import recipe_diff

    rows = np.stack([np.full(4000, v, dtype=np.float32) for v in (0.1, 0.2, 0.3, 0.6)], axis=1)
    sf.write(str(tmp_path / "four.wav"), rows, 16000, subtype="FLOAT")
    rec = Recording.from_file(tmp_path / "four.wav")
    whole = MonoCut(id="w", start=0.0, duration=rec.duration, channel=0, recording=rec)
    assert np.allclose(load_clip(whole, 16000, "mean"), 0.3) and np.allclose(load_clip(whole, 16000), 0.1)
    two = MultiCut(id="t", start=0.0, duration=rec.duration, channel=[0, 1], recording=rec)
    assert np.allclose(load_clip(two, 16000, "mean"), 0.15)
    third = MonoCut(id="c", start=0.0, duration=rec.duration, channel=2, recording=rec)
    assert np.allclose(load_clip(third, 16000, "mean"), 0.3) and np.allclose(load_clip(third, 16000), 0.3)
    padded = whole.pad(duration=0.5)
    assert load_clip(padded, 16000, "mean").size == 8000  # read as Lhotse mixes it, not a bad clip

    old = {"model": {"arch": "ast"}, "data": {"pad": "zeros"}}
    assert recipe_diff(old, {"model": {"arch": "ast"}, "data": {"pad": "zeros", "channels": "auto"}}) == []
    htsat = {"model": {"arch": "htsat"}, "data": {"pad": "zeros"}}
    assert recipe_diff(htsat, {"model": {"arch": "htsat"}, "data": {"pad": "zeros", "channels": "auto"}}) == \
        ["data.channels"]
    assert recipe_diff(htsat, {"model": {"arch": "htsat"}, "data": {"pad": "zeros", "channels": "first"}}) == []


@pytest.mark.parametrize("where", ["memory", "index", "buffer"])
def test_balanced_sampling_reaches_every_way_a_training_set_is_read(tmp_path, where):
    """AST's balanced sampling (data.balanced) weighs the clips whether the set is held in memory, indexed on disk
    (AudioSet-2M's default) or streamed: a class of 5 clips among 95 is drawn about as often as the other."""
    from lhotse import MonoCut

    from common.data.bad_audio import BadAudioTracker
    from common.data.config import DataConfig, ManifestSpec
    from common.data.loader import train_loader

    cuts = CutSet.from_cuts(MonoCut(f"c{i:03d}", 0, 1.0, 0, custom={"labels": ["rare" if i < 5 else "common"]})
                            for i in range(100))
    path = tmp_path / "train.jsonl.gz"
    cuts.to_file(path)
    data = DataConfig(train=[ManifestSpec(str(path))], balanced=True, shuffle="buffer" if where == "buffer" else "full",
                      full_shuffle_max=1000 if where == "memory" else 50, index_dir=str(tmp_path / "index"))
    loader = train_loader(data, ["common", "rare"], 16000, 16000, 10, seed=0, rank=0, world_size=1,
                          tracker=BadAudioTracker(1.0))
    drawn = [c.custom["labels"][0] for epoch in range(10) for _, _, batch in loader.cut_batches(epoch, 0, 1)
             for c in batch]
    assert drawn.count("rare") / len(drawn) == pytest.approx(0.5, abs=0.1)  # unweighted: 0.05


def test_balanced_batches_of_an_index_are_read_only_on_the_rank_that_keeps_them(tmp_path, monkeypatch):
    """Balanced draws from an on-disk index (AudioSet-2M's path) are clip numbers: a rank builds the cuts of its own
    batches only, not every rank's (a JSON parse per clip: about a minute an epoch per rank at 2 million)."""
    from lhotse import MonoCut

    from common.data.manifest_index import ManifestIndex

    path = tmp_path / "train.jsonl.gz"
    CutSet.from_cuts(MonoCut(f"c{i:03d}", 0, 1.0, 0, custom={"labels": [f"k{i % 4}"]}) for i in range(96)).to_file(path)
    index = ManifestIndex([path], tmp_path / "index")
    weights = balanced_weights(index, [])
    reads = []
    real = ManifestIndex.__getitem__
    monkeypatch.setattr(ManifestIndex, "__getitem__", lambda self, i: (reads.append(i), real(self, i))[1])
    loader = ClipLoader(index, ClipDataset(16000), 8, shuffle=True, drop_last=True, seed=0, rank=1, world_size=2,
                        weights=weights)
    kept = [c.id for _, _, batch in loader.cut_batches(0, 0, 1) for c in batch]
    assert len(kept) == 48 and len(reads) == 48  # its 6 batches of 8, of the 12 drawn
    reads.clear()
    assert len([c for _, _, batch in loader.cut_batches(0, 3, 1) for c in batch]) == 24 and len(reads) == 24


def test_balanced_weights_of_an_index_are_read_from_its_labels_cache_after_the_first_start(tmp_path, monkeypatch,
                                                                                           caplog):
    """The labels of an indexed manifest are read from its records once, then from ``<manifest>.labels.npz`` in the
    index folder (every rank at every start read AudioSet-2M's 2 million records, about a minute): the same weights;
    an edited manifest is read again, a damaged cache is said and read again."""
    import json as json_module

    from lhotse import MonoCut

    from common.data import manifest_index
    from common.data.manifest_index import ManifestIndex

    def write(count: int) -> None:
        CutSet.from_cuts(MonoCut(f"c{i:03d}", 0, 1.0, 0, custom={"labels": [f"k{i % 3}", "all"][: 1 + (i % 2)]}
                                 if i % 5 else {}) for i in range(count)).to_file(path)

    path, folder = tmp_path / "train.jsonl.gz", tmp_path / "index"
    write(40)
    expected = balanced_weights(CutSet.from_file(path), [])
    assert balanced_weights(ManifestIndex([path], folder), []) == expected
    (cache,) = folder.glob("train-*.labels.npz")
    parsed = []
    real_loads = json_module.loads
    monkeypatch.setattr(manifest_index.json, "loads",  # a manifest's records (bytes), not the cache's name table
                        lambda text: (isinstance(text, bytes) and parsed.append(1)) or real_loads(text))
    assert balanced_weights(ManifestIndex([path], folder), []) == expected and parsed == []
    write(30)  # edited: another index, its own labels
    edited = balanced_weights(CutSet.from_file(path), [])
    assert balanced_weights(ManifestIndex([path], folder), []) == edited
    (newest,) = set(folder.glob("train-*.labels.npz")) - {cache}  # the earlier version's stays for a week
    assert len(parsed) == 30 and cache.exists()
    whole = newest.read_bytes()
    mid = len(whole) // 2  # inside an array's bytes: the zip's CRC says so
    for damaged in (b"not a cache", b"", whole[:mid], whole[:mid] + bytes([whole[mid] ^ 0xFF]) + whole[mid + 1:]):
        newest.write_bytes(damaged)
        parsed.clear()
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert balanced_weights(ManifestIndex([path], folder), []) == edited
        assert len(parsed) >= 30 and f"the cached labels {newest} are damaged" in caplog.text
        parsed.clear()
        assert balanced_weights(ManifestIndex([path], folder), []) == edited and parsed == []  # written again
    # labels as the manifest has them, whatever they are
    from lhotse import MonoCut as Cut

    CutSet.from_cuts(Cut(f"d{i}", 0, 1.0, 0, custom={"labels": [["x\x00", 7, "7", "é\tz"][i % 4]]})
                     for i in range(8)).to_file(path)
    first = ManifestIndex([path], folder).labels()
    assert first == ManifestIndex([path], folder).labels() == [(["x\x00", 7, "7", "é\tz"][i % 4],) for i in range(8)]


def test_a_file_that_is_no_manifest_by_its_name_is_named_so(tmp_path):
    """An audio file or a README given where a manifest goes: said as such (Lhotse's 'does the path exist?' was
    printed for a path that exists), with the command that scores audio files for audio."""
    from common.data.manifests import manifest_problem, open_cuts

    (tmp_path / "dog.wav").write_bytes(b"RIFF")
    (tmp_path / "README.md").write_text("# notes\n")
    assert manifest_problem(tmp_path / "dog.wav").endswith("; to score audio files use predict.py")
    assert manifest_problem(tmp_path / "README.md").startswith("is not a Lhotse manifest (a .jsonl.gz of cuts")
    with pytest.raises(ValueError, match=r"README.md: is not a Lhotse manifest"):
        open_cuts([tmp_path / "README.md"])


def test_labels_that_cannot_be_cached_are_read_from_the_manifest(synth_corpus, tmp_path, monkeypatch, caplog):
    """The labels cache is only a cache: in an index folder we may not write (another user's), or on a full disk,
    the labels are read from the manifest, with a warning naming the file (it stopped the run)."""
    import logging

    import common.data.manifest_index as manifest_index
    from common.data.manifest_index import ManifestIndex

    train = synth_corpus / "synth_train.jsonl.gz"
    expected = [tuple(c.custom["labels"]) for c in CutSet.from_file(train)]
    index = ManifestIndex([train], tmp_path / "index")

    def refused(path, *args, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(manifest_index, "_write_labels", refused)
    with caplog.at_level(logging.WARNING):
        assert index.labels() == expected
    assert any("could not cache the labels in" in r.getMessage() and "Permission denied" in r.getMessage()
               for r in caplog.records)
    assert not list((tmp_path / "index").glob("*.labels.npz"))


def test_a_manifest_index_in_a_folder_shared_with_other_users_opens_without_touching_their_files(
        synth_corpus, tmp_path, monkeypatch):
    """Another user's ``.source`` (0644) cannot be touched, nor their unused index removed where the folder is not
    ours to write: both are bookkeeping of the one-week eviction, and the run goes on (it stopped every run but the
    owner's). Where the folder lets us, the ``.source`` is written again, so that it still says the index is used."""
    import os
    import time

    import common.data.manifest_index as manifest_index
    from common.data.manifest_index import ManifestIndex

    train = synth_corpus / "synth_train.jsonl.gz"
    folder = tmp_path / "index"
    expected = [c.id for c in ManifestIndex([train], folder)]
    (source,) = folder.glob("*.source")
    os.utime(source, (time.time() - 3 * 86400,) * 2)

    def not_permitted(path, *args, **kw):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(manifest_index.os, "utime", not_permitted)
    assert [c.id for c in ManifestIndex([train], folder)] == expected
    assert time.time() - source.stat().st_mtime < 60  # written again: the folder is ours to write
    monkeypatch.undo()
    os.utime(source, (time.time() - 3 * 86400,) * 2)
    monkeypatch.setattr(manifest_index.os, "utime", not_permitted)
    real_path = manifest_index.atomic_path
    monkeypatch.setattr(manifest_index, "atomic_path", lambda path, *a, **kw: (
        not_permitted(path) if path.suffix == ".source" else real_path(path, *a, **kw)))
    assert [c.id for c in ManifestIndex([train], folder)] == expected  # nor that: left as it is
    assert time.time() - source.stat().st_mtime > 2 * 86400
    # an earlier version unused for a week, in a folder we may not remove from: left to its owner
    monkeypatch.undo()
    copy = tmp_path / "train.jsonl.gz"
    CutSet.from_cuts(list(CutSet.from_file(train))[:3]).to_file(copy)
    ManifestIndex([copy], folder)
    (old,) = folder.glob("train-*.source")
    os.utime(old, (time.time() - manifest_index.UNUSED_SECONDS - 60,) * 2)
    CutSet.from_cuts(list(CutSet.from_file(train))[:4]).to_file(copy)
    real_unlink = manifest_index.Path.unlink
    monkeypatch.setattr(manifest_index.Path, "unlink", lambda self, *a, **kw: (
        not_permitted(self) if self.parent == folder else real_unlink(self, *a, **kw)))
    assert len(ManifestIndex([copy], folder)) == 4
    monkeypatch.undo()
    assert len(list(folder.glob("train-*.jsonl"))) == 2  # the earlier copy stays


def test_an_index_read_for_weeks_is_not_taken_for_unused(synth_corpus, tmp_path, monkeypatch):
    """The one-week eviction of an earlier version's index reads when its ``.source`` was touched: a run that keeps
    reading its clips touches it (every hour), so an index a run has read for over a week without reopening it is
    not removed when the manifest is prepared again and the new version opened (it was, under the run)."""
    import os
    import time

    import common.data.manifest_index as manifest_index
    from common.data.manifest_index import ManifestIndex

    copy, folder = tmp_path / "train.jsonl.gz", tmp_path / "index"
    clips = list(CutSet.from_file(synth_corpus / "synth_train.jsonl.gz"))
    CutSet.from_cuts(clips[:5]).to_file(copy)
    running = ManifestIndex([copy], folder)  # a run that opened it eight days ago and reads it since
    (source,) = folder.glob("train-*.source")
    os.utime(source, (time.time() - manifest_index.UNUSED_SECONDS - 86400,) * 2)
    now = time.monotonic()
    monkeypatch.setattr(manifest_index.time, "monotonic", lambda: now + manifest_index.TOUCH_SECONDS + 1)
    assert running[3].id == clips[3].id
    assert time.time() - source.stat().st_mtime < 60
    monkeypatch.undo()
    assert running[4].id == clips[4].id  # touched once an hour, not at every clip
    CutSet.from_cuts(clips[:6]).to_file(copy)  # prepared again; another run opens the new version
    assert len(ManifestIndex([copy], folder)) == 6
    assert source.is_file() and len(list(folder.glob("train-*.jsonl"))) == 2
    assert [running[i].id for i in range(5)] == [c.id for c in clips[:5]]


def test_clip_ids_that_repeat_in_a_set_read_into_memory_are_said(tmp_path, synth_corpus, caplog):
    """A hand-merged manifest or one listed twice repeats clip ids: the run says how many and the first (each copy
    trains as a clip of its own, while the bad-audio counts and SSAST's validation masks go by id); unique ids
    are quiet."""
    source = synth_corpus / "synth_valid.jsonl.gz"
    cuts = list(CutSet.from_file(source))
    merged = tmp_path / "merged.jsonl.gz"
    CutSet.from_cuts(cuts + cuts[:2]).to_file(merged)
    for specs, said in (([source], None), ([merged], f"{merged}: 2 clip id(s) appear more than once ({cuts[0].id} 2 "
                                                      f"times, ...)"),
                        ([source, source], f"{source}, {source}: 12 clip id(s)")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="common.data.manifests"):
            assert len(open_cuts([ManifestSpec(str(p)) for p in specs], in_memory_max=1000)) == \
                sum(len(CutSet.from_file(p)) for p in specs)
        warned = [r.getMessage() for r in caplog.records if "appear more than once" in r.getMessage()]
        assert (warned == []) if said is None else (len(warned) == 1 and warned[0].startswith(said)), warned
