"""A run directory's recipe: checked when a run resumes, written when the run has trained.

``RUN/recipe.yaml`` is the resolved recipe of the run in ``RUN``. It is written with the run's first
checkpoint, not before: a run that fails before it leaves nothing that would refuse the corrected command.
Re-running on a run directory that holds checkpoints resumes it, and the recipe must be the same, except

- settings that do not change what is computed (:data:`RESUMABLE_CHANGES`), and
- the documented recovery after a non-finite loss: another learning rate or schedule
  (:data:`RECOVERY_CHANGES`, ``phases.N.lr``), and after too much bad audio: another
  ``data.max_bad_fraction`` (:data:`TOLERANCE_CHANGES`), and after running out of device memory: a smaller
  micro-batch, ``data.max_batch_per_rank`` (:data:`MEMORY_CHANGES`: the same global batch in more accumulated
  micro-batches; the data position is converted), accepted and recorded in ``ledger.json`` as an intervention by
  the trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.config.recipe import RecipeError, dump_yaml, parse_yaml, to_dict, yaml_problem
from common.models.arch import official_channels
from common.system.engine_config import resolve_zero_stage
from common.training.batch import launch_world_size

__all__ = ["RESUMABLE_CHANGES", "RECOVERY_CHANGES", "TOLERANCE_CHANGES", "MEMORY_CHANGES", "RunRecipe", "has_trained",
           "run_state", "finished_run", "lost_run_message", "NEW", "CHECKPOINTS", "FINISHED", "LOST", "prepare_run_dir",
           "field_defaults", "recipe_diff", "recovery_change"]

log = logging.getLogger(__name__)

# keys that may change between a run and its resumption (they do not change what is computed)
RESUMABLE_CHANGES = ("data.num_workers", "train.cpu_threads", "train.log_every", "train.keep_checkpoints",
                     "train.eval_batches", "data.eval_batch_size", "train.accept_baseline_differences",
                     "transfer.init_pos_embed")  # the last: how --init is fitted, read only when a run starts
# the documented recovery after a non-finite loss: resume with another learning rate or schedule
RECOVERY_CHANGES = ("optim.lr", "optim.warmup_steps", "optim.schedule", "optim.patience", "optim.decay",
                    "optim.decay_start", "optim.decay_every", "optim.min_lr")
# the documented recovery after too much bad audio (the error names it): tolerate a larger share
TOLERANCE_CHANGES = ("data.max_bad_fraction",)
# the documented recovery after the device ran out of memory (the error names it): a smaller micro-batch
MEMORY_CHANGES = ("data.max_batch_per_rank",)
_PHASE_LR = re.compile(r"phases\.\d+\.lr")


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


# keys that name a file: the same file by another spelling (relative, absolute; a recipe.yaml of an older version
# stored the path as typed) is no change
_PATHS = ("baseline",)


def _same(key: str, a, b) -> bool:
    if key in _PATHS and isinstance(a, str) and isinstance(b, str):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


# keys added with a default other than what the code did before them: a recipe.yaml written before a key existed
# did this (every training set streamed through the shuffle buffer; training clips cropped at random)
BEFORE_KEY = {"data.shuffle": "buffer", "data.full_shuffle_max": 0, "data.train_crop": "random"}


def _behaviour(flat: dict) -> dict:
    """A flattened recipe with what a setting does in place of how it is written: ``data.channels: auto`` is the
    architecture's (HTS-AT: ``mean``, the AST family: ``first``), and a recipe written before the key existed read
    the first channel; SSAST's ``ssast.eval_mask_ratio`` is the ratio it masks (``null``, or a recipe written
    before the key existed: the training ratio); the keys of :data:`BEFORE_KEY`, absent, are what they say."""
    channels = flat.get("data.channels", "first")
    if channels == "auto":
        channels = official_channels(flat.get("model.arch", "ast"))
    out = {**BEFORE_KEY, **flat, "data.channels": channels}
    if "ssast.mask_ratio" in flat:
        masked = flat.get("ssast.eval_mask_ratio")
        out["ssast.eval_mask_ratio"] = masked if masked is not None else flat["ssast.mask_ratio"]
    return out


def field_defaults(recipe, prefix: str = "") -> dict:
    """The flattened keys of a recipe's dataclass tree with the default each field gives (lists of sections, such
    as ``phases``, have none)."""
    out = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if dataclasses.is_dataclass(value):
            out.update(field_defaults(value, f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[prefix + f.name] = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[prefix + f.name] = to_dict(f.default_factory())
    return out


def recipe_diff(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """Keys whose values differ between two resolved recipes (ignoring harmless ones; a key by what it does).

    ``defaults`` (:func:`field_defaults`): a key that a ``recipe.yaml`` written before the key existed lacks is
    the same when the new recipe gives it its default, as a new key's default keeps the behaviour from before it;
    the keys whose absence means something else are read in :func:`_behaviour` (``data.channels``,
    :data:`BEFORE_KEY`): such a run is refused unless ``--set`` gives them the old behaviour."""
    a, b, defaults = _behaviour(_flatten(old)), _behaviour(_flatten(new)), defaults or {}
    return sorted(k for k in set(a) | set(b) if not _same(k, a.get(k), b.get(k))
                  and not (k not in a and k in defaults and _same(k, defaults[k], b.get(k)))
                  and not k.startswith(RESUMABLE_CHANGES))


def recovery_change(key: str) -> bool:
    """Whether a resumed run may change ``key``: learning-rate and schedule settings (see RECOVERY_CHANGES), the
    bad-audio tolerance (TOLERANCE_CHANGES) and the micro-batch cap (MEMORY_CHANGES)."""
    return key in RECOVERY_CHANGES or key in TOLERANCE_CHANGES or key in MEMORY_CHANGES or \
        bool(_PHASE_LR.fullmatch(key))


# what a run directory holds (run_state)
NEW, CHECKPOINTS, FINISHED, LOST = "new", "checkpoints", "finished", "lost"
_FOLD = re.compile(r"fold\d+")


def _has_checkpoint(run_dir: Path) -> bool:
    """A checkpoint folder that a resume picks from is in ``RUN/checkpoints``: a tag, or a tag's previous folder
    that an interrupted save of the same tag left (``.old-TAG``, put back by the resume); not what an interrupted
    save, a conversion or a resume left aside (``.tmp-``, ``.universal-``, ``.aside-``)."""
    from common.training.checkpoints import OLD_PREFIX, tag_order  # lazy: checkpoints loads torch

    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.is_dir() and tag_order(p.name.removeprefix(OLD_PREFIX)) is not None
                                   for p in folder.iterdir())


def finished_run(run_dir: Path, phases: int | None = None) -> bool:
    """The run in ``run_dir`` finished: its ``model.safetensors`` is there and its ``ledger.json`` records every
    phase as ended (``phases`` of them, where given)."""
    from common.training.ledger import Ledger  # lazy: the ledger's module is not needed to plan

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


@dataclass
class RunRecipe:
    """What the trainer does with the run directory's recipe.

    Attributes:
        path: ``RUN/recipe.yaml`` (a fold's trainer writes its run's, one folder up).
        pending: the recipe to write with the next checkpoint (None: the file is up to date).
        changes: accepted recovery changes, ``{key: {"from": old, "to": new}}``, for the ledger.
        accept_changed_data: resume although the manifests changed since the run started
            (``--accept-changed-data``; ``common.data.fingerprint``).
    """

    path: Path
    pending: object | None = None
    changes: dict[str, dict] = field(default_factory=dict)
    accept_changed_data: bool = False

    def write_pending(self) -> None:
        """Write the held-back recipe (rank 0, with a checkpoint); later calls do nothing."""
        if self.pending is not None:
            dump_yaml(self.pending, self.path)
            self.pending = None


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
        recorded_stage = _flatten(old).get(ZERO_STAGE)
        if ZERO_STAGE in changed and _stage_kept(Path(run_dir), recipe, recorded_stage, _flatten(new).get(ZERO_STAGE),
                                                 launch_world_size() if world_size is None else world_size):
            changed.remove(ZERO_STAGE)
        refused = [k for k in changed if not recovery_change(k)]
        if refused:
            written, then = _flatten(old), _behaviour(_flatten(old))
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
        a, b = _flatten(old), _flatten(new)
        changes = {k: {"from": a.get(k), "to": b.get(k)} for k in changed}  # said where the resume records them
        return RunRecipe(path, recipe if is_main else None, changes, accept_changed_data)
    if path.is_file():
        log.info("%s is from a run that stopped before its first checkpoint; it will be replaced", path)
    return RunRecipe(path, recipe if is_main else None, accept_changed_data=accept_changed_data)
