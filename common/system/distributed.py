"""Process-group setup for DeepSpeed on 1..N GPUs, several nodes, or the CPU (gloo).

Works under every launcher: ``deepspeed`` (which passes ``--local_rank`` and sets RANK / WORLD_SIZE /
MASTER_*), ``torchrun``, and plain ``python`` for one process, for which the environment DeepSpeed
requires is filled in here (without RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT it looks
for MPI and fails). One process opens no port: its group's store lives in the process, so any number of
one-process jobs run side by side on a machine, also under ``deepspeed --num_gpus 1``, which gives every job
port 29500 (``torchrun`` binds its own store on its port first: ``torchrun --standalone`` picks a free one).
Several ranks meet at MASTER_ADDR:MASTER_PORT; a port another job holds, a rank 0 that cannot be reached, or
ranks that never come end the rank with :class:`RendezvousFailed`, which says how to launch (c10d's own C++
log lines about the failed connection may come before it). On the CPU DeepSpeed would JIT-compile its
shared-memory allreduce op on first use (20-110 s); gloo's allreduce is used instead. Teardown is explicit:
without it 2-rank runs abort at exit now and then (SIGABRT, "terminate called without an active exception",
5 of 40 runs).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from common.system import launcher
from common.system.gpu import unseen_gpu, unsupported_gpu

__all__ = ["Dist", "RendezvousFailed", "init_distributed", "device_index", "local_rank_of_launcher",
           "collective_timeout", "quiet_deepspeed", "single_process"]

log = logging.getLogger(__name__)


class RendezvousFailed(ValueError):
    """The ranks could not meet: rank 0 could not listen on ``MASTER_PORT`` (another job's), or a rank could not
    reach rank 0 there. Says which, and how to launch so that they do."""

    def __init__(self, err: Exception) -> None:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        rank, text = os.environ.get("RANK", "?"), str(err)
        first = text.splitlines()[0] if text else type(err).__name__
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            message = (f"rank 0 cannot open the job's rendezvous on {where} (MASTER_ADDR:MASTER_PORT): the port is in "
                       f"use, by another job on this machine? Launch with a free port: deepspeed --master_port PORT "
                       f"(torchrun --master-port PORT; ranks started by hand: MASTER_PORT=PORT for every rank)")
        elif "waiting for clients" in text:  # rank 0: the others did not all come
            joined = text.split("waiting for clients.", 1)[1].strip().rstrip(".") if "clients." in text else ""
            message = (f"rank 0 waited at {where} (MASTER_ADDR:MASTER_PORT) for the other ranks in vain"
                       f"{f' ({joined})' if joined else ''}: were they all started, with this MASTER_ADDR, "
                       f"MASTER_PORT and WORLD_SIZE={os.environ.get('WORLD_SIZE', '?')}?")
        elif "timed out" in text.lower() or "timeout" in text.lower():
            message = (f"rank {rank} could not meet rank 0 at {where} (MASTER_ADDR:MASTER_PORT) in time: is rank 0 "
                       f"running, is MASTER_ADDR an address this host reaches, and is the port this job's (not another "
                       f"job's)? ({first})")
        else:
            message = f"rank {rank}: the job's rendezvous at {where} (MASTER_ADDR:MASTER_PORT) failed: {first}"
        super().__init__(message)


@dataclass
class Dist:
    """This process's place in the job, and the few collectives the trainer needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owned: bool = True  # the process group was made for this run (teardown destroys it), not found (a caller's)
    before: dict = field(default_factory=dict, repr=False, compare=False)  # the process's state teardown gives back

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place on a copy); a no-op for one process."""
        tensor = tensor.clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce_sum(value).item() > 0)

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank (pickled)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order (pickled; for evaluation outputs)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def teardown(self, synchronise: bool = True) -> None:
        """Barrier, destroy the process group, and make DeepSpeed forget it, so that a later run in the same
        process (a notebook, the demo, the tests) initialises afresh.

        ``synchronise=False`` (this rank is leaving on an error) skips the barrier: the other ranks may be inside
        another collective (a gradient all-reduce), which a barrier would meet and wait in for ever; leaving
        closes their connections instead, so they stop and say that a peer stopped.

        A process group the caller had made (a test harness's, a notebook's) is left to it; the launcher variables
        this process filled in are removed again, and one process's exception hook (which torch's process group
        wraps at every initialisation: ``[rank0]: [rank0]: ...`` after a few runs in a notebook) is given back."""
        if self.owned and torch.distributed.is_available() and torch.distributed.is_initialized():
            if synchronise:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        _give_back(self.before.get("environ", {}))
        if self.world_size == 1 and "excepthook" in self.before:  # (a job's ranks keep their prefix for good)
            sys.excepthook = self.before["excepthook"]
        _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """Make DeepSpeed forget the process group and the groups it derived from it."""
    # lazy: importing DeepSpeed takes seconds; --help and --dry-run do not need it
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    ds_comm.cdb = None
    ds_groups._WORLD_GROUP = None
    ds_groups._DATA_PARALLEL_GROUP = None
    for cache in (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP,
                  ds_groups._ALL_TO_ALL_GROUP):
        cache.clear()


class _Greetings(logging.Filter):
    """Drops DeepSpeed's notices that greet every command and say nothing about this run: its accelerator
    detection's "Setting accelerator to CPU ..." on a machine without a GPU (the run says its device
    itself). Every other DeepSpeed message passes."""
    GREETINGS = ("Setting accelerator to CPU",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.GREETINGS)


def quiet_deepspeed() -> None:
    """Install :class:`_Greetings` on DeepSpeed's logger (before ``import deepspeed``, which runs the detection;
    DeepSpeed resets the logger's level and handlers when it makes it, not its filters). Idempotent."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _Greetings) for f in logger.filters):
        logger.addFilter(_Greetings())


