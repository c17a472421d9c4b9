"""A one-process run joins its process group without a port (the store lives in the process), also where a
launcher named one; several processes meet at MASTER_ADDR:MASTER_PORT, and say so when they cannot."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time

import pytest
import torch

from common.system.distributed import RendezvousFailed, init_distributed


def _store():
    """The default group's store under its prefixes."""
    store = torch.distributed.distributed_c10d._get_default_store()
    while isinstance(store, torch.distributed.PrefixStore):
        store = store.underlying_store
    return store


def test_one_process_on_the_cpu_uses_a_store_in_the_process_and_no_master_port(monkeypatch):
    for key in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for _ in range(2):  # a second run in the same process (a notebook, the demo) joins afresh
        dist = init_distributed()
        try:
            store = _store()
            assert isinstance(store, torch.distributed.HashStore), type(store)
            assert "MASTER_PORT" not in os.environ
            assert (dist.rank, dist.world_size) == (0, 1)
            assert dist.all_reduce_sum(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]
            assert dist.broadcast_object({"a": 1}) == {"a": 1}
        finally:
            dist.teardown()
        assert not torch.distributed.is_initialized()


@contextlib.contextmanager
def _port_held():
    """A port another program (another job's rendezvous) listens on."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_one_process_opens_no_port_even_where_a_launcher_names_one_that_another_job_holds(monkeypatch):
    """`deepspeed --num_gpus 1` gives every job MASTER_PORT=29500: two such jobs on one machine both run."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with _port_held() as port:
        monkeypatch.setenv("MASTER_PORT", str(port))
        dist = init_distributed()
        try:
            assert isinstance(_store(), torch.distributed.HashStore), type(_store())
            assert dist.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
        finally:
            dist.teardown()


def test_rank_0_of_several_on_a_port_another_job_holds_says_so_at_once(monkeypatch):
    with _port_held() as port:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        start = time.monotonic()
        with pytest.raises(RendezvousFailed) as caught:
            init_distributed()
    assert time.monotonic() - start < 60
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "in use" in message and "deepspeed --master_port PORT" in message
    assert "\n" not in message
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("text, said", [
    ("The client socket has timed out after 1800000ms while trying to connect to (10.0.0.1, 29500).",
     "rank 1 could not meet rank 0 at 10.0.0.1:29500"),
    ("wait timeout after 60000ms, keys: /default_pg/0//cpu//0/0",  # another job's store on the port
     "rank 1 could not meet rank 0 at 10.0.0.1:29500 (MASTER_ADDR:MASTER_PORT) in time: is rank 0 running"),
    ("something else\nand more", "rank 1: the job's rendezvous at 10.0.0.1:29500 (MASTER_ADDR:MASTER_PORT) failed: "
                                 "something else"),
    ("Timed out after 1801 seconds waiting for clients. 1/2 clients joined.",
     "rank 0 waited at 10.0.0.1:29500 (MASTER_ADDR:MASTER_PORT) for the other ranks in vain (1/2 clients joined): "
     "were they all started"),
])
def test_a_rank_whose_rendezvous_fails_is_told_where_it_looked(monkeypatch, text, said):
    """What the client (a rank that cannot reach rank 0: DistNetworkError) and the server (rank 0, whose peers
    never came: DistStoreError) raise after the group's timeout, as one line from init_distributed."""
    import deepspeed

    for key, value in (("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "1"), ("LOCAL_RANK", "1"),
                       ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    error = torch.distributed.DistNetworkError if "client socket" in text else torch.distributed.DistStoreError

    def timed_out(**kwargs):
        raise error(text)

    monkeypatch.setattr(deepspeed, "init_distributed", timed_out)
    with pytest.raises(RendezvousFailed) as caught:
        init_distributed()
    assert str(caught.value).startswith(said) and "\n" not in str(caught.value)


def test_several_ranks_without_a_rendezvous_are_refused_at_once(monkeypatch):
    """Each rank would pick a port of its own and wait for the others until the group's timeout (30 minutes)."""
    for key in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set: start several ranks "
                                         "with a launcher"):
        init_distributed()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but MASTER_PORT not set"):
        init_distributed()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("launcher", ["SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", None])
def test_a_rank_started_without_local_rank_takes_its_launchers_place_on_the_host(monkeypatch, launcher):
    """srun and mpirun set no LOCAL_RANK: every rank took 0, the host's first GPU (NCCL stops at the first
    collective on a duplicate GPU); the launcher's own variable says the rank's place on its host."""
    for key in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "SLURM_LOCALID", "SLURM_PROCID",
                "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    if launcher:
        monkeypatch.setenv(launcher, "1")
        monkeypatch.setenv("SLURM_PROCID", "5")  # srun started this process as rank 5
    import deepspeed

    seen = {}

    def rendezvous(**_):
        seen["LOCAL_RANK"] = os.environ["LOCAL_RANK"]
        raise RuntimeError("no rendezvous in this test")

    monkeypatch.setattr(deepspeed, "init_distributed", rendezvous)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "9")
    with pytest.raises(RuntimeError, match="no rendezvous in this test"):
        init_distributed()
    assert seen == {"LOCAL_RANK": "1" if launcher else "0"}
    assert "LOCAL_RANK" not in os.environ  # what it filled in is given back when it fails


