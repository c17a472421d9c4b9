"""A run directory's state and its recipe's check: what ``RUN`` holds for a command that trains it (a new run, one
to resume from its checkpoints, a finished one, or one that trained and lost its checkpoints: :func:`run_state`),
and :func:`prepare_run_dir`, which checks a resumed run's ``recipe.yaml`` against the command's recipe by the rules
of ``common.training.run_recipe`` (what a resume may change) and holds a new run's recipe back until its first
checkpoint."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import yaml

from common.config.recipe import RecipeError, parse_yaml, to_dict, yaml_problem
from common.system.engine_config import resolve_zero_stage
from common.training.batch import launch_world_size
from common.training.checkpoints import OLD_PREFIX, tag_order
from common.training.ledger import Ledger
from common.training.run_recipe import (
    MEMORY_CHANGES,
    RECOVERY_CHANGES,
    RESUMABLE_CHANGES,
    TOLERANCE_CHANGES,
    RunRecipe,
    by_behaviour,
    field_defaults,
    flat_keys,
    recipe_diff,
    recovery_change,
)

__all__ = ["NEW", "CHECKPOINTS", "FINISHED", "LOST", "run_state", "finished_run", "lost_run_message", "has_trained",
           "prepare_run_dir"]

log = logging.getLogger(__name__)

# what a run directory holds (run_state)
NEW, CHECKPOINTS, FINISHED, LOST = "new", "checkpoints", "finished", "lost"
_FOLD = re.compile(r"fold\d+")


def _has_checkpoint(run_dir: Path) -> bool:
    """A checkpoint folder that a resume picks from is in ``RUN/checkpoints``: a tag, or a tag's previous folder
    that an interrupted save of the same tag left (``.old-TAG``, put back by the resume); not what an interrupted
    save, a conversion or a resume left aside (``.tmp-``, ``.universal-``, ``.aside-``)."""

    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.is_dir() and tag_order(p.name.removeprefix(OLD_PREFIX)) is not None
                                   for p in folder.iterdir())


def finished_run(run_dir: Path, phases: int | None = None) -> bool:
    """The run in ``run_dir`` finished: its ``model.safetensors`` is there and its ``ledger.json`` records every
    phase as ended (``phases`` of them, where given)."""

    if not (run_dir / "model.safetensors").is_file():
        return False
    try:
        ledger = Ledger.read(run_dir / "ledger.json")
    except (OSError, ValueError):  # missing, not JSON, not a ledger
        return False
    return bool(ledger.phases) and all(p.ended_by is not None for p in ledger.phases) and \
        (phases is None or len(ledger.phases) == phases)


def run_state(run_dir: Path, phases: int | None = None) -> str:
    """What ``run_dir`` (one run, not a cross-validation root) holds for a command that trains it: :data:`FINISHED`
    (its model and a complete ledger: nothing to train, whether its checkpoints are there or were deleted to free
    disk), :data:`CHECKPOINTS` (a resume loads one, or refuses where none is intact), :data:`LOST` (it wrote a
    checkpoint once, its ``recipe.yaml`` says so, and trained, its ``ledger.json`` or ``model.safetensors`` says
    so, but is unfinished and has no checkpoint now: a run from step 0 would replace it without a word, so it is
    refused) or :data:`NEW` (also a run stopped before its first checkpoint, which validations may have left a
    ledger: it starts again from step 0, as it always did). ``phases``: how many the run has."""
    run_dir = Path(run_dir)
    if finished_run(run_dir, phases):
        return FINISHED
    if _has_checkpoint(run_dir):
        return CHECKPOINTS
    trained = (run_dir / "ledger.json").is_file() or (run_dir / "model.safetensors").is_file()
    if trained and (run_dir / "recipe.yaml").is_file():  # recipe.yaml comes with the first checkpoint
        return LOST
    return NEW


def lost_run_message(run_dir: Path) -> str:
    """Why a :data:`LOST` run directory is refused, and what to do."""
    run_dir = Path(run_dir)
    what = " and ".join(n for n in ("ledger.json", "model.safetensors") if (run_dir / n).is_file())
    return (f"{run_dir} holds a run that trained ({what}) and is unfinished, but no checkpoint to resume it from "
            f"({run_dir / 'checkpoints'} is gone or empty); run with --restart to start from step 0 (what the run "
            f"left is moved aside), or use a new --run-dir")


def has_trained(run_dir: Path) -> bool:
    """A run (or one of its folds, ``foldN/``) is there to resume or protect: a checkpoint, a finished model, or
    the ledger of a run whose checkpoints are gone (:func:`run_state`)."""
    run_dir = Path(run_dir)
    folds = [p for p in run_dir.iterdir() if p.is_dir() and _FOLD.fullmatch(p.name)] if run_dir.is_dir() else []
    return any(run_state(d) != NEW for d in (run_dir, *folds))


def _recorded(path: Path) -> dict:
    """The recipe a run recorded in ``path`` (its ``recipe.yaml``).

    Raises:
        RecipeError: it cannot be read, is not valid YAML or not a mapping (naming the file and what to do).
    """
    fix = (f"it records the recipe of the run in {path.parent}, which a resume checks: restore it, or start over "
           f"with --restart (what the run left is moved aside) or in a new --run-dir")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({yaml_problem(err)}); {fix}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot be read ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: holds a {type(data).__name__}, not a recipe's mapping of sections; {fix}")
    return data


ZERO_STAGE = "train.zero_stage"


def _stage_kept(run_dir: Path, recipe, recorded, now, world_size: int) -> bool:
    """Whether ``train.zero_stage: auto`` (``now``) resumes a run whose ``recipe.yaml`` records stage ``recorded``
    (``0``: the default before ``auto``) on that stage (``common.system.engine_config.resolve_zero_stage``): a run
    (or fold) resumed from its checkpoints keeps the stage it was written with; one that starts (a fold not started
    yet) takes 0 on one rank and 1 on several. A recorded 2 is not: a checkpoint written before its stage was
    recorded reads as 1."""
    if now != "auto" or isinstance(recorded, bool) or recorded not in (0, 1):
        return False
    folds = len(getattr(getattr(recipe, "task", None), "folds", None) or [])  # a cross-validation run's
    runs = [run_dir / f"fold{k + 1}" for k in range(folds)] if folds else [run_dir]
    starts = any(run_state(p) == NEW for p in runs)
    return not starts or resolve_zero_stage("auto", world_size) == recorded


def _kind(recipe: dict) -> str | None:
    """A recorded recipe's command: fine-tuning's has a task, pretraining's SSAST settings (None: neither)."""
    return "fine-tuning" if "task" in recipe else "pretraining" if "ssast" in recipe else None


