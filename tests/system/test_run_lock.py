"""One run per run directory: a second command on a run directory in use stops at once naming the first; a
killed run does not block its resume; the ranks of one job share their main rank's lock."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.cli import discard_previous
from common.system.lock import LOCK_FILE, RunDirBusy, run_dir_lock
from pretrain.run import main
from tests.helpers import RECIPE, ROOT, _free_port, tiny

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def holder(run_dir: Path, *then: str) -> subprocess.Popen:
    """Another process that takes ``run_dir``'s lock, says "locked", and runs the lines ``then`` (default:
    sleeps) while holding it."""
    code = "\n".join(["import os, sys, time", "from common.system.lock import run_dir_lock",
                      f"with run_dir_lock({str(run_dir)!r}):", "    print('locked', flush=True)",
                      *(f"    {line}" for line in then or ["time.sleep(600)"])])
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_the_lock_names_its_holder_and_goes_with_it(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(RunDirBusy) as refused:
            with run_dir_lock(tmp_path):
                pass
        message = str(refused.value)
        assert f"pid {proc.pid} on {socket.gethostname()}, started " in message and "-c" in message
        assert "\n" not in message
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with run_dir_lock(tmp_path):  # SIGKILL: the kernel released it
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with run_dir_lock(tmp_path):  # and released at the end of the block
        pass


@pytest.mark.slow
def test_a_lock_held_by_what_a_killed_holder_forked_is_waited_for(tmp_path):
    """A killed run's data-loader workers (forked, so sharing its lock) outlive it by a few seconds."""
    proc = holder(tmp_path, "child = os.fork()", "if not child: time.sleep(3); os._exit(0)",
                  "print(child, flush=True); time.sleep(600)")
    assert int(proc.stdout.readline()) > 0  # the child holds the lock for 3 s more
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    start = time.monotonic()
    with run_dir_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert 1 < time.monotonic() - start < 25


