"""What every training entry point shares: common flags, the run directory, and readable failures.

What building a command's parser needs is imported here at the top and is light; what runs a command (the
training stack: torch, lhotse, timm) is imported by the function that needs it, when the command runs: every
command imports this module, and its ``--help`` answers without loading torch (tests/test_entry_points.py)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from common.config.recipe import RecipeError
from common.system import launcher
from common.system.atomic import remove_orphans
from common.system.disk import describe_os_error, human_size
from common.system.lock import LOCK_FILE, RunDirBusy, job_lock
from common.system.paths import LinkRefused, append_text, refuse_link
from common.system.prog import error_line, whole_number
from common.system.signals import StoppedBySignal, piped, stop_on_signals
from common.training.batch import launch_world_size

if TYPE_CHECKING:
    from common.training.run_recipe import RunRecipe

__all__ = ["add_run_arguments", "plan_status", "PLAN_NOT_READY", "world_size_of", "discard_previous", "check_run_dir",
           "resume_check", "UnusableRunDir", "Session", "training_session", "describe_os_error", "run_main"]

log = logging.getLogger(__name__)

# the run directory of the running command's training session (set by training_session, read by run_main)
_RUN_DIR: Path | None = None


# --stop-after-steps: 0 or a negative count would train nothing, or everything, without a word
_steps = whole_number(1, "of optimiser steps >= 1")
_ranks = whole_number(1, "of ranks >= 1")  # --world-size


def add_run_arguments(parser: argparse.ArgumentParser, default_run_dir: str, phase_length: str = "steps") -> None:
    """The training commands' shared options; ``default_run_dir``: what ``--run-dir`` defaults to, in words;
    ``phase_length``: what the command's phases count (``steps`` or ``epochs``, for the ``--set`` example)."""
    parser.add_argument("--run-dir", type=Path, default=None,
                        help=f"where checkpoints, logs, exports and the ledger go (default: {default_run_dir}); "
                             "running again on an existing run directory resumes it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a recipe field, e.g. --set optim.lr=5e-5 --set phases.0.{phase_length}="
                             f"{1000 if phase_length == 'steps' else 5} (repeatable)")
    parser.add_argument("--stop-after-steps", type=_steps, default=None, metavar="N",
                        help="checkpoint and exit after N optimiser steps in this invocation (run again to resume)")
    parser.add_argument("--restart", action="store_true",
                        help="start from step 0 although the run directory holds checkpoints; what the earlier "
                             "attempt left is moved into RUN/discarded-TIME/, nothing is deleted")
    parser.add_argument("--accept-changed-data", action="store_true",
                        help="resume although a training or validation manifest changed since the run started (the "
                             "saved data position then points at other clips; recorded in ledger.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe, print the phase plan with tokens and FLOPs, and exit: status 0 "
                             f"when a run would start, {PLAN_NOT_READY} when it would stop before any compute (files "
                             "it needs missing, a run directory it refuses; the plan lists them), 2 for bad input")
    parser.add_argument("--world-size", type=_ranks, default=None, metavar="N",
                        help="with --dry-run: plan the launch on N ranks (the per-rank batch and accumulation of the "
                             "recipe's global batch; default: the launcher's WORLD_SIZE, else 1)")
    parser.add_argument("--coarse", metavar="METHOD:C[:SHARE]", default=None,
                        help="derive the paper's coarse-to-fine schedule from this full-resolution recipe: SHARE of "
                             "its length at compression C, then full resolution (e.g. fshift:4, fshift:4,2 for "
                             "4->2->1, avgpool:2:0.3; SHARE by default: 1/8 then 5/8 full for step-based recipes, "
                             "the paper's SSAST schedule, and 0.25 (0.30 with several factors) of the epochs for "
                             "epoch-based ones); the recipe is recorded as the baseline (common/phases/coarse.py)")
    # the deepspeed launcher passes --local_rank=N before the script's own arguments
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


PLAN_NOT_READY = 3  # --dry-run's exit status when the plan is printed but a run would stop before any compute


def plan_status(refused: list[str], missing: list[str]) -> int:
    """``--dry-run``'s exit status: 0 when a run would start, :data:`PLAN_NOT_READY` when the plan lists what it
    would refuse in its run directory or files it would not find (a script can wait for data, or stop, on it)."""
    return PLAN_NOT_READY if refused or missing else 0


