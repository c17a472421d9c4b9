"""One rank of a multi-process job of tests/data/test_shards.py: runs training commands one after another in this
process (each joins its own process group), and records which batches this rank's loaders gave.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 python tests/shard_job.py JOB.json

``JOB.json``: ``{"out": folder, "cases": [{"name", "entry": "finetune" | "pretrain", "argv", "port",
"expect" (the exit code the case should end with; default 0), "remove" (optional: a folder rank 0 deletes before
the case, once every rank has ended the case before; the others wait for it)}]}``.
Writes ``out/rank{r}.json``: per case, the exit code, the seconds (and CPU seconds) it took, the ``error:``
lines it printed, the child processes (loader workers) still alive after it, a checksum of the final model's
floating-point buffers (``buffers``, for a run that finished) and, per loader (``train`` / ``valid``), the
``[epoch, index, clip ids]`` of every batch handed to the training loop. The job stops at the first case that
ends otherwise than expected.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _together(out: Path, name: str, rank: int, world: int, timeout: float = 120) -> None:
    """Wait until every rank has reached the point ``name`` (a marker file each; no process group exists between
    cases)."""
    Path(out, f".{name}.{rank}").touch()
    deadline = time.monotonic() + timeout
    while not all(Path(out, f".{name}.{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the other ranks did not reach {name}")
        time.sleep(0.05)


class _Tee(io.StringIO):
    """Writes through to ``stream`` and keeps a copy."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)


def main(job_file: str) -> int:
    from common.data.loader import ClipLoader
    from common.training.loop import Trainer
    from finetune.run import main as finetune
    from pretrain.run import main as pretrain

    job = json.loads(Path(job_file).read_text())
    rank = int(os.environ["RANK"])
    seen: dict[str, list] = {}
    batches = ClipLoader.batches

    def recorded(self, *args, **kwargs):  # observes only: the same batches, in the same order
        kind = seen.setdefault("train" if self.shuffle else "valid", [])
        for batch in batches(self, *args, **kwargs):
            kind.append([batch.epoch, batch.index, list(batch.ids)])
            yield batch

    ClipLoader.batches = recorded
    finished: dict[str, float] = {}
    finish = Trainer._finish

    def recorded_finish(self, model):  # observes only: the final model's buffers (BatchNorm statistics)
        finished["buffers"] = float(sum(b.double().sum() for b in model.buffers() if b.is_floating_point()))
        return finish(self, model)

    Trainer._finish = recorded_finish
    report = {}
    world = int(os.environ["WORLD_SIZE"])
    for case in job["cases"]:
        if case.get("remove"):  # every rank past the case before, then rank 0 deletes, then the case
            _together(job["out"], f"{case['name']}-before", rank, world)
            if rank == 0:
                shutil.rmtree(case["remove"])
            _together(job["out"], f"{case['name']}-removed", rank, world)
        os.environ["MASTER_PORT"] = str(case["port"])
        seen = {}
        finished.clear()
        entry = finetune if case["entry"] == "finetune" else pretrain
        start, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stderr(_Tee(sys.stderr)) as err:
            code = entry(case["argv"])
        report[case["name"]] = {"code": code, "seconds": round(time.perf_counter() - start, 2),
                                "cpu_seconds": round(time.process_time() - cpu, 2), **seen, **finished,
                                "children": len(multiprocessing.active_children()),
                                "errors": [line for line in err.getvalue().splitlines() if line.startswith("error:")]}
        Path(job["out"], f"rank{rank}.json").write_text(json.dumps(report))
        if code != case.get("expect", 0):
            return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
