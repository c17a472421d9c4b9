"""The ledger's accounting: phases, training windows, evaluations, totals and the file round trip."""

import json
import re

import pytest

from common.training.ledger import Ledger, PhaseRecord


def two_phase_ledger() -> Ledger:
    ledger = Ledger("acc")
    ledger.start_phase(0, name="p1", compression="fshift", factor=4, flops_per_sample=10, tokens_per_sample=18)
    ledger.start_phase(1, name="p2", compression="none", factor=1, flops_per_sample=40, tokens_per_sample=66)
    return ledger


def test_training_windows_accumulate_per_phase():
    ledger = two_phase_ledger()
    window = ledger.add_training(0, steps=2, samples=8, seconds=2.0)
    assert window.samples == 8 and window.samples_per_second == pytest.approx(4.0)
    ledger.add_training(0, steps=1, samples=4, seconds=1.0)
    ledger.add_training(1, steps=3, samples=12, seconds=6.0)
    ledger.add_eval_time(1, 0.5)
    p1, p2 = ledger.phases
    assert (p1.steps, p1.samples, p1.train_flops, p1.wall_seconds) == (3, 12, 120, 3.0)
    assert (p2.steps, p2.samples, p2.train_flops, p2.eval_seconds) == (3, 12, 480, 0.5)
    assert ledger.totals() == {"steps": 6, "samples": 24, "train_flops": 600, "wall_seconds": 9.0,
                               "eval_seconds": 0.5, "device_seconds": 9.5}


def test_device_time_counts_every_rank():
    ledger = two_phase_ledger()
    ledger.add_training(0, steps=2, samples=32, seconds=10.0, ranks=4)
    ledger.add_training(0, steps=2, samples=16, seconds=10.0, ranks=2)  # resumed on fewer GPUs
    ledger.add_eval_time(0, 1.0, ranks=2)
    assert ledger.phases[0].device_seconds == 40 + 20 + 2 and ledger.phases[0].wall_seconds == 20
    assert ledger.totals()["device_seconds"] == 62


def test_a_resumed_phase_keeps_its_record_and_phases_start_in_order():
    ledger = two_phase_ledger()
    ledger.add_training(0, 1, 4, 1.0)
    again = ledger.start_phase(0, name="ignored", compression="none", factor=1, flops_per_sample=1,
                               tokens_per_sample=1)
    assert again.name == "p1" and again.samples == 4
    with pytest.raises(ValueError, match="phase 3 started before phase 2"):
        ledger.start_phase(3, name="x")


def test_evaluations_carry_the_cumulative_cost_and_the_saving_is_against_the_baseline():
    ledger = two_phase_ledger()
    ledger.add_training(0, 2, 8, 2.0)
    first = ledger.add_eval(0, {"acc": 0.5}, total_step=2, phase_step=2)
    ledger.add_training(1, 1, 4, 3.0)
    second = ledger.add_eval(1, {"acc": 0.6}, total_step=3, phase_step=1, epoch=1)
    assert (first["train_flops"], first["wall_seconds"], first["samples"]) == (80, 2.0, 8)
    assert (second["train_flops"], second["samples"], second["epoch"]) == (240, 12, 1)
    assert ledger.flops_saving() is None
    ledger.set_baseline("base.yaml", 480)
    assert ledger.flops_saving() == pytest.approx(0.5)
    assert ledger.to_dict()["flops_saving"] == pytest.approx(0.5)


def test_file_round_trip_keeps_the_layout_and_unknown_fields(tmp_path):
    ledger = two_phase_ledger()
    ledger.phases[0].patch_transfer = "pi"
    ledger.add_training(0, 2, 8, 2.0)
    ledger.add_eval(0, {"acc": 0.5}, total_step=2, phase_step=2)
    ledger.write(tmp_path / "ledger.json")
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert list(data) == ["score", "phases", "total", "evals"]
    assert list(data["phases"][0]) == ["steps", "epochs", "samples", "train_flops", "wall_seconds", "eval_seconds",
                                       "device_seconds", "name", "compression", "factor", "flops_per_sample", "tokens_per_sample",
                                       "patch_transfer"]
    assert "patch_transfer" not in data["phases"][1]
    data["phases"][1]["peak_memory_bytes"] = 123  # written by a newer version
    again = Ledger.from_dict(data)
    assert again.to_dict() == data
    assert PhaseRecord.from_dict({"compression": "none"}).factor is None  # partial records (reports) load
    assert Ledger.read(tmp_path).totals() == ledger.totals()


