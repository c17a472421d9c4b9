"""The clips a run counts (``seen`` of the bad-audio tracker, the clips resampled up in ``ledger.json``) are the
clips it trained on. The trainer finds an epoch's end by drawing the next epoch's first batch and checkpoints
there: counted at the draw, that batch was in the checkpoint's counts and was counted again by a run resumed
from it (or by the next phase, when a criterion ended the phase at that epoch)."""

import json
from pathlib import Path

import pytest

from finetune.run import main as finetune
from tests.helpers import _synth_root, sets

pytestmark = pytest.mark.slow  # every test here trains

RUN = ["data.num_workers=0", "data.batch_size=4", "optim.warmup_steps=0", "train.log_every=100",
       "train.deterministic=true", "model.size=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
       "phases=[{compression: fshift, factor: 4, epochs: 1}, {compression: none, epochs: 2}]", "train.keep_checkpoints=10"]


def _states(run_dir: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "trainer_state.json").read_text())
            for d in sorted((run_dir / "checkpoints").glob("phase*"))}


def test_every_checkpoint_counts_the_clips_trained_and_a_resume_at_an_epoch_end_counts_none_twice(tmp_path,
                                                                                                  synth_corpus):
    data = _synth_root(tmp_path, synth_corpus)

    def command(run_dir: Path, *extra: str) -> list[str]:
        return ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                *sets(*RUN), *extra]

    assert finetune(command(tmp_path / "straight")) == 0
    states = _states(tmp_path / "straight")
    assert len(states) == 3  # the first phase's end, the second phase's first epoch end, its end
    for tag, state in states.items():
        trained = sum(p["samples"] for p in state["ledger"]["phases"])
        assert trained and state["tracker"]["seen"] == trained, tag

    # stopped at the first epoch end of the second phase (its checkpoint), resumed: the counts of the straight run
    mid = next(t for t, s in states.items() if s["state"]["phase"] == 1 and s["state"]["epoch_in_phase"] == 1)
    steps = states[mid]["state"]["total_steps"]
    assert finetune(command(tmp_path / "resumed", "--stop-after-steps", str(steps))) == 0
    assert finetune(command(tmp_path / "resumed")) == 0
    last = [s["tracker"] for s in (_states(tmp_path / d) for d in ("straight", "resumed")) for s in [s[max(s)]]]
    assert last[0] == last[1]
    ledgers = [json.loads((tmp_path / d / "ledger.json").read_text()) for d in ("straight", "resumed")]
    assert [p["samples"] for p in ledgers[0]["phases"]] == [p["samples"] for p in ledgers[1]["phases"]]