def single_process(command: str) -> None:
    """Refuse to run one-process ``command`` (prediction, evaluation, the probe, embedding) as several ranks of a
    launcher: each would repeat the whole work and write the same files.

    Raises:
        ValueError: naming the command and ``WORLD_SIZE``.
    """
    ranks = launcher.world_size()
    if ranks != 1:
        raise ValueError(f"{command} runs in one process, and this is one of WORLD_SIZE={ranks} ranks (each would "
                         f"repeat the whole work and write the same files): run it with python, not a launcher")


def _world_clone(timeout) -> None:
    """Make DeepSpeed's clone of the world group, the group ZeRO reduces gradients in and most of DeepSpeed's
    collectives run in, with the package's ``timeout`` (DeepSpeed's ``DEEPSPEED_TIMEOUT``, that of the world group).
    DeepSpeed clones the world group on first use with torch's default for a new group (30 min on gloo, 10 on NCCL),
    which ``DEEPSPEED_TIMEOUT`` does not reach: a stuck rank held the others there for 30 min. The clone is made
    here as DeepSpeed makes it (``deepspeed.utils.groups._clone_world_group``: every rank, in the same order),
    into DeepSpeed's own cache, which :meth:`Dist.teardown` clears."""
    # lazy: importing DeepSpeed takes seconds; --help and --dry-run do not need it
    import deepspeed.utils.groups as ds_groups

    if ds_groups._WORLD_GROUP is None and torch.distributed.get_world_size() > 1:
        ds_groups._WORLD_GROUP = torch.distributed.new_group(ranks=list(range(torch.distributed.get_world_size())),
                                                             timeout=timeout)


@contextmanager
def _waiting_notice(timeout_s: float):
    """While the ranks meet: when they have not all come after a tenth of ``timeout_s`` (at most 30 s), the first
    rank on each host (``LOCAL_RANK`` 0) says once on stderr that it waits, where, and how long it will (rank 0
    waits for every other rank; the first rank of another host waits for rank 0). Without it a job with a rank
    that never started sat silent up to ``DEEPSPEED_TIMEOUT``. One process says nothing."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world == "1" or os.environ.get("LOCAL_RANK", "0") != "0":
        yield
        return
    rank, after = os.environ.get("RANK", "?"), min(30.0, timeout_s / 10)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    whom = f"the other {int(world) - 1} rank(s)" if rank == "0" else "rank 0 and the job's other ranks"

    def say() -> None:
        print(f"rank {rank} (host {socket.gethostname()}): waiting for {whom} at {where} (MASTER_ADDR:MASTER_PORT) "
              f"for {after:.0f} s now; every rank stops if they have not all come within {timeout_s:.0f} s "
              f"(DEEPSPEED_TIMEOUT minutes, default 10)", file=sys.stderr, flush=True)

    timer = threading.Timer(after, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def collective_timeout() -> float:
    """Seconds a rank waits in a collective for the others before it stops (DeepSpeed's ``DEEPSPEED_TIMEOUT``, in
    minutes, default 10), for every group of the job (:func:`_world_clone`)."""
    # lazy: importing DeepSpeed takes seconds
    from deepspeed.constants import default_pg_timeout

    return default_pg_timeout.total_seconds()


def local_rank_of_launcher(env) -> str | None:
    """A rank's place on its host where its launcher set no LOCAL_RANK: Open MPI's or MPICH's mpirun (the innermost
    launcher: mpirun inside an sbatch job inherits the batch step's SLURM_LOCALID), else SLURM's srun, whose
    SLURM_LOCALID is this process's only where srun started it as this rank (SLURM_PROCID is RANK); None."""
    for key in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if key in env:
            return env[key]
    if "SLURM_LOCALID" in env and env.get("SLURM_PROCID") == env.get("RANK"):
        return env["SLURM_LOCALID"]
    return None


