"""Clips resampled up to a model's higher rate (16 kHz clips into HTS-AT's 32 kHz front end): counted per batch in
the loader, said once per run, summed over ranks (2 and 3 on gloo) into ledger.json."""

import json
import logging
from pathlib import Path

import pytest
import torch
from lhotse import CutSet

from common.data.bad_audio import BadAudioTracker
from common.data.clips import Batch, ClipDataset
from common.training.ledger import Ledger
from finetune.run import main as finetune
from tests.helpers import _synth_root, sets

ROOT = Path(__file__).resolve().parents[2]


def batch(upsampled: dict, clips: int = 4) -> Batch:
    return Batch(torch.zeros(clips, 8), torch.full((clips,), 8), None, [f"c{i}" for i in range(clips)],
                 upsampled=upsampled)


@pytest.mark.parametrize("rate, expected", [(32000, {(16000, 32000): 5}), (16000, {}), (8000, {})])
def test_the_loader_counts_the_clips_it_resamples_up(synth_corpus, rate, expected):
    cuts = CutSet.from_file(synth_corpus / "synth_train.jsonl.gz").to_eager().subset(first=5)
    assert {c.sampling_rate for c in cuts} == {16000}
    out = ClipDataset(int(1.27 * rate), rate)[(0, 0, cuts)]
    assert len(out) == 5 and out.upsampled == expected  # down to 8 kHz loses nothing the model sees
    assert out.waveforms.shape == (5, int(1.27 * rate))


def test_it_is_said_once_per_run_and_counted_per_split(caplog, tmp_path):
    tracker = BadAudioTracker(1.0, log_path=str(tmp_path / "bad_audio.tsv"))  # a run's (common.training.record)
    valid = tracker.for_split("valid")
    with caplog.at_level(logging.WARNING, logger="common.data.bad_audio"):
        tracker.update(batch({(16000, 32000): 3}))
        tracker.update(batch({(16000, 32000): 4, (22050, 32000): 1}, clips=5))
        valid.update(batch({(16000, 32000): 2}))
    said = [r.getMessage() for r in caplog.records if "resampling clips up" in r.getMessage()]
    assert said == ["resampling clips up to the model's 32000 Hz (3 at 16000 Hz of the first 4 train clips): they "
                    "hold nothing above 8000 Hz, so the model's upper frequency bins stay empty for them; "
                    "ledger.json counts them (upsampled)"]
    assert tracker.take_upsampled() == {"train": {(16000, 32000): 7, (22050, 32000): 1},
                                        "valid": {(16000, 32000): 2}}
    assert tracker.take_upsampled() == {}  # handed out once
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.data.bad_audio"):  # a command's (evaluate, stats): no ledger
        BadAudioTracker(1.0, split="esc50_test").update(batch({(16000, 32000): 3}))
    assert caplog.records[0].getMessage().endswith("of the first 4 esc50_test clips): they hold nothing above 8000 "
                                                    "Hz, so the model's upper frequency bins stay empty for them")
    # a resumed run keeps the counts and does not say it again
    resumed = BadAudioTracker(1.0)
    resumed.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert resumed.upsampled == tracker.upsampled
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.data.bad_audio"):
        resumed.update(batch({(16000, 32000): 1}))
    assert not caplog.records and resumed.take_upsampled() == {"train": {(16000, 32000): 1}}


def test_the_ledger_keeps_the_counts_through_its_file():
    ledger = Ledger("acc")
    ledger.add_upsampled({"train": {(16000, 32000): 7}, "valid": {(16000, 32000): 2}})
    ledger.add_upsampled({"train": {(16000, 32000): 1}})
    data = json.loads(json.dumps(ledger.to_dict()))
    assert data["upsampled"] == [{"split": "train", "from_hz": 16000, "to_hz": 32000, "clips": 8},
                                 {"split": "valid", "from_hz": 16000, "to_hz": 32000, "clips": 2}]
    assert Ledger.from_dict(data).to_dict()["upsampled"] == data["upsampled"]
    assert "upsampled" not in Ledger("acc").to_dict()


def _rank(dist) -> dict:
    """Rank r resamples up r + 1 clips per batch of 2 batches, at 16 kHz, and rank 2 also one at 22.05 kHz."""
    rank = dist.rank
    tracker = BadAudioTracker(1.0)
    for _ in range(2):
        tracker.update(batch({(16000, 32000): rank + 1, **({(22050, 32000): 1} if rank == 2 else {})}))
    tracker.for_split("valid").update(batch({(16000, 32000): 1}))
    first = tracker.take_upsampled(dist)
    second = tracker.take_upsampled(dist)  # nothing new on any rank
    return {"first": {s: sorted([*k, n] for k, n in v.items()) for s, v in first.items()}, "second": second}


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_every_ranks_counts_are_summed(tmp_path, world):
    from tests.ranks import spawn_ranks

    results = spawn_ranks(_rank, world, tmp_path)
    assert all(r == results[0] for r in results)  # every rank gets the sum
    clips = 2 * sum(r + 1 for r in range(world))
    train = [[16000, 32000, clips]] + ([[22050, 32000, 2]] if world == 3 else [])
    assert results[0] == {"first": {"train": train, "valid": [[16000, 32000, world]]}, "second": {}}


@pytest.mark.slow
def test_a_run_at_32_khz_on_16_khz_clips_says_so_once_and_counts_them(tmp_path, synth_corpus):
    """A tiny HTS-AT with the official 32 kHz front end on the built-in corpus's 16 kHz clips."""
    data = _synth_root(tmp_path, synth_corpus)
    run_dir = tmp_path / "run"
    argv = ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
            "--recipe", str(ROOT / "recipes" / "synth_htsat.yaml"),
            *sets("model.htsat={sample_rate: 32000, clip_samples: 40640, n_fft: 1024, hop_length: 320, mel_bins: 32, "
                  "spec_size: 64, embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 2, 4, 8], window_size: 4}",
                  "data.batch_size=4", "data.num_workers=0", "phases=[{compression: none, epochs: 1}]")]
    assert finetune(argv) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    evals = [e for e in ledger["evals"] if "epoch" in e]
    valid = sum(1 for _ in CutSet.from_file(data / "synth" / "synth_valid.jsonl.gz"))
    assert ledger["upsampled"] == [
        {"split": "train", "from_hz": 16000, "to_hz": 32000, "clips": ledger["phases"][0]["samples"]},
        {"split": "valid", "from_hz": 16000, "to_hz": 32000, "clips": valid * len(evals)}]
    log = (run_dir / "train.log").read_text()
    assert log.count("resampling clips up to the model's 32000 Hz") == 1