def test_a_run_longer_than_its_baseline_is_said_to_cost_more_not_minus_fewer():
    from common.training.record import saving_words

    assert saving_words(0.3458) == "34.6% fewer FLOPs"
    assert saving_words(-5.006) == "500.6% more FLOPs"



def test_a_phase_from_a_ledger_older_than_hardware_keeps_its_first_launch_when_resumed_elsewhere():
    """A ledger written before ``hardware`` existed says its launch by ``device`` and ``world_size``: a resume on
    other devices or ranks adds to that, so the report sees the mix (and computes no time saving)."""
    from common.training.batch import BatchSplit
    from common.training.ledger import PhaseRecord

    old = PhaseRecord.from_dict({"name": "p1", "device": "NVIDIA A100", "world_size": 8, "steps": 10})
    old.trained_on("NVIDIA H100", 2)
    old.set_batch(BatchSplit(global_batch=64, per_rank=32, grad_accum=1, world_size=2))
    assert old.hardware == [["NVIDIA A100", 8], ["NVIDIA H100", 2]] and old.device == "NVIDIA A100"
    again = PhaseRecord.from_dict(old.to_dict())
    again.trained_on("NVIDIA H100", 2)  # the same launch again: nothing new
    assert again.hardware == [["NVIDIA A100", 8], ["NVIDIA H100", 2]]


@pytest.mark.parametrize("data, said", [
    ([], r"the ledger is \[\], not a mapping"),
    ({"phases": [{"steps": "3"}]}, r"phases.0.steps is '3', not a number"),
    ({"phases": [[]]}, r"phases.0 is \[\], not a mapping"),
    ({"evals": [{"metrics": [1]}]}, r"evals.0.metrics is \[1\], not a mapping"),
    ({"upsampled": [{"split": "train"}]}, r"upsampled.0 is .*split, from_hz, to_hz and clips"),
    ({"init": "x.pth"}, r"init is 'x.pth', not a mapping"),
    ({"bad_audio": {"train": {"seen": 3}}}, r"bad_audio.train is .*seen, bad and reasons"),
    ({"bad_audio": [1]}, r"bad_audio is \[1\], not a mapping"),
])
def test_a_ledger_of_another_shape_is_a_ledger_error_naming_the_key(tmp_path, data, said):
    from common.training.ledger import LedgerError

    with pytest.raises(LedgerError, match=said):
        Ledger.from_dict(data)
    (tmp_path / "ledger.json").write_text(json.dumps(data))
    with pytest.raises(LedgerError, match=f"{tmp_path / 'ledger.json'} is not a ledger of this package"):
        Ledger.read(tmp_path)


def test_bad_audio_counts_are_kept_once_a_clip_was_bad_and_go_through_the_file():
    ledger = Ledger("acc")
    ledger.set_bad_audio({"train": {"seen": 8, "bad": 0, "reasons": {}}})
    assert "bad_audio" not in ledger.to_dict() and ledger.bad_clips() == 0  # clean data: the ledger as before
    counts = {"train": {"seen": 24, "bad": 2, "reasons": {"unreadable": 2}},
              "valid": {"seen": 16, "bad": 1, "reasons": {"missing": 1}}}
    ledger.set_bad_audio(counts)
    data = json.loads(json.dumps(ledger.to_dict()))
    assert data["bad_audio"] == counts and Ledger.from_dict(data).to_dict() == data
    assert Ledger.from_dict(data).bad_clips() == 3


@pytest.mark.parametrize("content", [b'{"phases": [', b"\xff\xfe not text"])
def test_a_ledger_that_is_not_json_is_a_ledger_error_naming_the_file(tmp_path, content):
    """A ledger cut short (a full disk, a copy interrupted) or another file in its place: one error naming it, not
    json's own (which names no file)."""
    from common.training.ledger import LedgerError

    (tmp_path / "ledger.json").write_bytes(content)
    with pytest.raises(LedgerError, match=rf"^{re.escape(str(tmp_path / 'ledger.json'))} is not valid JSON \("):
        Ledger.read(tmp_path)