def world_size_of(args: argparse.Namespace) -> int:
    """The ranks this command runs (or, with ``--dry-run``, plans) on: ``--world-size``, else the launcher's
    ``WORLD_SIZE``, else 1 (``common.training.batch.launch_world_size``).

    Raises:
        RecipeError: ``--world-size`` without ``--dry-run`` (a run's ranks are the launcher's); a number below 1 is
            refused when the options are parsed.
    """
    if args.world_size is not None and not args.dry_run:
        raise RecipeError(f"--world-size {args.world_size}: plans a --dry-run; a run trains on the ranks its "
                          f"launcher starts (deepspeed --num_gpus N)")
    return launch_world_size(args.world_size)


def discard_previous(run_dir: Path) -> Path | None:
    """Move everything an earlier attempt left in ``run_dir`` (but its log and its lock) into
    ``run_dir/discarded-TIME``."""
    leftovers = [p for p in run_dir.iterdir()
                 if p.name not in ("train.log", LOCK_FILE) and not p.name.startswith("discarded-")] \
        if run_dir.is_dir() else []
    if not leftovers:
        return None
    stamp = time.strftime("discarded-%Y%m%d-%H%M%S")
    target, n = run_dir / stamp, 1
    while target.exists():  # two restarts in one second
        n += 1
        target = run_dir / f"{stamp}-{n}"
    target.mkdir()
    for path in leftovers:
        path.rename(target / path.name)
    kept = sorted(run_dir.glob("discarded-*"))  # nothing deletes them: a requeue loop that restarts fills the disk
    size = sum(f.stat().st_size for d in kept for f in d.rglob("*") if f.is_file() and not f.is_symlink())
    log.warning("--restart: moved the earlier attempt's %s into %s; %s holds %d discarded attempt(s), %s in all: "
                "delete those no longer needed", ", ".join(p.name for p in leftovers), target, run_dir, len(kept),
                human_size(size))
    return target


class UnusableRunDir(ValueError):
    """``--run-dir`` names something this process cannot write a run into."""


def run_dir_check(run_dir: Path) -> Callable[[], None]:
    """A check (for ``--dry-run``'s list of what a run would miss) of what :func:`check_run_dir` would refuse, with
    nothing created: ``--run-dir`` or a folder on its way that is a file, a first existing folder on its way
    that this process cannot write, or a file a run writes in place that is a symbolic link. Raises
    ``RecipeError`` naming the problem."""
    def check() -> None:
        path = Path(run_dir)
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            what = "is a file, not a directory" if existing == path else f"is not a directory ({existing} on its way " \
                                                                          f"is a file)"
            raise RecipeError(f"--run-dir {run_dir} {what}; name a new folder or an existing run directory")
        if not os.access(existing, os.W_OK):
            raise RecipeError(f"run directory {run_dir} cannot be written: {existing} is not writable")
        try:
            _refuse_links(path)
        except LinkRefused as err:
            raise RecipeError(str(err)) from None
    return check


