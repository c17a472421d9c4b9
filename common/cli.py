"""What every training entry point shares: common flags, the run directory, and readable failures."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import yaml

from common.recipe import RecipeError, dump_yaml, parse_yaml, to_dict

__all__ = ["add_run_arguments", "prepare_run_dir", "training_session", "run_main", "recipe_diff",
           "recovery_change", "recipe_checkpointed", "record_interventions"]

log = logging.getLogger(__name__)

# keys that may change between a run and its resumption (they do not change what is computed)
RESUMABLE_CHANGES = ("data.num_workers", "train.log_every", "train.keep_checkpoints", "train.eval_batches",
                     "data.eval_batch_size")
# the documented recovery after a non-finite loss: resume with another learning rate or schedule; the
# change is accepted and recorded in ledger.json as an intervention
RECOVERY_CHANGES = ("optim.lr", "optim.warmup_steps", "optim.schedule", "optim.patience", "optim.decay",
                    "optim.decay_start", "optim.decay_every", "optim.min_lr")
_PHASE_LR = re.compile(r"phases\.\d+\.lr")

# Between prepare_run_dir and the trainer, per resolved run directory: the recipe to write at the first
# checkpoint (recipe.yaml appears only once training has started, so a failed start leaves no trap) and
# the accepted recovery changes to record in the ledger once the run has resumed.
_PENDING_RECIPE: dict[Path, object] = {}
_PENDING_CHANGES: dict[Path, dict] = {}


def add_run_arguments(parser: argparse.ArgumentParser, default_run_root: str) -> None:
    parser.add_argument("--run-dir", type=Path, default=None,
                        help=f"where checkpoints, logs, exports and the ledger go (default: {default_run_root}/"
                             "<recipe name>); running again on an existing run directory resumes it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set optim.lr=5e-5 --set phases.0.steps=1000 (repeatable)")
    parser.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                        help="checkpoint and exit after N optimiser steps in this invocation (run again to resume)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe, print the phase plan with tokens and FLOPs, and exit")
    # the deepspeed launcher passes --local_rank=N before the script's own arguments
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}.{i}"))
        return out
    return {prefix: data}


def recipe_diff(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two resolved recipes (ignoring harmless ones)."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES))


def recovery_change(key: str) -> bool:
    """Whether a resumed run may change ``key``: learning-rate and schedule settings (see RECOVERY_CHANGES)."""
    return key in RECOVERY_CHANGES or bool(_PHASE_LR.fullmatch(key))


def _has_trained(run_dir: Path) -> bool:
    """A checkpoint (of the run or of one of its folds) or a finished model is there to resume or protect."""
    if (run_dir / "model.safetensors").is_file():
        return True
    return any(p.is_dir() and not p.name.startswith(".")
               for pattern in ("checkpoints/*", "*/checkpoints/*") for p in run_dir.glob(pattern))


def prepare_run_dir(run_dir: Path, recipe, is_main: bool) -> dict[str, dict]:
    """Check a resumed run's recipe against its ``recipe.yaml``; hold a new run's recipe for its first checkpoint.

    A run directory gets ``recipe.yaml`` when the trainer writes its first checkpoint
    (:func:`recipe_checkpointed`), so that a run failing before it leaves nothing that refuses the corrected
    command. Resuming a run that has trained accepts changed learning-rate and schedule settings (the
    recovery from a non-finite loss; recorded by :func:`record_interventions`) and refuses other changes.

    Returns:
        The accepted changes, ``{key: {"from": old, "to": new}}`` (empty for a new or unchanged run).

    Raises:
        RecipeError: the run directory holds a run of a different recipe.
    """
    path = run_dir / "recipe.yaml"
    key = Path(run_dir).resolve()
    new = parse_yaml(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    if path.is_file() and _has_trained(run_dir):
        old = parse_yaml(path.read_text())
        changed = recipe_diff(old, new)
        refused = [k for k in changed if not recovery_change(k)]
        if refused:
            raise RecipeError(
                f"{run_dir} holds a run of a different recipe ({', '.join(refused[:6])} differ); a resumed run may "
                f"change only its learning rate and schedule ({', '.join(RECOVERY_CHANGES)}, phases.N.lr) and "
                f"{', '.join(RESUMABLE_CHANGES)}. Use a new --run-dir to start another run, or the same recipe "
                f"and --set values to resume this one"
            )
        if not changed:
            return {}
        a, b = _flatten(old), _flatten(new)
        changes = {k: {"from": a.get(k), "to": b.get(k)} for k in changed}
        log.warning("resuming %s with changed %s; recorded in ledger.json as an intervention", run_dir,
                    ", ".join(f"{k} {v['from']} -> {v['to']}" for k, v in changes.items()))
        _PENDING_CHANGES[key] = changes
        if is_main:
            _PENDING_RECIPE[key] = recipe  # recipe.yaml follows at the next checkpoint
        return changes
    if path.is_file():
        log.info("%s is from a run that stopped before its first checkpoint; it will be replaced", path)
    if is_main:
        _PENDING_RECIPE[key] = recipe
    return {}


def _pending(table: dict, run_dir: Path):
    """The entry for ``run_dir`` or a folder above it (fold runs live inside the run directory)."""
    run_dir = Path(run_dir).resolve()
    for folder in (run_dir, *run_dir.parents):
        if folder in table:
            return table.pop(folder)
    return None


def recipe_checkpointed(run_dir: Path) -> None:
    """Trainer hook, called before every checkpoint: writes the run's ``recipe.yaml`` when one is pending.

    ``training_session`` holds a new (or changed) run's recipe back until then; this writes it (rank 0)
    where :func:`prepare_run_dir` will find it on resume.
    """
    if not _PENDING_RECIPE:
        return
    run_dir = Path(run_dir).resolve()
    for folder in (run_dir, *run_dir.parents):
        if folder in _PENDING_RECIPE:
            folder.mkdir(parents=True, exist_ok=True)
            dump_yaml(_PENDING_RECIPE.pop(folder), folder / "recipe.yaml")
            return


def record_interventions(run_dir: Path, ledger, phase: int, step: int) -> None:
    """Trainer hook, called once a run has resumed: records accepted recipe changes in its ledger.

    Args:
        run_dir: the trainer's run directory (a fold's directory is inside the run directory).
        ledger: the resumed run's :class:`common.ledger.Ledger`.
        phase: 0-based phase the run resumes in.
        step: optimiser steps done in the whole run when the changed settings take effect.
    """
    changes = _pending(_PENDING_CHANGES, run_dir) if _PENDING_CHANGES else None
    if changes:
        ledger.add_intervention(step=step, phase=phase, changes=changes)


@contextmanager
def training_session(run_dir: Path, recipe) -> Iterator:
    """Join the process group, log into ``run_dir``, check its recipe (see :func:`prepare_run_dir`); tear down.

    Yields the :class:`common.distributed.Dist` of this process.
    """
    from common.distributed import init_distributed
    from common.logger import setup_logging

    dist = init_distributed()
    setup_logging(run_dir, dist.rank)
    try:
        prepare_run_dir(run_dir, recipe, dist.is_main)
        yield dist
    finally:
        _PENDING_RECIPE.pop(Path(run_dir).resolve(), None)  # a run that never checkpointed leaves no recipe
        _PENDING_CHANGES.pop(Path(run_dir).resolve(), None)
        dist.teardown()


def run_main(body: Callable[[], int]) -> int:
    """Run an entry point; known failures end with one readable line (the traceback goes to the log)."""
    from common.data import TooMuchBadAudio
    from common.trainer import NonFiniteLoss

    try:
        return body()
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except (RecipeError, FileNotFoundError, NonFiniteLoss, TooMuchBadAudio, ValueError) as err:
        log.debug("%s", traceback.format_exc())
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (RecipeError, FileNotFoundError)) else 1
