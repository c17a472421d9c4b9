"""A rank's share of the CPU: loader workers that fit the cores, intra-op threads from the cores left, the
environment's OMP_NUM_THREADS and the recipe's override respected; no DataLoader warning on a small machine."""

import os
import warnings

import pytest
import torch

from common.data.clips import ClipDataset
from common.data.loader import ClipLoader
from common.data.manifests import open_cuts
from common.system import cpu


@pytest.fixture
def machine(monkeypatch):
    """A machine of N cores with L ranks on it and no OMP_NUM_THREADS: ``machine(N, L)``."""
    def make(cores: int, ranks: int | None = None, launcher: str = "LOCAL_WORLD_SIZE"):
        monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(cores)))
        for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMP_NUM_THREADS"):
            monkeypatch.delenv(key, raising=False)
        if ranks is not None:
            monkeypatch.setenv(launcher, str(ranks))
    return make


@pytest.mark.parametrize("cores, ranks, requested, workers, threads", [
    (2, None, 4, 1, 1),    # the development machine: a task file's 4 workers would be more than its cores
    (2, None, 0, 0, 2),    # decoding in the training process: both cores are its threads
    (16, None, 4, 4, 12),  # one rank: the cores its 4 workers leave
    (16, 8, 8, 1, 1),      # 8 ranks with 8 workers each: 2 cores a rank, OpenMP's default would take 16
    (16, 2, 8, 7, 1),
    (48, 3, 8, 8, 8),      # 3 ranks: 16 cores each
])
def test_workers_and_threads_follow_the_cores_of_a_rank(machine, cores, ranks, requested, workers, threads):
    machine(cores, ranks)
    assert cpu.cores_per_rank() == cores // (ranks or 1)
    assert cpu.loader_workers(requested) == workers
    assert cpu.intra_op_threads(workers) == (threads, f"{cores} core(s) / {ranks or 1} rank(s) - {workers} loader "
                                                      f"worker(s)")


def test_the_deepspeed_launchers_local_size_counts_too(machine):
    machine(12, 3, launcher="LOCAL_SIZE")
    assert cpu.local_ranks() == 3 and cpu.cores_per_rank() == 4 and cpu.loader_workers(4) == 3


def test_a_rank_the_launcher_bound_to_its_cores_has_them_all(machine, monkeypatch):
    """``deepspeed --bind_cores_to_rank`` runs each of 8 ranks of a 64-core node on its own 8 cores and sets
    OMP_NUM_THREADS=8: those 8 are the rank's (not 8 / 8 ranks = 1, which left no loader worker)."""
    machine(8, 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert cpu.cores_per_rank() == 8 and cpu.loader_workers(4) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a node-wide affinity shared by the ranks: divided as before
    assert cpu.cores_per_rank() == 1 and cpu.loader_workers(4) == 0


def test_omp_num_threads_and_the_recipe_decide_when_given(machine, monkeypatch):
    machine(16, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu.intra_op_threads(4) == (None, "OMP_NUM_THREADS=3")
    assert cpu.intra_op_threads(4, override=5) == (5, "train.cpu_threads")
    before = torch.get_num_threads()
    try:
        assert cpu.set_cpu_threads(4, override=2) == 2 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert cpu.set_cpu_threads(4) == 4  # 8 cores a rank, 4 of them decoding
    finally:
        torch.set_num_threads(before)


def test_a_cpu_threads_setting_is_checked_and_may_change_on_resume():
    from common.training.run_recipe import recipe_diff
    from common.training.spec import TrainConfig

    with pytest.raises(ValueError, match="cpu_threads must be >= 1"):
        TrainConfig(cpu_threads=0)
    assert recipe_diff({"train": {"cpu_threads": None}}, {"train": {"cpu_threads": 4}}) == []


def test_four_workers_on_two_cores_start_without_the_loaders_warning(machine, synth_corpus):
    machine(2)
    loader = ClipLoader(open_cuts([synth_corpus / "synth_train.jsonl.gz"]), ClipDataset(16000), 4, shuffle=False,
                        drop_last=False, rank=0, world_size=1, num_workers=4)
    assert loader.num_workers == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = loader.batches(epochs=1)
        assert len(next(batches)) == 4
        batches.close()
    # PyTorch's "This DataLoader will create 4 worker processes in total. Our suggested max number of worker ..."
    assert not [w for w in caught if "worker" in str(w.message)]


def test_a_training_session_sets_the_threads_and_gives_them_back(machine, tmp_path, caplog):
    import logging

    from common.cli import training_session
    from finetune.recipe import load_recipe

    machine(2)
    recipe = load_recipe("synth", overrides=["data.num_workers=4"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level(logging.INFO, logger="common.system.cpu"), training_session(tmp_path / "run", recipe):
            assert torch.get_num_threads() == 1  # 2 cores: 1 loader worker, 1 thread
        assert torch.get_num_threads() == 2
        assert "CPU threads of the training process: 1 (2 core(s) / 1 rank(s) - 1 loader worker(s))" in caplog.text
    finally:
        torch.set_num_threads(before)


_PAGE_FAULTS = """
import resource, sys
import torch
from common.system.cpu import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # once per process; asked again, the same answer
SIZES = [(i % 7 + 1) * 300_000 for i in range(24)]  # 1.2 to 8.4 MB blocks
def step():  # the forward keeps its activations, the backward frees them out of order making gradients
    held = [torch.empty(n).fill_(1) for n in SIZES]
    for i in range(0, len(held), 2):
        held[i] = None
        held.append(torch.empty(SIZES[i] // 2).fill_(1))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
start = faults()
for _ in range(20):
    step()
print((faults() - start) / 20)
"""


@pytest.mark.skipif(not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""),
                    reason="glibc's malloc only")
def test_a_cpu_run_reuses_the_memory_it_frees():
    """With glibc's defaults a step's blocks of a few MB are largely fresh pages each step (measured: 3,700 page
    faults a step here, though glibc's self-adjusting mmap threshold sometimes settles lower: 124 once, in a full
    test run); kept, a step reuses the memory the last one freed (measured: 120). Asserted: the kept figure,
    which the settings guarantee whatever the defaults did."""
    import subprocess
    import sys

    def faults(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        return float(out.stdout.strip())

    default, kept = faults("default"), faults("keep")
    assert kept < 400, (default, kept)  # a fresh 1.2-8.4 MB block a step would be thousands


def test_memory_is_read_as_linux_gives_it(monkeypatch):
    """``available_memory`` is ``MemAvailable`` (the page cache counts: the kernel gives it back), not the free pages,
    and never more than ``total_memory``; without /proc/meminfo the system's page counts stand in."""
    import builtins
    from pathlib import Path

    from common.system import cpu

    info = Path("/proc/meminfo")
    if info.is_file():
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in info.read_text().splitlines()}
        assert abs(cpu.available_memory() - fields["MemAvailable"]) < 2**28  # moments apart
        assert cpu.total_memory() == fields["MemTotal"]
    assert 0 < cpu.available_memory() <= cpu.total_memory()
    real_open = builtins.open

    def no_meminfo(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_meminfo)
    assert 0 < cpu.available_memory() <= cpu.total_memory()