def prepare_run_dir(run_dir: Path, recipe, is_main: bool, accept_changed_data: bool = False,
                    world_size: int | None = None) -> RunRecipe:
    """Check a resumed run's recipe against its ``recipe.yaml``; hold a new (or changed) run's recipe back
    until its next checkpoint. ``accept_changed_data``: see :class:`RunRecipe`. ``world_size``: the ranks the run
    resumes on (default: the launcher's), which choose the ZeRO stage of ``train.zero_stage: auto``; a recorded
    stage and ``auto`` are the same where ``auto`` takes that stage (:func:`_stage_kept`: a run recorded before
    ``auto`` was the default recorded 0).

    Raises:
        RecipeError: the run directory holds a run of a different recipe.
    """
    path = Path(run_dir) / "recipe.yaml"
    new = parse_yaml(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    if path.is_file() and has_trained(Path(run_dir)):
        old = _recorded(path)
        kinds = [_kind(r) for r in (old, new)]
        if None not in kinds and kinds[0] != kinds[1]:  # every other key would differ too: say what the folder holds
            raise RecipeError(f"{run_dir} holds a {kinds[0]} run ({path}), and this command is {kinds[1]}: use a new "
                              f"--run-dir (a {kinds[0]} run's model is read with --init)")
        changed = recipe_diff(old, new, field_defaults(recipe))
        recorded_stage = flat_keys(old).get(ZERO_STAGE)
        if ZERO_STAGE in changed and _stage_kept(Path(run_dir), recipe, recorded_stage, flat_keys(new).get(ZERO_STAGE),
                                                 launch_world_size() if world_size is None else world_size):
            changed.remove(ZERO_STAGE)
        refused = [k for k in changed if not recovery_change(k)]
        if refused:
            written, then = flat_keys(old), by_behaviour(flat_keys(old))
            older = {k: then[k] for k in refused if k not in written and k in then}  # keys the file predates
            raise RecipeError(
                f"{run_dir} holds a run of a different recipe ({', '.join(refused[:6])} differ); a resumed run may "
                f"change only its learning rate and schedule ({', '.join(RECOVERY_CHANGES)}, phases.N.lr), "
                f"{', '.join(TOLERANCE_CHANGES + MEMORY_CHANGES)} and {', '.join(RESUMABLE_CHANGES)}. Use a new "
                f"--run-dir to start another run, or the same recipe and --set values to resume this one" +
                (f" ({path.name} predates {', '.join(older)}: the run had "
                 f"{' '.join(f'--set {k}={v}' for k, v in older.items())})" if older else "") +
                (f" (the run trained with ZeRO stage {recorded_stage}: --set {ZERO_STAGE}={recorded_stage} resumes it "
                 f"so)" if ZERO_STAGE in refused and recorded_stage is not None else "")
            )
        if not changed:
            return RunRecipe(path, accept_changed_data=accept_changed_data)
        a, b = flat_keys(old), flat_keys(new)
        changes = {k: {"from": a.get(k), "to": b.get(k)} for k in changed}  # said where the resume records them
        return RunRecipe(path, recipe if is_main else None, changes, accept_changed_data)
    if path.is_file():
        log.info("%s is from a run that stopped before its first checkpoint; it will be replaced", path)
    return RunRecipe(path, recipe if is_main else None, accept_changed_data=accept_changed_data)
