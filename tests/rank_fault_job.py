"""One rank of tests/training/test_rank_faults.py's jobs: tiny pretraining runs one after another, where one rank
may differ (its own ``--set`` values) or meet a fault of its own (a failing or stuck write, a stuck step).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 python tests/rank_fault_job.py JOB.json

``JOB.json``: ``{"out": folder, "corpus": the test corpus, "cases": [{"name", "port", "run_dir", "sets": [...],
"argv": [...] (optional, more arguments), "rank_sets": {"R": [...]} (rank R's extra --set values), "rank_cwd":
{"R": folder} (rank R's working folder: a relative manifest path names another file there), "delay": {"R": seconds}
(rank R starts the command that much later), "fault": {"rank": R
or "all", "kind": "enospc" | "readonly" | "hang" | "raise", "where": the checkpoint tag whose writes fail (part of it),
"seconds": how long "hang" sleeps in the first micro-step},
"timeout": seconds (optional: the process group's timeout, instead of DEEPSPEED_TIMEOUT's minutes)}]}``.
Writes ``out/rank{r}.json``: per case, the exit code, the ``error:`` lines, everything written to stderr, and the
seconds the case took.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.shard_job import _Tee  # noqa: E402 - the job script's: stderr kept as it is printed


def _fault(kind: str, seconds: float, where: str):
    """Patch this process for fault ``kind`` (the writes of a checkpoint whose folder's name holds ``where``);
    returns the undo."""
    import torch

    from common.training.loop import Trainer

    undo = []
    if kind == "enospc":  # this rank's first write into a checkpoint folder fills the disk after 1 KB
        save = torch.save

        def full(obj, f, *args, **kwargs):
            if ".tmp-" in str(f) and where in str(f):
                Path(f).write_bytes(b"\0" * 1024)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return save(obj, f, *args, **kwargs)

        torch.save = full
        undo.append(lambda: setattr(torch, "save", save))
    elif kind == "readonly":  # the checkpoint folder cannot take new folders (a read-only mount): os.mkdir fails
        mkdir = os.mkdir

        def read_only(path, *args, **kwargs):
            if Path(path).name.startswith(".tmp-") and where in Path(path).name:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return mkdir(path, *args, **kwargs)

        os.mkdir = read_only
        undo.append(lambda: setattr(os, "mkdir", mkdir))
    elif kind == "raise":  # the second micro-step fails unexpectedly (a bug: no known failure)
        micro, count = Trainer._micro_step, [0]

        def failing(self, *args, **kwargs):
            count[0] += 1
            if count[0] == 2:
                raise RuntimeError("injected failure")
            return micro(self, *args, **kwargs)

        Trainer._micro_step = failing
        undo.append(lambda: setattr(Trainer, "_micro_step", micro))
    elif kind == "hang":  # the first micro-step takes `seconds` (a hung read, a stale NFS mount)
        micro, count = Trainer._micro_step, [0]

        def stuck(self, *args, **kwargs):
            count[0] += 1
            if count[0] == 1:
                time.sleep(seconds)
            return micro(self, *args, **kwargs)

        Trainer._micro_step = stuck
        undo.append(lambda: setattr(Trainer, "_micro_step", micro))
    return lambda: [f() for f in undo]


def main(job_file: str) -> int:
    import deepspeed.constants

    from pretrain.run import main as pretrain
    from tests.helpers import RECIPE, tiny

    job = json.loads(Path(job_file).read_text())
    rank = int(os.environ["RANK"])
    report = {}
    default_timeout = deepspeed.constants.default_pg_timeout
    for case in job["cases"]:
        os.environ["MASTER_PORT"] = str(case["port"])
        deepspeed.constants.default_pg_timeout = (timedelta(seconds=case["timeout"]) if case.get("timeout")
                                                  else default_timeout)
        fault = case.get("fault") or {}
        undo = (_fault(fault["kind"], fault.get("seconds", 0), fault.get("where", ""))
                if fault.get("rank") in (rank, "all") else (lambda: None))
        sets = [*case.get("sets", []), *case.get("rank_sets", {}).get(str(rank), [])]
        argv = ["--recipe", str(RECIPE), "--run-dir", case["run_dir"], *tiny(Path(job["corpus"]), *sets),
                *case.get("argv", [])]
        time.sleep(case.get("delay", {}).get(str(rank), 0))
        start, cwd = time.perf_counter(), os.getcwd()
        os.chdir(case.get("rank_cwd", {}).get(str(rank), cwd))
        try:
            with contextlib.redirect_stderr(_Tee(sys.stderr)) as err:
                try:
                    code = pretrain(argv)
                except Exception:  # noqa: BLE001 - an unexpected failure run_main re-raises: the test looks at it
                    err.write(traceback.format_exc())
                    code = "raised"
        finally:
            undo()
            os.chdir(cwd)
        text = err.getvalue()
        report[case["name"]] = {"code": code, "seconds": round(time.perf_counter() - start, 2), "stderr": text,
                                "errors": [line for line in text.splitlines() if line.startswith("error:")]}
        Path(job["out"], f"rank{rank}.json").write_text(json.dumps(report))
    deepspeed.constants.default_pg_timeout = default_timeout
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