def resume_check(run_dir: Path, recipe, restart: bool = False) -> tuple[list[str], list[str]]:
    """For ``--dry-run`` on a run directory that holds a run: ``(refused, notes)``, the command's refusal of that run
    in its own words (a different recipe: ``common.training.run_dir.prepare_run_dir``, which writes nothing; a run,
    or a fold of one, that trained and is unfinished but whose checkpoints are gone: ``run_state``), and the note of
    what the command does with the run: refuse it, resume it, or nothing left to train (nothing to check or say with
    ``--restart``, or without a run there). The refusal is found before the note is said: a finished run of another
    recipe is refused, as the command refuses it, not "nothing left to train". A finished run whose checkpoints were
    deleted is finished: the command trains nothing, as the run says."""
    # lazy: the run directory's checks import the training stack (a command's --help does not load torch)
    from common.training.run_dir import FINISHED, LOST, has_trained, lost_run_message, prepare_run_dir, run_state

    run_dir = Path(run_dir)
    if restart or not run_dir.is_dir() or not has_trained(run_dir):
        return [], []
    folds = len(getattr(getattr(recipe, "task", None), "folds", None) or [])  # a cross-validation run's
    runs = [run_dir / f"fold{k + 1}" for k in range(folds)] if folds else [run_dir]
    held = {path: run_state(path, len(recipe.phases)) for path in runs}
    lost = [path for path, state in held.items() if state == LOST]
    latest = run_dir / "checkpoints" / "LATEST"
    refused = [lost_run_message(lost[0])] if lost else []
    if not refused:
        try:
            prepare_run_dir(run_dir, recipe, is_main=False)
        except RecipeError as err:
            refused = [str(err)]
    if lost:
        does = "holds a run whose checkpoints are gone; this command refuses it"
    elif refused:
        does = "holds a run that this command refuses (why: below)"
    elif all(state == FINISHED for state in held.values()):
        does = "holds a finished run; this command has nothing left to train"
    elif folds:
        does = "holds a run; this command resumes it from its folds' checkpoints"
    else:
        does = (f"holds a run; this command resumes it from checkpoint {latest.read_text().strip()}"
                if latest.is_file() else "holds a run; this command resumes it from its newest intact checkpoint")
    return refused, [f"run directory: {run_dir} {does} (--restart starts over)"]


def _refuse_links(run_dir: Path) -> None:
    """Raise ``LinkRefused`` when a file a run writes in place in ``run_dir`` (or in a fold of it) is a symbolic
    link: the lock, ``train.log``, ``bad_audio.tsv``, ``logs/rank*.err``."""
    for folder in (run_dir, *sorted(run_dir.glob("fold*"))):
        for name in (LOCK_FILE, "train.log", "bad_audio.tsv"):
            refuse_link(folder / name, f"a run's {name}")
    for path in sorted(run_dir.glob("logs/rank*.err")):
        refuse_link(path, "a rank's error log")