@pytest.mark.parametrize("name", [LOCK_FILE, "prepare.lock"])
def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path, name):
    """The lock file is truncated to record its holder: ``run.lock -> a file`` planted in a run directory (or in
    ``prepare --out``, ``embed --out``) truncated the file it points to. It is refused in one line; a dangling link
    does not create the file it names."""
    from common.system.paths import LinkRefused

    victim = tmp_path / "victim"
    victim.write_text("two\nlines\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).symlink_to(victim)
    with pytest.raises(LinkRefused, match=rf"^{run_dir / name} is a symbolic link: a lock file is never written "):
        with run_dir_lock(run_dir, name=name):
            pass
    (run_dir / name).unlink()
    (run_dir / name).symlink_to(tmp_path / "dangling")
    with pytest.raises(LinkRefused):
        with run_dir_lock(run_dir, name=name):
            pass
    assert victim.read_text() == "two\nlines\n" and not (tmp_path / "dangling").exists()


def test_a_run_refuses_a_train_log_or_rank_log_that_is_a_symbolic_link(tmp_path, synth_corpus, capsys, monkeypatch):
    """``train.log -> ~/.bashrc`` in a run directory received from someone: a resume appended its log lines to the
    file. The run refuses it in one line before it starts (every rank: ``check_run_dir``), and the log and a
    rank's error log are opened without following a link anyway (a link planted while the run goes on)."""
    import common.cli as cli
    from common.system.logger import detach_run_logs, setup_logging
    from common.system.paths import LinkRefused

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train.log").symlink_to(victim)
    assert main(["--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(synth_corpus)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run_dir / 'train.log'} is a symbolic link: a run's train.log is never written through "
                   f"one (it could truncate or append to the file the link points to); replace the link with a copy "
                   f"of that file (cp --remove-destination \"$(readlink -f {run_dir / 'train.log'})\" "
                   f"{run_dir / 'train.log'}), or remove it, and run again"], err
    # the plan says that the run would stop (exit status 3), with the same words
    assert main(["--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(synth_corpus), "--dry-run"]) == 3
    assert f"{run_dir / 'train.log'} is a symbolic link: a run's train.log" in capsys.readouterr().out
    (tmp_path / "cv" / "fold2").mkdir(parents=True)  # a cross-validation run's fold: before the job starts too
    (tmp_path / "cv" / "fold2" / "bad_audio.tsv").symlink_to(victim)
    with pytest.raises(LinkRefused, match=rf"^{tmp_path / 'cv' / 'fold2' / 'bad_audio.tsv'} is a symbolic link"):
        cli.check_run_dir(tmp_path / "cv")
    try:
        with pytest.raises(LinkRefused, match="a run's train.log is never written through one"):
            setup_logging(run_dir)
    finally:
        detach_run_logs()
    (run_dir / "train.log").unlink()
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "rank1.err").symlink_to(victim)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "_RUN_DIR", run_dir)
    cli._keep_failure("error: touch ~/pwned\n")  # a failure to keep it is not another error
    with pytest.raises(LinkRefused, match="a rank's error log"):
        cli.check_run_dir(run_dir)
    assert victim.read_text() == "precious\n"


def test_restart_leaves_the_lock_in_place(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with run_dir_lock(tmp_path):
        target = discard_previous(tmp_path)
        assert (tmp_path / LOCK_FILE).is_file() and (target / "checkpoints").is_dir()
        assert not (target / LOCK_FILE).exists()


def test_each_restart_keeps_its_attempt_apart_and_says_what_the_discarded_attempts_hold(tmp_path, caplog):
    """Nothing deletes a discarded attempt (a requeue loop that always restarts fills the disk): each restart says
    how many the run directory holds and their size; two restarts in one second keep both attempts."""
    import logging

    targets = []
    for attempt in range(2):
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "weights").write_bytes(bytes(6000 * (attempt + 1)))
        with caplog.at_level(logging.WARNING):
            targets.append(discard_previous(tmp_path))
    assert targets[0] != targets[1] and all((t / "checkpoints" / "weights").is_file() for t in targets)
    said = [r.getMessage() for r in caplog.records]
    assert f"{tmp_path} holds 1 discarded attempt(s), 6000 bytes in all: delete those no longer needed" in said[0]
    assert f"{tmp_path} holds 2 discarded attempt(s), 17.6 KiB in all" in said[1]


def args(run_dir: Path, corpus: Path, *extra: str, steps=(3, 3)) -> list[str]:
    return ["--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(corpus, *extra, steps=steps)]


def test_a_second_command_stops_at_once_and_a_dry_run_takes_no_lock(tmp_path, synth_corpus, capsys):
    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir):
        start = time.monotonic()
        assert main(args(run_dir, synth_corpus)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another run: pid {os.getpid()} on {socket.gethostname()}" in err[0]
        assert time.monotonic() - start < 30
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing written
        assert main([*args(run_dir, synth_corpus), "--dry-run"]) == 0


@pytest.mark.slow
def test_two_runs_on_one_directory_and_a_killed_run_resumes(tmp_path, synth_corpus, capsys, caplog):
    run_dir = tmp_path / "run"
    long_run = args(run_dir, synth_corpus, "train.save_every=1", "data.num_workers=1", steps=(10_000, 1))
    first = subprocess.Popen(  # with a forked data-loader worker
        [sys.executable, str(ROOT / "pretrain" / "run.py"), *long_run],
        env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "LATEST").is_file(), 240, "the first run's first checkpoint")
        capsys.readouterr()
        assert main(long_run) == 1
        err = capsys.readouterr().err
        assert f"in use by another run: pid {first.pid} on {socket.gethostname()}, started " in err
        assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
        first.wait(timeout=30)
    with caplog.at_level(logging.INFO):
        assert main([*long_run, "--stop-after-steps", "1"]) == 0
    assert any("resuming" in r.message for r in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_the_ranks_of_one_job_share_its_lock(tmp_path, synth_corpus, ranks):
    """A job of several ranks is refused as a whole when another process holds the lock (every rank stops,
    none hangs). That a job is not refused by itself (only its main rank takes the lock) every job of several
    ranks shows: at 2 ranks under this launcher in tests/pretrain/test_pretrain.py, at 2 and 3 in
    tests/data/test_shards.py."""
    run_dir = tmp_path / "ddp"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
           str(_free_port()), str(ROOT / "pretrain" / "run.py"),
           *args(run_dir, synth_corpus, "train.zero_stage=1", "train.eval_every=100",
                 f"data.batch_size={4 * ranks}", steps=(1, 1))]  # the global batch: 4 clips per rank
    with run_dir_lock(run_dir):
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert f"in use by another run: pid {os.getpid()} on {socket.gethostname()}" in proc.stdout + proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
