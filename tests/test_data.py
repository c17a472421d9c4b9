import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet

from common.corpora.base import read_classes
from common.data import (
    BadAudioTracker,
    ClipDataset,
    ClipLoader,
    ManifestSpec,
    TooMuchBadAudio,
    balanced_weights,
    open_cuts,
)


def make_loader(manifest, batch_size=4, **kw):
    cuts = open_cuts([manifest])
    classes = kw.pop("classes", None)
    dataset = ClipDataset(kw.pop("clip_samples", 16000), classes=classes, crop=kw.pop("crop", "random"), seed=1)
    kw.setdefault("shuffle", True)
    kw.setdefault("drop_last", True)
    return ClipLoader(cuts, dataset, batch_size, seed=7, rank=kw.pop("rank", 0),
                      world_size=kw.pop("world_size", 1), **kw)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(synth_corpus, workers):
    manifest = synth_corpus / "synth_train.jsonl.gz"  # 24 clips -> 6 batches per epoch
    straight = take(make_loader(manifest, num_workers=workers).batches(), 15)  # crosses two epochs
    first = take(make_loader(manifest, num_workers=workers).batches(), 8)
    position = (first[-1].epoch, first[-1].index + 1)  # what was trained on, not what was prefetched
    rest = take(make_loader(manifest, num_workers=workers).batches(*position), 7)
    for a, b in zip(straight, first + rest):
        assert a.ids == b.ids and (a.epoch, a.index) == (b.epoch, b.index)
        assert torch.equal(a.waveforms, b.waveforms)  # random crops included
    assert [b.epoch for b in straight] == [0] * 6 + [1] * 6 + [2] * 3
    assert straight[0].ids != straight[6].ids  # reshuffled per epoch


def test_ranks_get_disjoint_shards(synth_corpus):
    manifest = synth_corpus / "synth_train.jsonl.gz"
    ids = []
    for rank in (0, 1):
        loader = make_loader(manifest, batch_size=3, rank=rank, world_size=2, drop_last=False)
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
    with pytest.raises(FileNotFoundError, match=r"python -m common.corpora prepare NAME"):
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


def test_stats_cli_and_shar_round_trip(synth_corpus, tmp_path):
    import json

    from common.corpora.__main__ import main
    from common.corpora.stats import compute_stats
    from common.frontend import resolve_norm_stats

    manifest = tmp_path / "valid.jsonl.gz"
    shutil.copy(synth_corpus / "synth_valid.jsonl.gz", manifest)
    assert main(["stats", str(manifest), "--target-frames", "128", "--workers", "0"]) == 0
    saved = json.loads((tmp_path / "valid.stats.json").read_text())
    assert saved["clips"] == 12 and saved["target_frames"] == 128
    stats = resolve_norm_stats(str(tmp_path / "valid.stats.json"))
    # the same numbers by hand
    from common.frontend import Fbank, pad_or_crop
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
    loader = ClipLoader(shar, ClipDataset(16000), 4, shuffle=False, drop_last=False, rank=0, world_size=1)
    expected = sorted(c.id for c in CutSet.from_file(manifest))
    assert sorted(i for b in loader.batches(epochs=1) for i in b.ids) == expected