def device_index(local_rank: int, count: int, bound: bool = False) -> int:
    """The accelerator a rank with ``local_rank`` takes among the ``count`` it sees: its local rank, or, where its
    place came from srun or mpirun (``bound``), which may bind one device to each rank (srun --gpus-per-task=1:
    each rank sees its own GPU as number 0), the only one it sees.

    Raises:
        ValueError: more ranks on this host than devices they see (two ranks on one GPU would stop NCCL).
    """
    if local_rank < count:
        return local_rank
    if count == 1 and bound:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise ValueError(f"rank {os.environ.get('RANK', '?')}: LOCAL_RANK={local_rank}, but this process sees {count} "
                     f"device(s){f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}: start at most "
                     f"one rank per device on each host (deepspeed --num_gpus / torchrun --nproc-per-node at most the "
                     f"host's GPUs)")


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")  # what one process fills in for itself


def init_distributed() -> Dist:
    """Initialise torch.distributed through DeepSpeed and pick this rank's device.

    One process fills in what a launcher would set. Several ranks need the launcher's rendezvous: without
    ``MASTER_ADDR`` and ``MASTER_PORT`` each rank would pick its own and wait for the others until the
    process group's timeout, so that is refused at once (a ``ValueError`` naming the variables).
    """
    before = {"environ": {key: os.environ.get(key) for key in LAUNCHER_VARIABLES}, "excepthook": sys.excepthook}
    adopted = torch.distributed.is_initialized()
    try:
        return _init_distributed(before)
    except BaseException:  # what it filled in and made is undone: a notebook's next run starts afresh
        if not adopted and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            _forget_deepspeed_groups()
        _give_back(before["environ"])
        sys.excepthook = before["excepthook"]  # torch's group wraps it at every initialisation
        raise


def _give_back(environ: dict[str, str | None]) -> None:
    """The launcher variables as they were before :func:`init_distributed` filled them in."""
    for key, value in environ.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _init_distributed(before: dict) -> Dist:
    for key, value in (("WORLD_SIZE", launcher.world_size()), ("RANK", launcher.rank()),
                       ("LOCAL_RANK", launcher.local_rank())):  # one line naming a malformed one
        if os.environ.get(key, "").strip():
            os.environ[key] = str(value)  # as the code below and DeepSpeed compare it (" 2", "01")
        else:
            os.environ.pop(key, None)  # empty: as if unset
    bound = False  # the rank's place on its host came from srun or mpirun, which may bind one GPU to each rank
    if "LOCAL_RANK" not in os.environ and os.environ.get("WORLD_SIZE", "1") != "1":
        # srun and mpirun start each rank without LOCAL_RANK; 0 on every rank of a host would put them all on its
        # first GPU (NCCL refuses duplicate GPUs at the first collective)
        given = local_rank_of_launcher(os.environ)
        if given is not None:
            os.environ["LOCAL_RANK"], bound = given, True
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if os.environ["WORLD_SIZE"] != "1" and missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {' and '.join(missing)} not set: start several "
                         f"ranks with a launcher (deepspeed, torchrun, srun with both exported), which sets them")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    quiet_deepspeed()
    # lazy: importing DeepSpeed takes seconds; --help and --dry-run do not need it
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.constants import default_pg_timeout

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    accelerator = get_accelerator().device_name()
    local_rank = int(os.environ["LOCAL_RANK"])
    if accelerator == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # gloo allreduce, no op build
        backend, device = "gloo", torch.device("cpu")
        unseen = unseen_gpu()
        if unseen and os.environ["LOCAL_RANK"] == "0":  # once per host
            log.warning("%s", unseen)
    elif accelerator != "cuda":  # DeepSpeed's pick: Apple's MPS (before CUDA and the CPU), Intel's XPU, ...
        raise ValueError(f"DeepSpeed's accelerator here is {accelerator!r}, which this package does not train on (CUDA "
                         f"GPUs or the CPU; MPS has no float64, which a step's sums need): set DS_ACCELERATOR=cpu to "
                         f"train on the CPU")
    else:
        backend = "nccl"
        index = device_index(local_rank, get_accelerator().device_count(), bound)
        unsupported = unsupported_gpu(index)
        if unsupported:
            raise ValueError(f"rank {os.environ['RANK']}: {unsupported}")
        device = torch.device(accelerator, index)
        get_accelerator().set_device(index)
    owned = not torch.distributed.is_initialized()
    if owned:
        if os.environ["WORLD_SIZE"] == "1":
            # one process: the group's store lives in this process and no port is opened, also where a launcher
            # named one (`deepspeed --num_gpus 1` passes 29500 to every job: two on one machine would collide, and a
            # port picked free could be taken by another program before the store listened on it); DeepSpeed then
            # adopts the group
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                                                 timeout=default_pg_timeout)  # DeepSpeed's (DEEPSPEED_TIMEOUT)
        try:
            with _waiting_notice(default_pg_timeout.total_seconds()):
                deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=default_pg_timeout)
        except (torch.distributed.DistNetworkError, torch.distributed.DistStoreError) as err:
            raise RendezvousFailed(err) from None
        _world_clone(default_pg_timeout)
    return Dist(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                local_rank=local_rank, device=device, owned=owned, before=before)
