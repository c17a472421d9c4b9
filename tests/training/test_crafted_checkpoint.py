"""A resume never unpickles code: a checkpoint file replaced by one whose unpickling would run code, with its
size and digest fixed up in trainer_state.json (whoever can replace the file can edit that too), is refused
when the checkpoint is verified, when DeepSpeed loads it, and in the universal-checkpoint conversion."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

import common.training.checkpoints as rc
from common.training.checkpoint_files import safe_load
from pretrain.run import main
from tests.helpers import RECIPE, tiny

pytestmark = pytest.mark.slow  # end-to-end: every test here trains, launches or exports

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class Payload:
    """Unpickling it creates ``marker``: what a crafted checkpoint could do with any other code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def craft(path: Path, marker: Path) -> None:
    """Replace checkpoint file ``path`` by a working copy of itself that runs code when unpickled, and fix up
    its recorded size and SHA-256."""
    state = safe_load(path, map_location="cpu")
    state["extra"] = Payload(marker)
    torch.save(state, path)
    torch.load(path, weights_only=False)  # the file is a real attack: unpickled as DeepSpeed does, it runs
    assert marker.exists()
    marker.unlink()
    record = path.parent / "trainer_state.json"
    saved = json.loads(record.read_text())
    saved["files"][path.name] = path.stat().st_size
    saved["sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    record.write_text(json.dumps(saved))


def args(run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    return ["--recipe", str(RECIPE), "--run-dir", str(run_dir),
            *tiny(corpus, "train.zero_stage=1", "train.save_every=1", "train.keep_checkpoints=3",
                  "train.eval_every=100", *extra, steps=(4, 1))]


@pytest.fixture
def stopped(tmp_path, synth_corpus) -> Path:
    """A ZeRO-1 run stopped at step 2, with checkpoints at steps 1 and 2."""
    run_dir = tmp_path / "run"
    assert main([*args(run_dir, synth_corpus), "--stop-after-steps", "2"]) == 0
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "phase01-step000000002"
    return run_dir


@pytest.mark.parametrize("name", [MODEL, OPTIM])
def test_a_crafted_checkpoint_file_is_skipped_for_the_newest_intact_one(stopped, synth_corpus, tmp_path, name,
                                                                        caplog):
    marker = tmp_path / "marker"
    craft(stopped / "checkpoints" / "phase01-step000000002" / name, marker)
    with caplog.at_level(logging.INFO):
        assert main([*args(stopped, synth_corpus), "--stop-after-steps", "1"]) == 0
    assert not marker.exists()
    assert any("phase01-step000000002" in r.message and name in r.message and "weights_only=True" in r.message
               and "io.open" in r.message for r in caplog.records if r.levelno == logging.WARNING)
    assert any("resuming" in r.message and "phase01-step000000001" in r.message for r in caplog.records)


def test_no_intact_checkpoint_left_is_one_clear_error(stopped, synth_corpus, tmp_path, capsys):
    marker = tmp_path / "marker"
    for folder in (stopped / "checkpoints").glob("phase*"):
        craft(folder / MODEL, marker)
    assert main(args(stopped, synth_corpus)) == 1
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "no checkpoint" in err and "cannot be loaded with weights_only=True" in err and "--restart" in err


@pytest.mark.parametrize("name", [MODEL, OPTIM])
def test_a_file_replaced_after_verification_is_refused_by_the_load_itself(stopped, synth_corpus, tmp_path, name,
                                                                          monkeypatch, capsys):
    """The verification can be raced (the file replaced between it and the load): DeepSpeed's own loading,
    which asks torch.load for weights_only=False, unpickles with weights_only=True too."""
    marker = tmp_path / "marker"
    craft(stopped / "checkpoints" / "phase01-step000000002" / name, marker)
    monkeypatch.setattr(rc, "damage", lambda folder: None)
    assert main(args(stopped, synth_corpus)) == 1
    err = capsys.readouterr().err
    assert not marker.exists()
    assert f"{name} cannot be loaded with weights_only=True (Unsupported global: GLOBAL io.open)" in err
    assert torch.load is torch.serialization.load  # the guard is lifted again


def _as_if_written_by_two_ranks(run_dir: Path) -> None:
    """Make the resume go through DeepSpeed's universal checkpoint (it converts a checkpoint whose number of
    ranks differs from the run's): trainer_state.json records 2 ranks."""
    record = run_dir / "checkpoints" / "phase01-step000000002" / "trainer_state.json"
    saved = json.loads(record.read_text())
    record.write_text(json.dumps({**saved, "world_size": 2}))


def test_the_universal_conversion_unpickles_with_weights_only(stopped, synth_corpus, tmp_path, monkeypatch,
                                                              capsys):
    marker = tmp_path / "marker"
    craft(stopped / "checkpoints" / "phase01-step000000002" / OPTIM, marker)
    _as_if_written_by_two_ranks(stopped)
    monkeypatch.setattr(rc, "damage", lambda folder: None)
    assert main(args(stopped, synth_corpus)) == 1
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "could not be converted" in err and f"{OPTIM} cannot be loaded with weights_only=True" in err


def test_the_universal_checkpoint_loads_with_weights_only(stopped, synth_corpus, tmp_path, monkeypatch, capsys):
    import deepspeed.checkpoint.ds_to_universal as ds_to_universal

    marker = tmp_path / "marker"
    _as_if_written_by_two_ranks(stopped)
    convert = ds_to_universal.main
    crafted = []

    def convert_then_replace(namespace):  # a file of the converted copy replaced before it is loaded
        convert(namespace)
        fp32 = sorted(Path(namespace.output_folder).glob("zero/*/fp32.pt"))[0]
        torch.save({**torch.load(fp32), "extra": Payload(marker)}, fp32)
        crafted.append(fp32)

    monkeypatch.setattr(ds_to_universal, "main", convert_then_replace)
    assert main(args(stopped, synth_corpus)) == 1
    err = capsys.readouterr().err
    assert crafted and not marker.exists()
    assert "fp32.pt cannot be loaded with weights_only=True (Unsupported global: GLOBAL io.open)" in err
    assert not list((stopped / "checkpoints").glob(".universal-*"))  # converted afresh by the next attempt


def test_an_intact_resume_on_another_number_of_ranks_still_loads(stopped, synth_corpus):
    """The allowed DeepSpeed classes are all that the conversion and the universal loading need."""
    _as_if_written_by_two_ranks(stopped)
    assert main(args(stopped, synth_corpus)) == 0
    ledger = json.loads((stopped / "ledger.json").read_text())
    assert [i["changes"] for i in ledger["interventions"]] == [{"world_size": {"from": 2, "to": 1}}]
