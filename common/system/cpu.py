"""A rank's share of the CPU: its loader workers and the intra-op threads of its training process.

A node's cores (``os.sched_getaffinity``: the cores this process may run on, which a container or a job
scheduler may limit; fewer where its cgroup's CPU quota allows fewer, as ``docker --cpus`` and Kubernetes' CPU
limits set it) are shared by the node's ranks (``LOCAL_WORLD_SIZE`` from torchrun, ``LOCAL_SIZE``
from the deepspeed launcher; 1 without a launcher). Each rank runs its training process and
``data.num_workers`` decoding processes (one thread each: PyTorch sets it in loader workers). The rule:

- loader workers: ``min(data.num_workers, cores per rank - 1)`` (at least 0): one core stays with the
  training process, and a machine is never asked for more workers than it has cores (PyTorch's DataLoader
  warns past the core count: 4 workers on 2 cores). A lowered value is said once;
- intra-op threads of the training process (``torch.set_num_threads``, once per run in
  ``common.cli.training_session``): ``max(1, cores per rank - loader workers)``, where OpenMP's default is
  every core of the machine, which 8 ranks with 8 workers each oversubscribe many times over.
  ``train.cpu_threads: N`` sets it; without it an ``OMP_NUM_THREADS`` in the environment is respected
  (torchrun sets 1, deepspeed's ``--bind_cores_to_rank`` the number of cores it binds).

And a training process on the CPU keeps the memory it frees (:func:`keep_freed_memory`): glibc's malloc
hands tensors above its mmap threshold straight back to the kernel when they are freed, so every step's
activations were fresh pages, zeroed by the kernel on their first touch (a million page faults in a
minute of HTS-AT training); with the threshold at its 32 MiB maximum and no trimming below 1 GiB, a step
reuses the last step's memory. On the sampled-instruments HTS-AT run this took 8 % off the coarse step
and about 5 % off the full one (``bench/README.md``). What PyTorch's CPU tuning guide gets from jemalloc or
tcmalloc, without a preload.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

__all__ = ["machine_cores", "local_ranks", "cores_per_rank", "loader_workers", "intra_op_threads",
           "set_cpu_threads", "keep_freed_memory", "available_memory", "total_memory"]

log = logging.getLogger(__name__)

_said: set = set()  # lowered worker counts already logged in this process


# the cgroup file systems (v2: one tree; v1: one per controller), this process's place in them, and where they
# are mounted from (a container without a cgroup namespace mounts its own cgroup as the tree's root)
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
MOUNTINFO = "/proc/self/mountinfo"


def _mount_root(mount_point: str) -> str:
    """The cgroup path mounted at ``mount_point`` (``/proc/self/mountinfo``'s fourth field): ``/`` on a host or in
    a cgroup namespace, the container's own cgroup (``/docker/ID``) in one without; ``/`` where it does not say."""
    try:
        with open(MOUNTINFO) as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 4 and os.path.normpath(fields[4]) == os.path.normpath(mount_point):
                    return fields[3]
    except OSError:
        pass
    return "/"


def _cgroup_folders(controller: str) -> list[str]:
    """This process's cgroup folders for ``controller`` (``memory``, ``cpu``), its own first and then each
    parent's up to the root of the tree (a limit may sit on a job's cgroup above the task's); empty where there
    is no cgroup file system (not Linux, no such controller)."""
    try:
        with open(PROC_CGROUP) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        names = controllers.split(",")
        if controllers == "" or controller in names:  # v2's one line ("0::/path"), or v1's for the controller
            root = CGROUP_ROOT if controllers == "" else os.path.join(CGROUP_ROOT, controllers)
            if not os.path.isdir(root):
                root = os.path.join(CGROUP_ROOT, controller)  # v1 mounted by the controller's name alone
            mounted = _mount_root(root).rstrip("/")
            if mounted and (path == mounted or path.startswith(mounted + "/")):
                path = path[len(mounted):]  # the path below the mount's root: no host folder taken for ours
            parts = [p for p in path.strip("/").split("/") if p]
            folders = [os.path.join(root, *parts[:n]) for n in range(len(parts), -1, -1)]
            return [f for f in folders if os.path.isdir(f)]
    return []


def _read_number(folder: str, name: str) -> int | None:
    """The first number in ``folder/name``; None where it is absent, ``max`` (no limit) or not a number."""
    try:
        with open(os.path.join(folder, name)) as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat_field(folder: str, name: str) -> int:
    """A field of ``folder/memory.stat`` in bytes (0 where it is absent)."""
    try:
        with open(os.path.join(folder, "memory.stat")) as handle:
            for line in handle:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_memory() -> tuple[int, int] | None:
    """``(limit, headroom)`` in bytes of this process's cgroups' memory limits (SLURM's ``--mem``, a container's
    limit): the smallest limit, and the least any limit leaves now (the limit less what its cgroup uses, the page
    cache the kernel reclaims first not counted: a job that staged its data has it charged); None without one."""
    limits, headrooms = [], []
    for folder in _cgroup_folders("memory"):
        limit = _read_number(folder, "memory.max")
        if limit is not None:  # v2
            used, inactive = _read_number(folder, "memory.current"), _stat_field(folder, "inactive_file")
        else:  # v1
            limit, used = _read_number(folder, "memory.limit_in_bytes"), _read_number(folder, "memory.usage_in_bytes")
            inactive = _stat_field(folder, "total_inactive_file")
        if limit is None or limit >= 2**60:  # v1 writes "no limit" as a page-rounded 2**63
            continue
        limits.append(limit)
        headrooms.append(max(0, limit - max(0, (used or 0) - inactive)))
    return (min(limits), min(headrooms)) if limits else None


def _cgroup_cores() -> int | None:
    """The cores the CPU quota of this process's cgroups allows (quota over period, rounded up); None without a
    quota."""
    tightest = None
    for folder in _cgroup_folders("cpu"):
        quota = period = None
        try:
            with open(os.path.join(folder, "cpu.max")) as handle:
                fields = handle.read().split()
            if fields and fields[0] != "max":
                quota, period = int(fields[0]), int(fields[1])
        except (OSError, ValueError, IndexError):
            quota, period = _read_number(folder, "cpu.cfs_quota_us"), _read_number(folder, "cpu.cfs_period_us")
        if quota is None or period is None or quota <= 0 or period <= 0:  # v1's -1: no quota
            continue
        cores = max(1, -(-quota // period))
        tightest = cores if tightest is None else min(tightest, cores)
    return tightest


def machine_cores() -> int:
    """The cores this process may run on: its affinity, or fewer where its cgroup's CPU quota allows fewer."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cores()
    return cores if quota is None else min(cores, quota)


def _memory(key: str, pages: str) -> int:
    """``/proc/meminfo``'s ``key`` in bytes, else the system's count of ``pages``; 8 GiB where neither says."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def available_memory() -> int:
    """Bytes of memory a process could take on this machine now: Linux's ``MemAvailable`` (free memory and the page
    cache the kernel gives back on demand), else the free pages; no more than its cgroup's memory limit leaves
    (a job's ``--mem``, a container's limit: past it the job is killed, whatever the machine has free)."""
    cgroup = _cgroup_memory()
    free = _memory("MemAvailable", "SC_AVPHYS_PAGES")
    return free if cgroup is None else min(free, cgroup[1])


def total_memory() -> int:
    """Bytes of memory this machine has (``MemTotal``, else the physical pages), or its cgroup's limit where that
    is less."""
    cgroup = _cgroup_memory()
    total = _memory("MemTotal", "SC_PHYS_PAGES")
    return total if cgroup is None else min(total, cgroup[0])


def local_ranks() -> int:
    """Ranks on this node (the launcher's ``LOCAL_WORLD_SIZE`` / ``LOCAL_SIZE``; 1 without one)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def cores_per_rank() -> int:
    """This rank's share of the cores: those it may run on over the ranks on the node, or all of them where the
    launcher bound each rank to its own (``deepspeed --bind_cores_to_rank`` narrows the affinity to the rank's
    cores and sets ``OMP_NUM_THREADS`` to their number: dividing again would leave a rank a fraction)."""
    cores, ranks = machine_cores(), local_ranks()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if ranks > 1 and threads.isdigit() and int(threads) == cores:
        return cores
    return max(1, cores // ranks)


def loader_workers(requested: int) -> int:
    """The decoding processes a rank starts for ``data.num_workers = requested`` (see the module docstring)."""
    granted = max(0, min(requested, cores_per_rank() - 1))
    if granted < requested and (requested, granted) not in _said:
        _said.add((requested, granted))
        log.info("decoding workers: %d asked, %d per rank: %d core(s) for %d rank(s) on this machine, one kept for "
                 "the main process", requested, granted, machine_cores(), local_ranks())
    return granted


def intra_op_threads(workers: int, override: int | None = None) -> tuple[int | None, str]:
    """``(threads, why)`` for a rank's training process with ``workers`` loader workers; ``threads`` is None
    where the environment's ``OMP_NUM_THREADS`` decides."""
    if override is not None:
        return override, "train.cpu_threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    return max(1, cores_per_rank() - workers), (f"{machine_cores()} core(s) / {local_ranks()} rank(s) - {workers} "
                                                f"loader worker(s)")


def set_cpu_threads(workers: int, override: int | None = None) -> int:
    """Set this process's intra-op threads by :func:`intra_op_threads`; returns the number in use."""
    threads, why = intra_op_threads(workers, override)
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("CPU threads of the training process: %d (%s)", torch.get_num_threads(), why)
    return torch.get_num_threads()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (64-bit): smaller blocks come from the heap and are reused
TRIM_THRESHOLD = 2**30  # free memory at the top of the heap kept up to this before it goes back to the kernel
_kept: list[bool] = []  # done in this process (a setting of the process: once)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep and reuse the memory this process frees (see the module docstring); True
    if it does now, False where the C library is not glibc (macOS, musl: nothing is changed)."""
    if _kept:
        return _kept[0]
    done = False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None) if libc is not None and hasattr(libc, "gnu_get_libc_version") \
            else None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD))
    except OSError:
        done = False
    _kept.append(done)
    if done:
        log.info("CPU memory: freed blocks up to %d MiB are kept for reuse (malloc's mmap threshold; no trim below "
                 "%d MiB)", MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
    return done
