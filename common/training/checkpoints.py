"""Training checkpoints of a run: DeepSpeed's checkpoint plus the trainer's own state, written atomically.

Layout under ``RUN/checkpoints``::

    LATEST                        the tag of the newest complete checkpoint (replaced atomically)
    phase01-step000004000/        DeepSpeed files (module, optimizer, LR schedule) + (phase01-epoch0003/ in an
                                  epoch-based phase: 3 epochs done)
        trainer_state.json        phase, step, data position, ledger, ... and the size and SHA-256 of every
                                  file (rank 0)
        rng_rank{r}.pt            every rank's random-number generator states

A checkpoint is written into ``.tmp-TAG`` and renamed into place only when every rank has finished and its
files are on disk (``fsync``), then ``LATEST`` moves to it: a run killed while saving, or a host that crashed
after, resumes from the previous checkpoint or this whole one. A tag saved
again (a phase's end after its validation's save, an epoch-based run stopped within an epoch) replaces the
folder only after moving the old one aside (``.old-TAG``, put back at the next start if the new one never
took its place). The run directory must be on a file system all ranks share.

Tags are ordered as a run saves them (phase, then step or epoch: :func:`tag_order`), and only the newest ``keep``
are kept. Runs of earlier versions named epoch-based checkpoints ``phaseNN-stepNNNNNNNNN`` too (the number
counting epochs): such a run resumed goes on with epoch tags, ordered with its old ones by their numbers.
A resume from an older checkpoint than the newest on disk (the newer ones damaged, or ``LATEST`` behind)
moves the newer folders aside (``.aside-TAG``, for inspection until the run saves that tag again or prunes past
its place, which removes it), so that pruning never takes the checkpoints the resumed run writes.

Resuming verifies the checkpoint it picks (``common.training.checkpoint_files``: sizes, SHA-256 digests, every
``.pt`` file unpickled with ``weights_only=True``) and falls back to the newest intact one, with a warning naming
what was skipped and why; without ``LATEST`` it looks for the newest intact checkpoint on disk. When checkpoints
exist but none is usable, it refuses to start from scratch (:class:`NoUsableCheckpoint`). Loading into an engine
runs DeepSpeed's loaders under :func:`common.training.checkpoint_files.weights_only_loads`: nothing a resume loads
can run code.

Another number of ranks: DeepSpeed cannot load ZeRO-partitioned optimizer state (stage >= 1) into another
number of ranks; such a checkpoint is converted once into DeepSpeed's universal format
(``deepspeed.checkpoint.ds_to_universal``, into ``.universal-TAG``, removed once loaded) and loaded from
there (:meth:`RunCheckpoints.resharded`). Stage 0 checkpoints hold the whole optimizer state and load as
they are.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from argparse import Namespace
from pathlib import Path

import torch

from common.system.atomic import atomic_write_text
from common.system.disk import NoSpace, free_bytes, out_of_space, tree_size
from common.training.checkpoint_files import (
    DIGESTS,
    MODEL_FILE,
    STATE_FILE,
    NoUsableCheckpoint,
    damage,
    measure,
    safe_load,
    weights_only_loads,
)

__all__ = ["RunCheckpoints", "CheckpointNotWritten", "expected_size",
           "make_tag", "tag_order", "tag_place", "capture_rng", "restore_rng"]

log = logging.getLogger(__name__)

LATEST = "LATEST"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"  # a published checkpoint while a new one of its tag replaces it
ASIDE_PREFIX = ".aside-"  # a checkpoint newer than the one a run resumed from
UNIVERSAL_PREFIX = ".universal-"
UNIVERSAL_LATEST = "latest_universal"  # DeepSpeed's conversion names its output there (a tag is always passed here)


_TAG = re.compile(r"phase(\d+)-(step|epoch)(\d+)")


class CheckpointNotWritten(OSError):
    """A rank could not write its share of a checkpoint into a folder it cannot write (a read-only mount, lost
    permissions); the message names the folder and the cause (``common.cli.run_main`` prints it as it is)."""


def _unwritable(tmp: Path) -> str | None:
    """Why checkpoint folder ``tmp`` (made on the way if missing) cannot be written, as ``FOLDER: cause`` (``RUN/
    checkpoints: read-only file system``); None where it can (the failure was something else). DeepSpeed logs and
    swallows the failure to make the folder, and its writes then fail with "Parent directory ... does not exist":
    the folder is tried here."""
    try:
        tmp.mkdir(exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=tmp, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        folder = tmp if tmp.is_dir() else tmp.parent
        return f"{folder}: {(err.strerror or type(err).__name__).lower()}"
    return None


def make_tag(phase: int, progress: int, epochs: bool = False) -> str:
    """The checkpoint name of 0-based ``phase`` after ``progress`` optimiser steps, or ``progress`` epochs where
    ``epochs`` (an epoch-based phase)."""
    return f"phase{phase + 1:02d}-epoch{progress:04d}" if epochs else f"phase{phase + 1:02d}-step{progress:09d}"


def tag_order(tag: str) -> tuple[int, int, int] | None:
    """Where checkpoint ``tag`` comes in its run: (phase, steps or epochs, 1 for an epoch tag: after an earlier
    version's step tag that counted the same epochs); None for a name that is not a tag."""
    match = _TAG.fullmatch(tag)
    return (int(match[1]), int(match[3]), int(match[2] == "epoch")) if match else None


def tag_place(tag: str) -> tuple[int, int]:
    """Where in its run checkpoint ``tag`` was taken, whatever version named it: (phase, steps or epochs)."""
    return tag_order(tag)[:2]


def capture_rng(generator: torch.Generator, device: torch.device) -> dict:
    """This process's random states: torch's global one, the trainer's generator, CUDA's."""
    rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict, generator: torch.Generator, device: torch.device) -> None:
    """Undo :func:`capture_rng`."""
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def expected_size(engine, world_size: int = 1) -> int:
    """At least how many bytes a checkpoint of ``engine`` holds, every rank's files together: the module's weights
    and the optimiser's state (its tensors once it has them, every rank's partition under ZeRO; before its first
    step, two moments per trained weight, as Adam keeps)."""
    module = getattr(engine, "module", None)
    if module is None:  # not a DeepSpeed engine: nothing to estimate from
        return 0
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values() if torch.is_tensor(t))
    inner = getattr(engine, "optimizer", None)
    while inner is not None and not isinstance(inner, torch.optim.Optimizer):  # DeepSpeed's wrappers hold it
        inner = getattr(inner, "optimizer", None)
    state = 0 if inner is None else sum(v.numel() * v.element_size() for s in inner.state.values()
                                        for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    sharded = getattr(engine, "zero_optimization_stage", lambda: 0)() > 0
    if state:
        return weights + state * (world_size if sharded else 1)
    return weights + 2 * sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)


