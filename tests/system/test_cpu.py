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
        monkeypatch.setattr(cpu, "_cgroup_cores", lambda: None)  # no CPU quota (whatever the test machine's)
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

    monkeypatch.setattr(cpu, "_cgroup_memory", lambda: None)  # no cgroup limit (whatever the test machine's)
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


def _cgroups(tmp_path, monkeypatch, membership: str, files: dict[str, str], mounted: dict[str, str] = {}) -> None:
    """A cgroup tree under ``tmp_path`` (``files``: path -> content, folders made), this process's
    ``/proc/self/cgroup`` (``membership``) and the mounts' roots (``mounted``: folder of the tree -> the cgroup
    mounted there), which common.system.cpu reads instead of the machine's."""
    for name, text in files.items():
        path = tmp_path / "cg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "proc_cgroup").write_text(membership)
    (tmp_path / "mountinfo").write_text("".join(f"40 30 0:4{i} {root} {tmp_path / 'cg' / folder} rw - cgroup "
                                                f"cgroup rw\n" for i, (folder, root) in enumerate(mounted.items())))
    monkeypatch.setattr(cpu, "CGROUP_ROOT", str(tmp_path / "cg"))
    monkeypatch.setattr(cpu, "PROC_CGROUP", str(tmp_path / "proc_cgroup"))
    monkeypatch.setattr(cpu, "MOUNTINFO", str(tmp_path / "mountinfo"))


GiB = 2**30


@pytest.mark.parametrize("layout", ["v2", "v1", "hybrid"])
def test_a_cgroups_memory_limit_bounds_the_memory_a_job_counts_on(tmp_path, monkeypatch, layout):
    """A SLURM job's --mem or a container's limit (cgroup v2's memory.max, v1's memory.limit_in_bytes, on the job's
    cgroup above the task's) bounds what the clip cache and the balanced sampler count on: the machine's free
    memory was read alone, and a job past its limit is killed, whatever the machine has free."""
    job = "system.slice/job_7/step_0/task_0"
    if layout == "v2":
        files = {"system.slice/job_7/memory.max": f"{4 * GiB}\n", "system.slice/job_7/memory.current": f"{GiB}\n",
                 f"{job}/memory.max": "max\n", f"{job}/memory.current": f"{GiB // 2}\n"}
        membership = f"0::/{job}\n"
    else:
        v1 = "memory/system.slice/job_7"
        files = {f"{v1}/memory.limit_in_bytes": f"{4 * GiB}\n", f"{v1}/memory.usage_in_bytes": f"{GiB}\n",
                 f"memory/{job}/memory.limit_in_bytes": f"{2**63 - 4096}\n",  # v1's "no limit"
                 f"memory/{job}/memory.usage_in_bytes": f"{GiB // 2}\n"}
        membership = f"4:memory:/{job}\n1:cpu,cpuacct:/\n" + ("0::/\n" if layout == "hybrid" else "")
    _cgroups(tmp_path, monkeypatch, membership, files)
    assert cpu._cgroup_memory() == (4 * GiB, 3 * GiB)
    monkeypatch.setattr(cpu, "_memory", lambda key, pages: 500 * GiB)  # a large machine, mostly free
    assert cpu.available_memory() == 3 * GiB and cpu.total_memory() == 4 * GiB
    (tmp_path / "proc_cgroup").write_text("0::/\n")  # no limit anywhere: the machine's
    assert cpu._cgroup_memory() is None and cpu.available_memory() == 500 * GiB


def test_a_cgroups_page_cache_is_memory_it_can_have_and_its_smallest_limit_is_its_total(tmp_path, monkeypatch):
    """The page cache a job's cgroup is charged for (its data staged to local disk, a prepare before training)
    is memory the kernel reclaims first, not used: counting it left a memory clip cache of nothing. The total is
    the smallest limit on the way up, the headroom the least any limit leaves."""
    job = "job_7/step_0"
    _cgroups(tmp_path, monkeypatch, f"0::/{job}\n", {
        "job_7/memory.max": f"{4 * GiB}\n", "job_7/memory.current": f"{int(3.5 * GiB)}\n",
        "job_7/memory.stat": f"anon {GiB // 2}\ninactive_file {3 * GiB}\nactive_file 0\n",
        f"{job}/memory.max": f"{2 * GiB}\n", f"{job}/memory.current": f"{GiB}\n",
        f"{job}/memory.stat": f"anon {GiB // 4}\ninactive_file {GiB // 2}\n"})
    assert cpu._cgroup_memory() == (2 * GiB, int(1.5 * GiB))  # the step's 2 GiB less its 0.5 GiB not reclaimable


def test_a_container_without_a_cgroup_namespace_reads_its_own_limit_not_a_folder_of_the_same_name(tmp_path,
                                                                                                 monkeypatch):
    """In a container without a cgroup namespace, /proc/self/cgroup names the host's path (/docker/ID) while the
    mounted tree's root is the container's own cgroup: the path is read below the mount's root, so a folder of
    the tree that happens to be named like the host's (docker-in-docker's docker/) is not taken for ours."""
    _cgroups(tmp_path, monkeypatch, "4:memory:/docker/abc\n", {
        "memory/memory.limit_in_bytes": f"{8 * GiB}\n", "memory/memory.usage_in_bytes": f"{GiB}\n",
        "memory/docker/memory.limit_in_bytes": f"{GiB}\n", "memory/docker/memory.usage_in_bytes": f"{GiB}\n"},
        mounted={"memory": "/docker/abc"})
    assert cpu._cgroup_folders("memory") == [str(tmp_path / "cg" / "memory")]
    assert cpu._cgroup_memory() == (8 * GiB, 7 * GiB)


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_a_cgroups_cpu_quota_bounds_the_cores_a_job_sizes_its_threads_by(tmp_path, monkeypatch, layout):
    """A CPU quota (docker --cpus 2.5, a Kubernetes CPU limit) bounds the cores the workers and threads are sized
    by: a pod limited to 2.5 cores of a 64-core machine sized them for 64, and the quota throttled them all."""
    if layout == "v2":
        files = {"pod/cpu.max": "250000 100000\n", "pod/c1/cpu.max": "max 100000\n"}
        membership = "0::/pod/c1\n"
    else:
        files = {"cpu,cpuacct/pod/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/pod/cpu.cfs_period_us": "100000\n",
                 "cpu,cpuacct/pod/c1/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/pod/c1/cpu.cfs_period_us": "100000\n"}
        membership = "4:memory:/pod/c1\n2:cpu,cpuacct:/pod/c1\n"
    _cgroups(tmp_path, monkeypatch, membership, files)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(64)))
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    assert cpu._cgroup_cores() == 3 and cpu.machine_cores() == 3  # 2.5 cores, rounded up
    assert cpu.loader_workers(8) == 2 and cpu.intra_op_threads(2)[0] == 1
    (tmp_path / "proc_cgroup").write_text("0::/\n")
    assert cpu._cgroup_cores() is None and cpu.machine_cores() == 64


def test_a_memory_cache_is_the_nodes_ranks_share(monkeypatch):
    """Every rank of a node keeps a memory cache of the clips it is dealt (in time, every clip): each takes half of
    the memory available over the node's ranks, where each took half of it (8 ranks: four times the node)."""
    from common.data.cache import ClipCache

    monkeypatch.setattr("common.data.cache.available_memory", lambda: 16 * GiB)
    for ranks, budget in ((None, 8 * GiB), (2, 4 * GiB), (8, GiB)):
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.delenv("LOCAL_SIZE", raising=False)
        if ranks:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert ClipCache("memory").max_bytes == budget
