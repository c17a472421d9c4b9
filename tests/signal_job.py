"""One rank of tests/training/test_signals.py's multi-rank test: a pretraining run straight through, the same run with
SIGTERM sent to one rank during its first micro-step, then the same command again (the resume).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 python tests/signal_job.py JOB.json

``JOB.json``: ``{"out": folder, "corpus": the test corpus, "signal_rank": r, "ports": [3 ports]}``. Writes
``out/rank{r}.json``: the three exit codes and the checkpoint ``LATEST`` named after the stop.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(job_file: str) -> int:
    from common.training.loop import Trainer
    from tests.helpers import run

    job = json.loads(Path(job_file).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out, corpus = Path(job["out"]), Path(job["corpus"])
    extra = ("train.save_every=100", "train.log_every=2", f"data.batch_size={2 * world}")
    micro, count = Trainer._micro_step, [0]

    def signalled(self, *args, **kwargs):
        count[0] += 1
        if count[0] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return micro(self, *args, **kwargs)

    codes = []
    for port, (name, patched) in zip(job["ports"], [("straight", False), ("stopped", True), ("stopped", False)]):
        os.environ["MASTER_PORT"] = str(port)
        Trainer._micro_step = signalled if patched and rank == job["signal_rank"] else micro
        codes.append(run(out / name, corpus, *extra))
        if patched:
            latest = (out / "stopped" / "checkpoints" / "LATEST").read_text()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"codes": codes, "latest": latest}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