def check_run_dir(run_dir: Path) -> None:
    """Make sure ``run_dir`` is a folder this process can write (it is created if missing), before any compute.

    Its files that a run writes in place (the lock, ``train.log``, ``bad_audio.tsv``, ``logs/rank*.err``) must not
    be symbolic links: they are opened without following one anyway (``common.system.paths``), and refused here,
    on every rank at once, before the job starts.

    Raises:
        UnusableRunDir: it is a file, cannot be created, or it (or a folder in it) is not writable; the
            message names the folder and the cause.
        common.system.paths.LinkRefused: one of those files is a symbolic link (named).
    """
    run_dir = Path(run_dir)
    _refuse_links(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UnusableRunDir(f"--run-dir {run_dir} is a file, not a directory; name a new folder or an existing run "
                             f"directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-check.")  # what access() cannot tell (ACLs, ...)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        cause = (err.strerror or str(err)).lower()
        named = err.filename is None or run_dir in (Path(err.filename), Path(err.filename).parent)  # it or the probe
        raise UnusableRunDir(f"run directory {run_dir} cannot be written: {cause}"
                             + ("" if named else f" ({err.filename})")) from err
    for root, dirs, _ in os.walk(run_dir):
        dirs[:] = [d for d in dirs if not d.startswith("discarded-")]
        for name in dirs:
            if not os.access(os.path.join(root, name), os.W_OK):
                raise UnusableRunDir(f"run directory {run_dir} cannot be written: {os.path.join(root, name)} is not "
                                     f"writable")


# the folders of a run directory that a run writes files into atomically (a cross-validation run's folds alike):
# where a killed write's temporary file is looked for (not the whole tree: --run-dir may name any folder)
RUN_FOLDERS = tuple(f"{fold}{sub}" for fold in ("", "fold*/") for sub in ("checkpoints", "checkpoints/*", "export",
                                                                         "average")) + ("fold*",)


@dataclass
class Session:
    """A training process's session: its place in the job and its run directory's recipe."""
    dist: object  # common.system.distributed.Dist
    run_recipe: RunRecipe


@contextmanager
def training_session(run_dir: Path, recipe, restart: bool = False,
                     accept_changed_data: bool = False) -> Iterator[Session]:
    """Join the process group, lock ``run_dir`` (``common.system.lock``: a second run on it stops at once), check
    that every rank resolved the same recipe and manifests (``common.training.same_inputs``), log into it, check its
    recipe (``common.training.run_dir``); tear down, and give the process's CPU threads and torch's random state back
    as they were.

    Args:
        run_dir: the run directory (resumed when it holds a run of the same recipe).
        recipe: the resolved recipe.
        restart: start over: the earlier attempt's files are moved aside first (:func:`discard_previous`).
        accept_changed_data: resume although the manifests changed (``--accept-changed-data``).
    """
    import torch  # lazy: a command's --help does not load torch

    # lazy: a run's set-up imports the training stack (torch, lhotse, timm)
    from common.system.cpu import keep_freed_memory, loader_workers, set_cpu_threads
    from common.system.distributed import init_distributed
    from common.system.logger import detach_run_logs, setup_logging
    from common.training.run_dir import prepare_run_dir
    from common.training.same_inputs import check_same_inputs, check_same_run_dir

    global _RUN_DIR
    detach_run_logs()  # an earlier run of this process (the demo, a notebook) keeps its train.log to itself
    check_run_dir(run_dir)
    dist = init_distributed()
    threads = torch.get_num_threads()  # given back at the end (a notebook, the demo, the tests run on)
    # and the caller's random state: a run seeds the global generators (its initialisation), after which a seed sweep
    # in a notebook would draw the same numbers after every run whatever its own seed
    rng = torch.get_rng_state()
    device_rng = torch.cuda.get_rng_state(dist.device) if dist.device.type == "cuda" else None
    finished = False
    try:
        with job_lock(run_dir, dist), stop_on_signals():  # SIGTERM / SIGUSR1: checkpoint, then stop
            # this job's from here on (a second launch on a busy directory writes nothing into the running one's):
            _RUN_DIR = Path(run_dir)  # a failure is kept in RUN/logs/rankR.err on a rank of several
            check_same_run_dir(dist, run_dir)  # one folder: rank 0 measures what the others write into it
            check_same_inputs(dist, recipe)  # before data is read or a model built: one rank's stale copy stops all
            setup_logging(run_dir, dist.rank)
            set_cpu_threads(loader_workers(recipe.data.num_workers), recipe.train.cpu_threads)
            if dist.device.type == "cpu":
                keep_freed_memory()  # a step reuses the last step's memory, not fresh pages (common.system.cpu)
            if restart and dist.is_main:
                discard_previous(run_dir)
            if dist.is_main:
                orphans = remove_orphans(run_dir, RUN_FOLDERS)
                if orphans:
                    log.warning("removed %d temporary file(s) that an interrupted write left: %s", len(orphans),
                                ", ".join(str(p) for p in orphans[:5]) + (" ..." if len(orphans) > 5 else ""))
            dist.barrier()
            yield Session(dist, prepare_run_dir(run_dir, recipe, dist.is_main, accept_changed_data,
                                                dist.world_size))
        finished = True
    finally:
        dist.teardown(synchronise=finished)  # a rank leaving on an error does not wait for the others
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        if device_rng is not None:
            torch.cuda.set_rng_state(device_rng, dist.device)


# what a collective raises on the ranks left when another rank of the job exits (gloo, NCCL)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "remote process exited or there was a network error")
# what a collective raises when the other ranks did not come within the process group's timeout (gloo, NCCL)
_TIMED_OUT = ("Timed out waiting", "Watchdog caught collective operation timeout", "collective operation timeout")


def _stopped_by(err: BaseException, resumable: bool) -> str | None:
    """The line for a failure that stopped a command although its input was good: a loader worker's, the memory's
    (a command that does not train: a run raises :class:`OutOfDeviceMemory`), another rank's, a collective that
    waited in vain for the others (the process group's timeout); None otherwise."""
    # lazy: both import torch (a command's --help does not load torch)
    from common.data.workers import describe_worker_failure
    from common.training.out_of_memory import describe_out_of_memory

    worker = describe_worker_failure(err)
    if worker is not None:
        return worker + ("; then run the same command again to resume from the last checkpoint" if resumable else "")
    memory = describe_out_of_memory(err)
    if memory is not None:
        return memory
    first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    if _timed_out(err):
        return (f"rank {launcher.rank_name()}: no word from the other ranks for {_waited(err):.0f} s "
                f"({first[:200]}): a rank is stuck (a read that never returns, a stale network file system, a "
                f"deadlock) or gone; its error, if it has one, says why{_failures_where()}. The wait is "
                f"DEEPSPEED_TIMEOUT minutes (default 10)"
                + ("; run the same command again to resume from the last checkpoint" if resumable else ""))
    if not _lost_peer(err):
        return None
    return (f"rank {launcher.rank_name()}: another rank of the job stopped ({first[:200]}); its error says why"
            f"{_failures_where()}")


def _timed_out(err: BaseException) -> bool:
    """A collective gave up waiting for the other ranks (the process group's timeout)."""
    return launcher.several() and any(word in str(err) for word in _TIMED_OUT)


def _waited(err: BaseException) -> float:
    """The seconds a timed-out collective waited: what its text says (gloo: ``waiting 60000ms``, NCCL: ``ran for
    600000 milliseconds``), else the process group's timeout."""
    found = re.search(r"(?:waiting|ran for) (\d+) ?(?:ms|milliseconds)", str(err))
    if found:
        return int(found.group(1)) / 1000
    # lazy: the training stack's; a command that times out in a collective has loaded it
    from common.system.distributed import collective_timeout

    return collective_timeout()


def _lost_peer(err: BaseException) -> bool:
    """A collective failed because another rank of the job stopped (that rank says why)."""
    return launcher.several() and any(word in str(err) for word in _PEER_GONE)


def command_device(given: str | None) -> str:
    """A command's ``--device``: the one given (a CUDA device on a machine without one, or beyond its devices, is
    refused), else CUDA where there is one, else the CPU.

    Raises:
        ValueError: ``given`` is no device's name, names a CUDA device and this machine has none, or a CUDA index
            this machine (its ``CUDA_VISIBLE_DEVICES``) does not have.
    """
    import torch  # lazy: a command's --help does not load torch

    from common.system.gpu import unseen_gpu, unsupported_gpu  # lazy: it imports torch

    device = given or ("cuda" if torch.cuda.is_available() else "cpu")
    unseen = unseen_gpu() if given is None else None
    if unseen:
        log.warning("%s", unseen)
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: not a device this package runs on; give cpu, cuda or cuda:N")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    count = torch.cuda.device_count() if parsed.type == "cuda" else 0
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1}"
                         + (f"; CUDA_VISIBLE_DEVICES={visible} numbers them from 0)" if visible else ")"))
    unsupported = unsupported_gpu(parsed.index or 0) if parsed.type == "cuda" else None
    if unsupported:
        raise ValueError(f"--device {device}: {unsupported}")
    return device


