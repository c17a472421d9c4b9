"""What every training entry point shares: common flags, the run directory, and readable failures."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from common.recipe import RecipeError
from common.run_lock import LOCK_FILE, RunDirBusy, job_lock
from common.run_recipe import RunRecipe, prepare_run_dir

__all__ = ["add_run_arguments", "discard_previous", "Session", "training_session", "run_main"]

log = logging.getLogger(__name__)


def _steps(text: str) -> int:
    """``--stop-after-steps``: a whole number of steps >= 1 (0 or a negative count would train nothing, or
    everything, without a word)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of optimiser steps >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a number of optimiser steps >= 1, got {value}")
    return value


def add_run_arguments(parser: argparse.ArgumentParser, default_run_root: str) -> None:
    parser.add_argument("--run-dir", type=Path, default=None,
                        help=f"where checkpoints, logs, exports and the ledger go (default: {default_run_root}/"
                             "<recipe name>); running again on an existing run directory resumes it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set optim.lr=5e-5 --set phases.0.steps=1000 (repeatable)")
    parser.add_argument("--stop-after-steps", type=_steps, default=None, metavar="N",
                        help="checkpoint and exit after N optimiser steps in this invocation (run again to resume)")
    parser.add_argument("--restart", action="store_true",
                        help="start from step 0 although the run directory holds checkpoints; what the earlier "
                             "attempt left is moved into RUN/discarded-TIME/, nothing is deleted")
    parser.add_argument("--accept-changed-data", action="store_true",
                        help="resume although a training or validation manifest changed since the run started (the "
                             "saved data position then points at other clips; recorded in ledger.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe, print the phase plan with tokens and FLOPs, and exit")
    parser.add_argument("--coarse", metavar="METHOD:C[:SHARE]", default=None,
                        help="derive the paper's coarse-to-fine schedule from this full-resolution recipe: SHARE of "
                             "its length at compression C, then full resolution (e.g. fshift:4, fshift:4,2 for "
                             "4->2->1, avgpool:2:0.3); the recipe is recorded as the baseline (common/coarse.py)")
    # the deepspeed launcher passes --local_rank=N before the script's own arguments
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def discard_previous(run_dir: Path) -> Path | None:
    """Move everything an earlier attempt left in ``run_dir`` (but its log and its lock) into
    ``run_dir/discarded-TIME``."""
    import time

    leftovers = [p for p in run_dir.iterdir()
                 if p.name not in ("train.log", LOCK_FILE) and not p.name.startswith("discarded-")] \
        if run_dir.is_dir() else []
    if not leftovers:
        return None
    target = run_dir / time.strftime("discarded-%Y%m%d-%H%M%S")
    target.mkdir()
    for path in leftovers:
        path.rename(target / path.name)
    log.warning("--restart: moved the earlier attempt's %s into %s", ", ".join(p.name for p in leftovers), target)
    return target


@dataclass
class Session:
    """A training process's session: its place in the job and its run directory's recipe."""

    dist: object  # common.distributed.Dist
    run_recipe: RunRecipe


@contextmanager
def training_session(run_dir: Path, recipe, restart: bool = False,
                     accept_changed_data: bool = False) -> Iterator[Session]:
    """Join the process group, lock ``run_dir`` (``common.run_lock``: a second run on it stops at once), log
    into it, check its recipe (``common.run_recipe``); tear down.

    Args:
        run_dir: the run directory (resumed when it holds a run of the same recipe).
        recipe: the resolved recipe.
        restart: start over: the earlier attempt's files are moved aside first (:func:`discard_previous`).
        accept_changed_data: resume although the manifests changed (``--accept-changed-data``).
    """
    from common.distributed import init_distributed
    from common.logger import setup_logging

    dist = init_distributed()
    try:
        with job_lock(run_dir, dist):
            setup_logging(run_dir, dist.rank)
            if restart and dist.is_main:
                discard_previous(run_dir)
            dist.barrier()
            yield Session(dist, prepare_run_dir(run_dir, recipe, dist.is_main, accept_changed_data))
    finally:
        dist.teardown()


def run_main(body: Callable[[], int]) -> int:
    """Run an entry point; known failures end with one readable line (the traceback goes to the log)."""
    from common.data import TooMuchBadAudio
    from common.data_fingerprint import DataChanged
    from common.run_checkpoint import NoUsableCheckpoint
    from common.nonfinite import NonFiniteLoss

    try:
        return body()
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except (RecipeError, FileNotFoundError, NonFiniteLoss, TooMuchBadAudio, NoUsableCheckpoint, RunDirBusy,
            ValueError) as err:
        log.debug("%s", traceback.format_exc())
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (RecipeError, FileNotFoundError, DataChanged)) else 1
