"""One rank of tests/phases/test_criteria.py's multi-rank restate test: a pretraining run straight through; the
same run whose validation of step 2 breaks on every rank; its resume, which validates step 2 again and then dies
before its next checkpoint; and the resume of that, which must not validate step 2 a third time.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 python tests/restate_job.py JOB.json

``JOB.json``: ``{"out": folder, "corpus": the test corpus, "ports": [4 ports]}``. Writes ``out/rank{r}.json``:
each launch's exit status (or its error), the phase steps this rank validated in each, and after the two that
broke, what step 2's checkpoint says.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(job_file: str) -> int:
    from common.training.loop import Trainer
    from tests.helpers import run

    job = json.loads(Path(job_file).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out, corpus = Path(job["out"]), Path(job["corpus"])
    sets = ("train.eval_every=2", "train.save_every=2", "optim.schedule=plateau", "optim.patience=0",
            "optim.decay=0.5", "optim.warmup_steps=0", f"data.batch_size={2 * world}")
    micro_step, validated = Trainer._micro_step, []
    broken = {"validation": False, "step": False}

    def evaluate(self, model, index):  # a score per step, the same on every rank; breaks once where asked
        validated.append(self.state.step)
        if broken["validation"] and self.state.step == 2:
            broken["validation"] = False
            raise RuntimeError("validation broke")
        return {self.objective.score_name: [0.1, 0.3, 0.3, 0.29, 0.5][self.state.step % 5]}

    def killed(self, *args, **kwargs):  # the step after step 2 fails once: the launch dies before its checkpoint
        if broken["step"] and self.state.step == 2:
            broken["step"] = False
            raise RuntimeError("killed")
        return micro_step(self, *args, **kwargs)

    Trainer._evaluate, Trainer._micro_step = evaluate, killed
    report = {}
    for port, (name, run_dir, breaks) in zip(job["ports"], [("straight", "straight", None),
                                                           ("broken", "crashed", "validation"),
                                                           ("revalidated", "crashed", "step"),
                                                           ("resumed", "crashed", None)]):
        os.environ["MASTER_PORT"] = str(port)
        if breaks:
            broken[breaks] = True
        validated.clear()
        try:
            status = run(out / run_dir, corpus, *sets, steps=(4, 1))
        except RuntimeError as err:
            status = str(err)
        report[name] = {"status": status, "validated": list(validated)}
        state_file = out / run_dir / "checkpoints" / "phase01-step000000002" / "trainer_state.json"
        if name in ("broken", "revalidated"):  # step 2's checkpoint as the launch left it (pruned by the last)
            state = json.loads(state_file.read_text())
            report[name].update(pending_eval=state["state"]["pending_eval"], world_size=state["world_size"])
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
