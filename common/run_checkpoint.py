"""Training checkpoints of a run: DeepSpeed's checkpoint plus the trainer's own state, written atomically.

Layout under ``RUN/checkpoints``::

    LATEST                        the tag of the newest complete checkpoint (replaced atomically)
    phase01-step000004000/        DeepSpeed files (module, optimizer, LR schedule) +
        trainer_state.json        phase, step, data position, ledger, ... (rank 0)
        rng_rank{r}.pt            every rank's random-number generator states

A checkpoint is written into ``.tmp-TAG`` and renamed into place only when every rank has finished,
then ``LATEST`` moves to it: a run killed while saving resumes from the previous checkpoint. The run
directory must be on a file system all ranks share.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from common.checkpoint import atomic_write_text

__all__ = ["make_tag", "latest_tag", "save_checkpoint", "read_trainer_state", "read_rng_state",
           "read_module_state", "remove_partial"]

log = logging.getLogger(__name__)

LATEST = "LATEST"
TMP_PREFIX = ".tmp-"


def make_tag(phase: int, step: int) -> str:
    return f"phase{phase + 1:02d}-step{step:09d}"


def latest_tag(ckdir: Path) -> str | None:
    """The newest complete checkpoint's tag, or None (no checkpoint yet)."""
    pointer = Path(ckdir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (Path(ckdir) / tag / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names checkpoint {tag!r}, which is missing or incomplete")
    return tag


def remove_partial(ckdir: Path) -> None:
    """Delete checkpoints whose writing was interrupted (call on rank 0 before resuming)."""
    for tmp in Path(ckdir).glob(f"{TMP_PREFIX}*"):
        log.warning("removing interrupted checkpoint %s", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(engine, ckdir: Path, tag: str, trainer_state: dict, rng_state: dict, dist, keep: int) -> None:
    """Save on every rank (collective); rank 0 publishes it and prunes to the newest ``keep``."""
    ckdir = Path(ckdir)
    tmp = f"{TMP_PREFIX}{tag}"
    engine.save_checkpoint(str(ckdir), tag=tmp, client_state={}, save_latest=False)
    torch.save(rng_state, ckdir / tmp / f"rng_rank{dist.rank}.pt")
    if dist.is_main:
        atomic_write_text(ckdir / tmp / "trainer_state.json", json.dumps(trainer_state))
    dist.barrier()
    if dist.is_main:
        final = ckdir / tag
        if final.exists():
            shutil.rmtree(final)
        (ckdir / tmp).rename(final)
        atomic_write_text(ckdir / LATEST, tag)
        done = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("phase"))
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    dist.barrier()


def read_trainer_state(ckdir: Path, tag: str) -> dict:
    return json.loads((Path(ckdir) / tag / "trainer_state.json").read_text())


def read_rng_state(ckdir: Path, tag: str, rank: int) -> dict | None:
    path = Path(ckdir) / tag / f"rng_rank{rank}.pt"
    if not path.is_file():
        log.warning("%s missing (resuming with another number of ranks?): random state not restored", path)
        return None
    return torch.load(path, weights_only=True)


def read_module_state(ckdir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (ZeRO stage <= 2 keeps the whole module on rank 0's file)."""
    path = Path(ckdir) / tag / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]