class RunCheckpoints:
    """The training checkpoints of one run directory.

    Args:
        ckdir: the checkpoint folder (``RUN/checkpoints``).
        dist: this process's :class:`common.system.distributed.Dist` (saving and resuming are collective).
        keep: how many of the newest checkpoints to keep.
    """
    def __init__(self, ckdir: Path, dist, keep: int) -> None:
        self.ckdir = Path(ckdir)
        self.dist = dist
        self.keep = keep

    def _complete(self) -> list[Path]:
        """Published checkpoint folders, oldest first (folders whose names are not tags are left alone)."""
        if not self.ckdir.is_dir():
            return []
        return sorted((p for p in self.ckdir.iterdir() if p.is_dir() and tag_order(p.name) is not None),
                      key=lambda p: tag_order(p.name))

    def latest_tag(self) -> str | None:
        """The tag ``LATEST`` names (None: no checkpoint published yet)."""
        pointer = self.ckdir / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def _ensure_space(self, tag: str | None, engine) -> int | None:
        """Refuse to start checkpoint ``tag`` where the newest one would not fit, or the first where what it will
        hold (:func:`expected_size`) does not (collective; rank 0 measures). Returns the bytes free before the
        save (None: unknown)."""
        free, problem = free_bytes(self.ckdir), None
        done = self._complete() if self.dist.is_main else []
        if self.dist.is_main and free is not None:
            needed = tree_size(done[-1]) if done else expected_size(engine, self.dist.world_size)
            if done and free < needed:
                which = f"checkpoint {tag}" if tag else "the next checkpoint"
                problem = (needed, free, f"{which} needs about as much as {done[-1].name}; nothing of it was written "
                           f"and {done[-1].name} is intact: free some space and run the same command to resume")
            elif not done and free < needed:
                problem = (needed, free, f"the run's first checkpoint{f' ({tag})' if tag else ''} needs at least its "
                           f"weights and optimiser state: free some space (or name another --run-dir)")
        problem = self.dist.broadcast_object(problem)
        if problem is not None:
            raise NoSpace(self.ckdir, *problem)
        return free

    def ensure_room(self, engine) -> None:
        """Before a run trains: refuse where no checkpoint is published yet and the first would not fit (steps
        trained up to a save that fails would be lost). Collective."""
        if self.dist.broadcast_object(self.latest_tag() if self.dist.is_main else None) is None:
            self._ensure_space(None, engine)

    def save(self, engine, tag: str, trainer_state: dict, rng_state: dict) -> None:
        """Save on every rank (collective); rank 0 publishes it and prunes to the newest ``keep``.

        Raises:
            NoSpace: the checkpoint does not fit (refused before writing when the newest checkpoint is larger
                than the free space); the checkpoints published before are intact. A rank whose share did not fit
                removes only its own files: the other ranks may still be writing theirs into the folder, which the
                next start removes.
            CheckpointNotWritten: the checkpoint folder cannot be written (read-only, no permission); named.
        """
        tmp = self.ckdir / f"{TMP_PREFIX}{tag}"
        free = self._ensure_space(tag, engine)
        try:
            engine.save_checkpoint(str(self.ckdir), tag=tmp.name, client_state={}, save_latest=False)
            torch.save(rng_state, tmp / f"rng_rank{self.dist.rank}.pt")
        except (OSError, RuntimeError) as err:
            if isinstance(err, NoSpace):
                raise
            intact = self._what_stays()
            if out_of_space(err, self.ckdir):
                written = tree_size(tmp)
                raise NoSpace(tmp, written, free, f"{intact}; {self._drop_share(tmp)}", at_least=True) from err
            unwritable = _unwritable(tmp)
            if unwritable is None:
                raise
            raise CheckpointNotWritten(f"{unwritable}: checkpoint {tag} could not be written there; {intact} (make "
                                       f"the folder writable and run the same command to resume)") from err
        self.dist.barrier()
        # The files are the union of what every rank sees (on a shared file system one host's listing of another's
        # new files may lag; each rank sees its own), and every rank measures and hashes its share of them from the
        # open file (a cached stat of a file another host wrote may give an old size), after forcing it to disk: the
        # checkpoint is published (renamed, LATEST) only once its data would survive a host crash (on NFS a writer's
        # close already sent it to the server).
        seen = sorted(p.name for p in tmp.iterdir() if p.is_file())
        names = sorted(set().union(*self.dist.gather_objects(seen)))
        share = {name: measure(tmp / name, flush=True) for name in names[self.dist.rank::self.dist.world_size]}
        measured = {name: value for part in self.dist.gather_objects(share) for name, value in part.items()}
        if self.dist.is_main:
            files = {name: measured[name][0] for name in names}
            digests = {name: measured[name][1] for name in names}
            try:
                atomic_write_text(tmp / STATE_FILE, json.dumps({**trainer_state, "files": files, DIGESTS: digests}))
            except OSError as err:  # every rank has written its share: nothing writes into tmp any more
                if not out_of_space(err, self.ckdir):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                raise NoSpace(tmp / STATE_FILE, None, free_bytes(self.ckdir),
                              f"{self._what_stays()}; the partial checkpoint was removed") from err
            final, previous = self.ckdir / tag, self.ckdir / f"{OLD_PREFIX}{tag}"
            if final.exists():  # the same tag again: the old one stays whole until the new one is in place
                shutil.rmtree(previous, ignore_errors=True)
                final.rename(previous)
            tmp.rename(final)
            atomic_write_text(self.ckdir / LATEST, tag)
            shutil.rmtree(previous, ignore_errors=True)
            aside = self.ckdir / f"{ASIDE_PREFIX}{tag}"
            if aside.exists():  # the tag a resume set aside is saved again: the new one replaces it
                shutil.rmtree(aside, ignore_errors=True)
                log.info("removed %s: the run saved %s again", aside, tag)
            done = [p for p in self._complete() if p.name != tag]
            superseded = [p for p in done if tag_place(p.name) == tag_place(tag)]  # an old name, same place
            done = [p for p in done if p not in superseded]
            for old in superseded + done[: max(0, len(done) - (self.keep - 1))]:
                shutil.rmtree(old, ignore_errors=True)
            self._drop_passed_asides()
            log.info("saved checkpoint %s", final)
        self.dist.barrier()

    def _what_stays(self) -> str:
        """After a checkpoint failed to write: what a resume has, in words."""
        latest = self.latest_tag()
        return f"the last checkpoint {latest} is intact" if latest else "no checkpoint was published yet"

    def _drop_share(self, tmp: Path) -> str:
        """After this rank's share of a checkpoint failed: remove the files this rank wrote into ``tmp`` (the other
        ranks may still be writing theirs there: the folder is not removed under them) and say what is left."""
        if self.dist.world_size == 1:
            shutil.rmtree(tmp, ignore_errors=True)
            return "the partial checkpoint was removed"
        rank = self.dist.rank
        own = [f"rng_rank{rank}.pt", f"*zero_pp_rank_{rank}_mp_rank_*"] + (["mp_rank_*_model_states.pt"]
                                                                             if rank == 0 else [])
        for pattern in own:
            for path in tmp.glob(pattern):
                path.unlink(missing_ok=True)
        return (f"this rank's part of {tmp.name} was removed; what the other ranks wrote there stays until the next "
                f"start of the run removes it")

    def _drop_passed_asides(self) -> None:
        """Rank 0, after pruning: remove the set-aside checkpoints (:meth:`_set_aside_after`) that come before every
        checkpoint kept: the run has saved past their place, and no resume would go back there."""
        kept = self._complete()
        if not kept:
            return
        for aside in self.ckdir.glob(f"{ASIDE_PREFIX}*"):
            place = tag_order(aside.name[len(ASIDE_PREFIX):])
            if place is not None and place < tag_order(kept[0].name):
                shutil.rmtree(aside, ignore_errors=True)
                log.info("removed %s: the run has saved past it (the oldest checkpoint kept is %s)", aside,
                         kept[0].name)

    def _pick(self) -> tuple[str | None, list[str]]:
        """Rank 0: the newest intact checkpoint's tag, and what was skipped on the way (and why)."""
        for tmp in self.ckdir.glob(f"{TMP_PREFIX}*"):
            log.warning("removing interrupted checkpoint %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        # a conversion for another number of ranks whose load never finished (killed): never reused (its files are
        # not covered by the digests), converted afresh if needed; DeepSpeed's pointer to its temporary name
        for universal in self.ckdir.glob(f"{UNIVERSAL_PREFIX}*"):
            log.info("removing %s, left by a resume on another number of ranks that stopped while loading it",
                     universal)
            shutil.rmtree(universal, ignore_errors=True)
        (self.ckdir / UNIVERSAL_LATEST).unlink(missing_ok=True)
        for previous in self.ckdir.glob(f"{OLD_PREFIX}*"):  # a save of the same tag was interrupted
            final = self.ckdir / previous.name[len(OLD_PREFIX):]
            if final.exists():
                shutil.rmtree(previous, ignore_errors=True)
            else:
                log.warning("checkpoint %s was being replaced when the run stopped: the previous one is back",
                            final.name)
                previous.rename(final)
        latest = self.latest_tag()
        candidates = [p.name for p in reversed(self._complete())]
        if latest is None and candidates:
            log.warning("%s is missing; looking for the newest intact checkpoint in %s", self.ckdir / LATEST,
                        self.ckdir)
        elif latest is not None and latest not in candidates:
            log.warning("%s names checkpoint %s, which does not exist", self.ckdir / LATEST, latest)
        elif latest is not None:
            candidates.remove(latest)
            candidates.insert(0, latest)
        skipped = []
        for tag in candidates:
            reason = damage(self.ckdir / tag)
            if reason is None:
                self._set_aside_after(tag)
                return tag, skipped
            skipped.append(f"{tag}: {reason}")
            log.warning("cannot resume from checkpoint %s: %s; trying an older one", tag, reason)
        return None, skipped

    def _set_aside_after(self, tag: str) -> None:
        """Move the checkpoints that sort after ``tag``, the one a run resumes from, to ``.aside-TAG``: the run
        saves those tags again, and pruning (by tag order) must not take its new checkpoints for older."""
        for folder in self._complete():
            if tag_order(folder.name) > tag_order(tag):
                aside = self.ckdir / f"{ASIDE_PREFIX}{folder.name}"
                shutil.rmtree(aside, ignore_errors=True)
                folder.rename(aside)
                log.warning("checkpoint %s is newer than %s, which the run resumes from: moved to %s", folder.name,
                            tag, aside)

    def find_resume(self) -> str | None:
        """The tag to resume from, the same on every rank (collective); None when there is no checkpoint.

        Raises:
            NoUsableCheckpoint: checkpoints exist but none is intact.
        """
        tag, skipped = (self._pick() if self.dist.is_main and self.ckdir.is_dir() else (None, []))
        tag, skipped = self.dist.broadcast_object((tag, skipped))
        if tag is None and skipped:
            raise NoUsableCheckpoint(
                f"no checkpoint in {self.ckdir} can be resumed from ({'; '.join(skipped)}); run with --restart to "
                f"start from step 0 (the damaged checkpoints are kept aside)")
        return tag

    def _published(self, tag: str) -> Path:
        """The folder of checkpoint ``tag``: an earlier version's name for the same place if that is what is on disk
        (an epoch-based run resumed from its step tag, whose end of phase is recorded into it)."""
        folder = self.ckdir / tag
        if not folder.is_dir():
            folder = next((p for p in self._complete() if tag_place(p.name) == tag_place(tag)), folder)
        return folder

    def trainer_state(self, tag: str) -> dict:
        return json.loads((self.ckdir / tag / STATE_FILE).read_text())

    def restate(self, tag: str, **changes) -> None:
        """Rank 0: replace keys of published checkpoint ``tag``'s trainer state (atomically; its files and their
        digests stay as saved). Where a checkpoint was taken before work whose outcome a resume need not redo."""
        if self.dist.is_main:
            path = self._published(tag) / STATE_FILE
            atomic_write_text(path, json.dumps({**json.loads(path.read_text()), **changes}))

    def rng_state(self, tag: str) -> dict | None:
        path = self.ckdir / tag / f"rng_rank{self.dist.rank}.pt"
        if not path.is_file():
            log.warning("%s missing (resuming with another number of ranks?): random state not restored", path)
            return None
        return safe_load(path)

    def module_state(self, tag: str) -> dict[str, torch.Tensor]:
        """The model weights of a checkpoint."""
        return safe_load(self.ckdir / tag / MODEL_FILE, map_location="cpu")["module"]

    def saved_world_size(self, tag: str, state: dict | None = None) -> int:
        """The number of ranks that wrote checkpoint ``tag`` (``state``: its trainer state, if read already)."""
        state = self.trainer_state(tag) if state is None else state
        if "world_size" in state:
            return int(state["world_size"])
        return len(list((self.ckdir / tag).glob("rng_rank*.pt"))) or 1  # written before the field existed

    def resharded(self, tag: str) -> bool:
        """Whether checkpoint ``tag`` holds ZeRO-partitioned optimizer state of another number of ranks than
        this run's (then the engine must be built to load DeepSpeed's universal format)."""
        return (self.saved_world_size(tag) != self.dist.world_size
                and any((self.ckdir / tag).glob("zero_pp_rank_*_optim_states.pt")))

    def _universal(self, tag: str) -> Path:
        """Checkpoint ``tag`` in DeepSpeed's universal format (rank 0 converts; collective)."""
        out = self.ckdir / f"{UNIVERSAL_PREFIX}{tag}"
        failure = None
        if self.dist.is_main:  # always afresh: a copy left by an earlier attempt is not covered by the digests
            # lazy: importing DeepSpeed takes seconds; --help and --dry-run do not need it
            from deepspeed.checkpoint.ds_to_universal import main as to_universal

            tmp = self.ckdir / f"{TMP_PREFIX}universal-{tag}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            log.info("converting checkpoint %s (%d ranks) to DeepSpeed's universal format for %d rank(s)", tag,
                     self.saved_world_size(tag), self.dist.world_size)
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    to_universal(Namespace(input_folder=str(self.ckdir / tag), output_folder=str(tmp),
                                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                           strict=True, inject_missing_state=True))
                tmp.rename(out)
                (self.ckdir / UNIVERSAL_LATEST).unlink(missing_ok=True)  # names the temporary folder, gone now
            except Exception as err:  # noqa: BLE001 - every rank must learn of it, not only this one
                log.debug("the conversion of %s failed", tag, exc_info=True)
                shutil.rmtree(tmp, ignore_errors=True)
                failure = f"{type(err).__name__}: {err}"
            log.debug("%s", printed.getvalue())
        failure = self.dist.broadcast_object(failure)
        if failure is not None:
            raise NoUsableCheckpoint(
                f"checkpoint {self.ckdir / tag} was written by {self.saved_world_size(tag)} rank(s) with ZeRO-"
                f"partitioned optimizer state and could not be converted for {self.dist.world_size} ({failure}); "
                f"resume with {self.saved_world_size(tag)} rank(s), or start over with --restart")
        return out

    def load_engine(self, engine, tag: str) -> None:
        """Weights, optimizer and LR schedule of checkpoint ``tag`` into ``engine`` (collective); an engine
        built to load the universal format (:meth:`resharded`) gets the checkpoint converted to it. Every
        file is unpickled with ``weights_only=True`` (:func:`weights_only_loads`).

        Raises:
            UnsafeCheckpointFile: a file needs more than weights_only allows (replaced since it was verified).
        """
        with weights_only_loads():
            if not engine.load_universal_checkpoint():
                engine.load_checkpoint(str(self.ckdir), tag=tag)
                return
            folder = self._universal(tag)
            try:
                engine.load_checkpoint(str(self.ckdir), tag=folder.name)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # converted again by the next attempt
                raise
        self.dist.barrier()
        if self.dist.is_main:
            shutil.rmtree(folder, ignore_errors=True)