def run_main(body: Callable[[], int], resumable: bool = False) -> int:
    """Run an entry point; known failures end with one readable line (the traceback goes to the log).

    Exit status: 2 for bad input (a recipe or a flag, a file or a model that is missing or not what the command
    needs, changed data, an unusable run directory: every ``ValueError``), 1 for a run that stopped (non-finite
    loss, bad audio, no usable checkpoint, a run directory in use, a full disk or another failing file, another
    rank that stopped, the device out of memory), 130 when interrupted, 128 + the signal's number when SIGTERM or
    SIGUSR1 stopped it (checkpointed: ``common.system.signals``); a ``--dry-run`` body returns 3
    (:data:`PLAN_NOT_READY`, :func:`plan_status`) when its plan lists what would stop a run. ``resumable``: a
    training command (an interruption says that the same command resumes from the last checkpoint). On a rank of
    several, every ``error:`` line names the rank and its host, and the line (the traceback of an unexpected error)
    is also kept in the run directory, ``RUN/logs/rankR.err`` (:func:`_keep_failure`). The process's logging is
    given back as it was (``common.system.logger.process_logging``: a command called from Python, a notebook's or a
    sweep's, left its handlers, its level and its open ``train.log`` behind).
    """
    from common.system.logger import process_logging  # lazy: the logger imports tqdm, which a --help does without

    with process_logging():
        return _run_main(body, resumable)


