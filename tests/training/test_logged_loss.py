"""The training loss a run logs (TensorBoard, the progress bar, train.log) is the mean over every rank's
micro-batches, not rank 0's share: the same global batches on 1 and on 2 ranks log the same losses (the two ranks
decoding in loader workers, the one rank in its own process: the batches are the same)."""

import json
import re
from pathlib import Path

import pytest

from tests.helpers import _synth_root, sets
from tests.ranks import launch_cases

pytestmark = pytest.mark.slow  # every test here launches ranks


def _losses(run_dir: Path) -> list[float]:
    """The logged losses (train.log's 4 significant digits)."""
    return [float(m) for m in re.findall(r"step \d+ \(.*?\)\): loss=([0-9.e+-]+),", (run_dir / "train.log").read_text())]


@pytest.mark.timeout(300)
def test_the_logged_loss_is_the_mean_over_every_rank(tmp_path, synth_corpus):
    data = _synth_root(tmp_path, synth_corpus)

    def argv(run_dir: Path, workers: int = 0) -> list[str]:
        return ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                *sets("model.size=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                      f"data.num_workers={workers}", "data.batch_size=8", "train.log_every=1", "optim.warmup_steps=0",
                      "train.deterministic=true", "optim.lr=1e-12", "phases=[{compression: none, epochs: 1}]",
                      "augment.freqm=0", "augment.timem=0", "augment.mixup=0", "augment.noise=false")]

    one = launch_cases(1, [("one", "finetune", argv(tmp_path / "one"))], tmp_path / "job1", timeout=240)
    # with a loader worker per rank and loader: training's and validation's kept workers on two ranks
    two = launch_cases(2, [("two", "finetune", argv(tmp_path / "two", workers=1))], tmp_path / "job2", timeout=240)
    assert one["one"][0]["code"] == 0 and all(r["code"] == 0 for r in two["two"])
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) >= 3 and len(set(a)) > 1  # several steps, different batches
    assert b == pytest.approx(a, rel=1e-3)
    scores = [json.loads((tmp_path / d / "ledger.json").read_text())["evals"][0]["metrics"] for d in ("one", "two")]
    assert scores[1]["acc"] == pytest.approx(scores[0]["acc"])  # every validation clip scored once, on either
