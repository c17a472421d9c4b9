"""The shared memory the loader's workers hand their batches through (``common.data.shared_memory``): a full
/dev/shm stops a run with one line instead of a hang, a small one is warned of before the workers start, and a
worker that dies is named with its cause."""
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from common.data import shared_memory
from common.data.clips import ClipDataset
from common.data.shared_memory import SharedMemoryFull, check_room, in_flight_bytes
from common.data.workers import describe_worker_failure, end_workers, start_workers
from tests.helpers import RECIPE, ROOT, can_mount, one_error, tiny


class _Dies(Dataset):
    """A worker that is sent ``signum`` at its first item (the out-of-memory killer's SIGKILL, a bus error)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __len__(self) -> int:
        return 4

    def __getitem__(self, item):
        os.kill(os.getpid(), self.signum)
        return torch.zeros(1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum,says", [(signal.SIGKILL, "out-of-memory killer"), (signal.SIGBUS, "shared memory")])
def test_a_worker_killed_by_a_signal_is_named_with_its_cause(signum, says):
    """PyTorch's error says the signal where its SIGCHLD handler saw the worker die first, else only that the
    worker exited: the held worker's exit status then names the signal."""
    iterator = start_workers(DataLoader(_Dies(signum), batch_size=None, num_workers=1))
    with pytest.raises(RuntimeError) as caught:  # PyTorch's own error, as the training loop gets it
        next(iterator)
    line = describe_worker_failure(caught.value)
    end_workers(iterator)
    assert line is not None and "\n" not in line and says in line and "a data loader worker (pid " in line, line
    assert f"(signal {signal.Signals(signum).name})" in line or "(signal Killed)" in line or "(signal Bus error)" in line
    if signum == signal.SIGBUS:
        assert "/dev/shm: " in line and "data.num_workers" in line and "--shm-size" in line
    assert describe_worker_failure(RuntimeError("CUDA out of memory")) is None  # not a worker's
    assert "exited unexpectedly" in describe_worker_failure(RuntimeError("DataLoader worker (pid(s) 1, 2) exited "
                                                                         "unexpectedly"))


def test_a_workers_own_shared_memory_error_is_its_last_line():
    """What the training process gets from a worker that found no room: the worker's error re-raised with its
    traceback in the message (PyTorch's ExceptionWrapper); the line is the worker's message."""
    worker = SharedMemoryFull("a loader worker (pid 7) found no room in shared memory for a batch of 8 MiB "
                              "(/dev/shm: 0 MiB free of 64 MiB): give ...")
    wrapped = SharedMemoryFull("Caught SharedMemoryFull in DataLoader worker process 0.\nOriginal Traceback (most "
                               "recent call last):\n  File \"x.py\", line 1, in f\ncommon.data.shared_memory."
                               f"SharedMemoryFull: {worker}\n")
    assert describe_worker_failure(wrapped) == describe_worker_failure(worker) == str(worker)