def _run_main(body: Callable[[], int], resumable: bool) -> int:
    """:func:`run_main` within the caller's logging."""
    # lazy: the failures' modules import torch; a command parses its options (--help) before it runs here
    from common.data.bad_audio import TooMuchBadAudio
    from common.system.logger import log_traceback
    from common.training.checkpoint_files import NoUsableCheckpoint
    from common.training.nonfinite import NonFiniteLoss
    from common.training.out_of_memory import OutOfDeviceMemory

    # what ends a run that started with good input (exit status 1); every other known failure is bad input (2)
    stopped = (NonFiniteLoss, TooMuchBadAudio, NoUsableCheckpoint, RunDirBusy, OutOfDeviceMemory)
    global _RUN_DIR
    _RUN_DIR = None  # the run directory of this command's training session, once it has one
    try:
        return piped(body)  # `... | head`: the output is no longer read; status 141, nothing said
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint" if resumable else
              "interrupted", file=sys.stderr)
        return 130
    except StoppedBySignal as stop:
        log_traceback(str(stop))  # train.log keeps it; the console gets it once, below
        if os.environ.get("RANK", "0") == "0":  # every rank stops at the same step: rank 0 says it for all
            print(f"{stop}", file=sys.stderr)
        return 128 + stop.signum
    except (RecipeError, FileNotFoundError, NonFiniteLoss, TooMuchBadAudio, NoUsableCheckpoint, RunDirBusy,
            OutOfDeviceMemory, ValueError) as err:
        log_traceback(traceback.format_exc())
        _error(str(err))
        return 1 if isinstance(err, stopped) else 2
    except OSError as err:
        message = describe_os_error(err)
        if message is None:
            _keep_failure(traceback.format_exc())
            raise
        log_traceback(traceback.format_exc())
        _error(message)
        return 1
    except Exception as err:  # noqa: BLE001 - re-raised unless known: a loader worker, memory, another rank
        message = _stopped_by(err, resumable)
        if message is None:
            _keep_failure(traceback.format_exc())
            raise
        log_traceback(traceback.format_exc())
        _error(message)
        return 1


def _rank_words() -> str | None:
    """``rank R (host H)`` on a rank of several (None for one process): what an ``error:`` line starts with, so that
    the lines of a job's ranks, interleaved by a launcher or gathered from several nodes, say where each comes from."""
    if not launcher.several():
        return None
    return f"rank {launcher.rank_name()} (host {socket.gethostname()})"


def _error(message: str) -> None:
    """Print a failure's ``error:`` line, on a rank of several with its rank and host (a message that starts by
    naming this rank gets the host there, one naming its rank and host is left as it is), and keep it in the run
    directory (:func:`_keep_failure`)."""
    words = _rank_words()
    if words is not None:
        own = f"rank {launcher.rank_name()}"
        if not message.startswith(words):
            message = (words + message[len(own):] if re.match(rf"{re.escape(own)}\b", message)
                       else f"{words}: {message}")
    message = error_line(message)
    print(f"error: {message}", file=sys.stderr)
    _keep_failure(f"error: {message}\n")


def _keep_failure(text: str) -> None:
    """On a rank of several: append ``text`` (a failure's line, or the traceback of an unexpected error) to the
    rank's own ``RUN/logs/rankR.err``, so that the cause of a job's failure is found in its run directory (the
    console of a rank on another node may be anywhere; ``train.log`` is rank 0's). One write per failure; a failure
    to write it is not another error. The file is appended to without following a symbolic link
    (``common.system.paths.append_text``): one planted there is refused, so the line stays on the console only
    (refused rather than replaced: this is the failure path, which deletes nothing)."""
    if _rank_words() is None or _RUN_DIR is None:
        return
    try:
        folder = Path(_RUN_DIR) / "logs"
        folder.mkdir(exist_ok=True)
        append_text(folder / f"rank{os.environ.get('RANK', '0')}.err", f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}",
                    "a rank's error log")
    except OSError:  # LinkRefused too
        pass


def _failures_where() -> str:
    """Where the other ranks' failures are kept, for the line of a rank that lost them (empty: not known yet)."""
    return "" if _RUN_DIR is None else f" ({Path(_RUN_DIR) / 'logs'}/rank*.err)"