def test_each_rank_takes_its_own_device_or_the_one_it_is_bound_to(monkeypatch):
    """Local rank N takes device N; a rank bound to one GPU (srun --gpus-per-task=1: it sees its GPU as number 0)
    takes that one; more ranks on a host than the devices they see is refused in one line naming both, where
    set_device failed with "invalid device ordinal" (or two ranks shared a GPU)."""
    from common.system.distributed import device_index

    assert [device_index(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert device_index(3, 1, bound=True) == 0  # srun --gpus-per-task=1
    monkeypatch.setenv("RANK", "7")
    with pytest.raises(ValueError, match=r"^rank 7: LOCAL_RANK=1, but this process sees 1 device"):
        device_index(1, 1)  # torchrun --nproc-per-node 2 on a one-GPU host: both ranks took it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with pytest.raises(ValueError, match=r"^rank 7: LOCAL_RANK=2, but this process sees 2 device\(s\) "
                                         r"\(CUDA_VISIBLE_DEVICES=3,5\): start at most one rank per device"):
        device_index(2, 2)


def test_mpirun_inside_a_slurm_job_takes_its_own_local_rank():
    """Ranks of mpirun inside an sbatch job inherit the batch step's SLURM_LOCALID (0 on every rank): the innermost
    launcher's says the place; SLURM_LOCALID only where srun started this very rank."""
    from common.system.distributed import local_rank_of_launcher

    assert local_rank_of_launcher({"RANK": "5", "SLURM_LOCALID": "0", "SLURM_PROCID": "0",
                                   "OMPI_COMM_WORLD_LOCAL_RANK": "3"}) == "3"
    assert local_rank_of_launcher({"RANK": "5", "SLURM_LOCALID": "1", "SLURM_PROCID": "5"}) == "1"
    assert local_rank_of_launcher({"RANK": "5", "SLURM_LOCALID": "0", "SLURM_PROCID": "0"}) is None
    assert local_rank_of_launcher({"RANK": "5", "MPI_LOCALRANKID": "2"}) == "2"


def test_names_and_output_folders_from_a_user_are_refused_when_they_would_mislead():
    """A task name with a newline (a run directory's name in every log line) is no plain name; an empty --out is
    refused (Path("") is the working folder: embed --out "" wrote its files there)."""
    from common.system.disk import output_folder
    from common.system.paths import is_plain_name

    assert is_plain_name("esc50 fold 1") and is_plain_name("vóx")
    assert not any(is_plain_name(n) for n in ("a\nb", "a\tb", "a\x7fb", "a\0b", "a/b", "..", ""))
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="^--out is empty; name the folder to write into"):
            output_folder(empty)


def test_an_accelerator_other_than_cuda_or_the_cpu_is_refused_in_one_line(monkeypatch):
    """DeepSpeed looks for Apple's MPS before CUDA and the CPU: a Mac's training picked it, then failed with a
    traceback at the first float64 sum on the device."""
    import deepspeed.accelerator

    class _MPS:
        def device_name(self):
            return "mps"

    for key in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _MPS())
    with pytest.raises(ValueError, match=r"^DeepSpeed's accelerator here is 'mps', which this package does not train "
                                         r"on .*: set DS_ACCELERATOR=cpu to train on the CPU$"):
        init_distributed()
    assert not torch.distributed.is_initialized()
    assert not [key for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR") if key in os.environ]


@pytest.mark.parametrize("key, value, said", [("RANK", "x", "RANK: expected a whole number (0 or more), got 'x'"),
                                              ("LOCAL_RANK", "-1", "LOCAL_RANK: expected a whole number (0 or more)"),
                                              ("WORLD_SIZE", "two", "WORLD_SIZE: expected a whole number of ranks")])
def test_a_malformed_launcher_variable_is_named(monkeypatch, key, value, said):
    for name in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=rf"^{re.escape(said)}"):  # DeepSpeed's own: "invalid literal for int()"
        init_distributed()
    assert os.environ[key] == value and not torch.distributed.is_initialized()


def test_launcher_variables_are_read_as_numbers_and_given_back_as_written(monkeypatch):
    """WORLD_SIZE "01" or "" is one process for every reader (the batch plan read 1, the process group 2)."""
    for name in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for written in ("01", "", " 1"):
        monkeypatch.setenv("WORLD_SIZE", written)
        dist = init_distributed()
        try:
            assert (dist.rank, dist.world_size) == (0, 1)
        finally:
            dist.teardown()
        assert os.environ["WORLD_SIZE"] == written


def test_a_failed_start_leaves_no_process_group(monkeypatch):
    """One process makes its group before DeepSpeed joins it: a failure there left the group, which the next run of
    the process (a notebook's) took for its caller's and never destroyed."""
    import deepspeed

    for name in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def fails(**_):
        raise RuntimeError("DeepSpeed failed")

    monkeypatch.setattr(deepspeed, "init_distributed", fails)
    hook = sys.excepthook
    with pytest.raises(RuntimeError, match="DeepSpeed failed"):
        init_distributed()
    assert not torch.distributed.is_initialized() and sys.excepthook is hook
    monkeypatch.undo()
    for name in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    dist = init_distributed()
    assert dist.owned
    dist.teardown()