def test_a_small_dev_shm_is_warned_of_once_with_the_numbers(monkeypatch, caplog):
    batch = ClipDataset(160000, classes=[str(i) for i in range(527)]).batch_bytes(12)  # AudioSet's 10 s clips
    assert batch == 12 * (160000 * 4 + 8 + 527 * 4)
    assert in_flight_bytes(batch, 4, 2, 8) == batch * 10 * 8 and in_flight_bytes(batch, 0, 2, 8) == 0
    monkeypatch.setattr(shared_memory, "shm_space", lambda path=None: (64 * 2**20, 60 * 2**20))  # Docker's default
    monkeypatch.setattr(shared_memory, "_warned", set())
    with caplog.at_level(logging.WARNING):
        assert not check_room(batch, 4, 2, 8)
        assert not check_room(batch, 4, 2, 8)  # the next phase's loader: said once
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "/dev/shm holds 64 MiB" in said[0] and "about 588 MiB" in said[0], said
    assert "4 worker(s) x 2 batches ahead + 2, of 7 MiB each, on 8 rank(s)" in said[0] and "--shm-size" in said[0]
    caplog.clear()
    assert check_room(batch, 4, 2, 1) is False and check_room(batch, 1, 2, 1) is True  # 4 batches fit
    monkeypatch.setattr(shared_memory, "shm_space", lambda path=None: None)  # no /dev/shm: nothing to say
    assert check_room(batch, 4, 2, 8) is True


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not can_mount(), reason="needs `unshare -m` and mount (root): a real tiny /dev/shm")
def test_a_full_dev_shm_stops_a_run_with_one_line_instead_of_a_hang(tmp_path, synth_corpus):
    """A 64 KiB /dev/shm (a real tmpfs in a mount namespace of the run's own), a loader worker: its batch does not
    fit. The run used to wait for ever (the queue's feeder thread printed the failure and dropped the batch); now
    it is warned of before the workers start and ends with one line and exit status 1, and the same command
    with room trains."""
    command = [sys.executable, str(ROOT / "pretrain" / "run.py"), "--recipe", str(RECIPE), "--run-dir",
               str(tmp_path / "run"), *tiny(synth_corpus, "data.num_workers=1")]
    script = "mount -t tmpfs -o size=64k tmpfs /dev/shm && exec " + " ".join(f"'{a}'" for a in command)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error(proc.stderr)
    assert "found no room in shared memory for a batch of 0.3" in line and "MiB (/dev/shm: " in line  # 4 clips
    assert "free of 0.06 MiB)" in line
    assert "--shm-size" in line and "data.num_workers" in line and "run the same command again to resume" in line
    assert "/dev/shm holds 0.06 MiB, less than the batches the loaders keep in flight" in proc.stderr
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "shared memory" not in proc.stderr, proc.stderr[-3000:]


def test_a_temporary_folder_too_long_for_the_workers_sockets_is_refused_before_they_start(tmp_path, synth_corpus,
                                                                                        monkeypatch):
    """A worker hands its batch over through a UNIX socket under $TMPDIR/pymp-XXXXXXXX/: under a folder of more than
    75 characters its path is too long, the queue's feeder thread printed 'AF_UNIX path too long' and dropped the
    batch, and the run waited for it for ever. The limit is the operating system's (a socket binds at 75, not at
    76), and a loader with workers refuses the folder before starting them."""
    import tempfile
    from multiprocessing.connection import Listener

    from common.data.loader import ClipLoader
    from common.data.manifests import open_cuts
    from common.data.shared_memory import check_socket_dir

    import shutil

    base = tempfile.mkdtemp(prefix="c2f-", dir="/tmp")  # short, whatever pytest's tmp_path is
    fits, too_long = (base + "/" + "d" * (n - len(base) - 1) for n in (75, 76))
    try:
        for folder, binds in ((fits, True), (too_long, False)):
            os.makedirs(os.path.join(folder, "pymp-abcdefgh"))
            address = os.path.join(folder, "pymp-abcdefgh", "listener-abcdefgh")
            try:
                Listener(address, "AF_UNIX").close()
                bound = True
            except OSError as err:
                assert "too long" in str(err)
                bound = False
            assert bound == binds, folder
    finally:
        shutil.rmtree(base)
    check_socket_dir(fits)
    with pytest.raises(ValueError, match=rf"^the temporary folder {too_long} \(TMPDIR\) is too long for the sockets "
                                         r"the loader's workers hand their batches through \(108 bytes"):
        check_socket_dir(too_long)
    monkeypatch.setattr(tempfile, "tempdir", too_long)
    monkeypatch.setattr("common.data.loader.loader_workers", lambda n: n)  # a worker on any machine
    loader = ClipLoader(open_cuts([synth_corpus / "synth_valid.jsonl.gz"]), ClipDataset(16000, seed=1), 4,
                        shuffle=False, drop_last=False, rank=0, world_size=1, num_workers=1)
    with pytest.raises(ValueError, match="set TMPDIR to a folder of at most 75 characters"):
        next(iter(loader.batches()))
