"""A scheduler's notice (SIGTERM, SIGUSR1) ends a training run with a checkpoint of the step it was taking, and the
same command resumes it exactly (``common.system.signals``); on several ranks every rank stops at the same step."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.training.loop import Trainer
from tests.helpers import _free_port, run
from tests.ranks import launch_ranks

pytestmark = pytest.mark.slow  # every test here trains


def _signal_during_micro_step(monkeypatch, number: int, signum: int) -> None:
    """The process receives ``signum`` (a real signal, as from a scheduler) during its ``number``-th micro-step, and
    again (a scheduler signals every process of a job, and the deepspeed launcher its ranks once more)."""
    micro, count = Trainer._micro_step, [0]

    def signalled(self, *args, **kwargs):
        count[0] += 1
        if count[0] == number:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)
        return micro(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_micro_step", signalled)


@pytest.mark.parametrize("number,signum,where,tag", [
    (1, signal.SIGTERM, "after step 2 of phase1", "phase01-step000000002"),  # mid-phase: the next step saved
    (3, signal.SIGUSR1, "at the end of phase1", "phase01-step000000003"),  # the phase's end is its checkpoint
])
def test_a_signal_checkpoints_and_the_same_command_resumes_exactly(tmp_path, synth_corpus, monkeypatch, capsys,
                                                                  number, signum, where, tag):
    assert run(tmp_path / "straight", synth_corpus, "train.save_every=100") == 0
    before = signal.getsignal(signum)
    _signal_during_micro_step(monkeypatch, number, signum)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert run(run_dir, synth_corpus, "train.save_every=100") == 128 + signum
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name} {where}" in err and "run the same command again" in err
    assert err.count(f"stopped by {signal.Signals(signum).name}") == 1  # said once on the console ...
    assert f"stopped by {signal.Signals(signum).name} {where}" in (run_dir / "train.log").read_text()  # ... kept there
    assert (run_dir / "checkpoints" / "LATEST").read_text() == tag
    assert signal.getsignal(signum) == before  # the handler is the run's only
    monkeypatch.undo()
    assert run(run_dir, synth_corpus, "train.save_every=100") == 0
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["resume", "engine", "loader"])
def test_a_signal_while_the_command_starts_stops_it_before_its_first_step(tmp_path, synth_corpus, monkeypatch, capsys,
                                                                         where):
    """A scheduler's SIGTERM while the command starts (reading and indexing its data, building the engine: minutes
    on a large corpus) stops it before it trains a step, with nothing to save, not after a step and a checkpoint
    the grace period may not leave time for; the command run again goes on, to an uninterrupted run's weights."""
    from common.training import machinery

    assert run(tmp_path / "straight", synth_corpus, "train.save_every=100") == 0
    run_dir = tmp_path / "run"
    assert run(run_dir, synth_corpus, "train.save_every=100", stop=2) == 0
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    from common.training.record import RunRecord

    target = {"resume": (RunRecord, "resume"), "engine": (Trainer, "_engine"),
              "loader": (machinery.PhaseMachinery, "_train_loader")}[where]
    real = getattr(*target)

    def signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(*target, signalled)
    trained = []
    micro = Trainer._micro_step
    monkeypatch.setattr(Trainer, "_micro_step", lambda self, *a, **k: trained.append(1) or micro(self, *a, **k))
    capsys.readouterr()
    assert run(run_dir, synth_corpus, "train.save_every=100") == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM before the first step of phase1" in err and "nothing was trained since" in err, err
    assert trained == [] and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == saved
    monkeypatch.undo()
    assert run(run_dir, synth_corpus, "train.save_every=100") == 0
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_every_process_of_the_job_with_loader_workers_still_checkpoints(tmp_path, synth_corpus,
                                                                                   monkeypatch, capsys, signum):
    """SLURM, torchrun and the deepspeed launcher signal every process of a job, the loader's workers too: the
    run still checkpoints the step it was taking and stops (a worker that died of it failed the run, with no
    checkpoint), and the same command resumes it to the weights of an uninterrupted run."""
    import multiprocessing

    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    assert run(straight, synth_corpus, "train.save_every=100", "data.num_workers=1") == 0
    micro, count = Trainer._micro_step, [0]

    def signalled(self, *args, **kwargs):
        count[0] += 1
        if count[0] == 1:  # the step after this one is checkpointed (as the test above)
            workers = multiprocessing.active_children()
            assert workers  # the loader's worker process
            for process in workers:
                os.kill(process.pid, signum)
            os.kill(os.getpid(), signum)
        return micro(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_micro_step", signalled)
    assert run(run_dir, synth_corpus, "train.save_every=100", "data.num_workers=1") == 128 + signum
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "phase01-step000000002"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    monkeypatch.undo()
    assert run(run_dir, synth_corpus, "train.save_every=100", "data.num_workers=1") == 0
    a, b = (load_file(str(d / "model.safetensors")) for d in (straight, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_on_several_ranks_one_ranks_signal_stops_every_rank_at_the_same_step(tmp_path, synth_corpus, world_size):
    """Rank 1 alone gets SIGTERM during step 1; the ranks agree at the end of the log window (2 steps) and every
    one of them checkpoints step 2 and exits with 143; the same command resumes to the uninterrupted weights."""
    out = tmp_path / "job"
    out.mkdir()
    job = out / "job.json"
    job.write_text(json.dumps({"out": str(out), "corpus": str(synth_corpus), "signal_rank": 1,
                               "ports": [_free_port() for _ in range(3)]}))
    launch_ranks(world_size, "signal_job.py", job, out, 240)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert [r["codes"] for r in reports] == [[0, 128 + signal.SIGTERM, 0]] * world_size, reports
    assert reports[0]["latest"] == "phase01-step000000002"
    # the stop is said once for the job, by rank 0 (every rank stopped at the same step)
    said = [(out / f"rank{r}.log").read_text().count("stopped by SIGTERM") for r in range(world_size)]
    assert said == [1] + [0] * (world_size - 1), said
    a, b = (load_file(str(Path(out) / d / "model.safetensors")) for d in ("straight", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ctrl_c_with_loader_workers_leaves_no_traceback_and_no_temporary_folder(tmp_path, synth_corpus):
    """A terminal's Ctrl-C signals the whole process group, the loader's workers too: the command ends with its one
    line and status 130; a worker printed a traceback from its interrupted exit hooks, and left its
    multiprocessing folder (/tmp/pymp-*) behind, one per Ctrl-C on a shared machine's /tmp."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import time

    from tests.helpers import RECIPE, ROOT, tiny

    run_dir = tmp_path / "run"
    temp = Path(tempfile.mkdtemp(prefix="c2f-", dir="/tmp"))  # short: the workers' sockets live under it
    argv = [sys.executable, str(ROOT / "pretrain" / "run.py"), "--recipe", str(RECIPE), "--run-dir", str(run_dir),
            *tiny(synth_corpus, "data.num_workers=1", "phases.0.steps=100000", "train.eval_every=100000",
                  "train.save_every=100000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}
    # SIGINT as a terminal's foreground job has it (a background job's shell ignores it; no preexec_fn in a
    # process with threads), in a process group of its own
    trampoline = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.argv[1], sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", trampoline, *argv], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        log = run_dir / "train.log"
        while not (log.is_file() and "step 3 (" in log.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-3000:]  # ended before it trained
            time.sleep(0.2)
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert workers, "no loader worker"
        for pid in workers:  # a worker leaves SIGINT to its loader, which shuts it down: from its fork on, it
            # holds it back (a new epoch's worker may be starting), then ignores it
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            held = int(status["SigIgn"], 16) | int(status["SigBlk"], 16)
            assert held >> (signal.SIGINT - 1) & 1, (status["SigIgn"], status["SigBlk"])
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        time.sleep(1)  # the worker's own exit
        left = sorted(p.name for p in temp.iterdir())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "interrupted" in out.splitlines()[-1], out[-3000:]
    assert not [name for name in left if name.startswith("pymp-")], left
