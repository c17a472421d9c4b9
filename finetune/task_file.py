"""A task file (``--task my_task.yaml``): its task fields, the recipe sections beside them, and the defaults it
gets where it leaves a setting open.

A task file holds the task's fields (flat, or under ``task:``) and may hold recipe sections beside them
(:func:`task_source`). What it leaves open comes from the published recipe closest to it
(``finetune.task_recipes``: chosen by its labels, clip length, balanced sampling and ``--init``'s family;
``defaults: package`` keeps the package's bare defaults), with a warm-up scaled to its data
(:func:`auto_warmup`); the run's log says which (:func:`apply_task_file_defaults`). ``finetune.recipe``
assembles the recipe from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from common.audio.fbank import NORM_STATS
from common.config.recipe import RecipeError, apply_overrides, did_you_mean, load_yaml, merge
from common.data.preflight import count_clips
from common.phases.init import INIT_FAMILIES, init_family, load_init
from common.training.optim import OptimConfig
from finetune.classifier import AugmentConfig
from finetune.task_recipes import AUTO, PACKAGE, PACKAGE_EPOCHS, RECIPES, choose, fit_averaging, recipe_defaults
from finetune.tasks import TaskConfig, known_tasks, task_defaults

if typing.TYPE_CHECKING:  # annotations only: the recipe is assembled from this module's parts
    from finetune.recipe import FinetuneRecipe

__all__ = ["RECIPE_SECTIONS", "MAX_AUTO_WARMUP", "is_task_file", "task_source", "auto_warmup", "task_file_data",
           "apply_task_file_defaults", "defaults_follow_init"]


# the sections of a fine-tuning recipe that a task file may hold next to its task fields
RECIPE_SECTIONS = ("phases", "model", "head", "augment", "data", "transfer", "optim", "train", "num_mel_bins")
MAX_AUTO_WARMUP = 1000  # AST's warm-up, the most a task file's automatic warm-up takes


def _epochs(value, path: Path) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"epochs: expected a whole number of epochs >= 1, got {value!r} (in {path})")
    return value


def _relative_to(path: Path, value):
    """A path written in a task file, made absolute against the file's folder (strings only)."""
    if not isinstance(value, str) or not value:
        return value
    expanded = os.path.expandvars(os.path.expanduser(value))
    return expanded if os.path.isabs(expanded) else str((path.parent / expanded).resolve())


def is_task_file(task: str) -> bool:
    """Whether ``--task`` names a task YAML file rather than a registered task."""
    path = Path(task)
    return path.suffix in (".yaml", ".yml") or path.is_file()


def task_source(task: str) -> tuple[dict, dict]:
    """``(task fields, default recipe)`` for a task name or a task YAML file.

    A task file holds the task's fields (flat, or under ``task:``) and may hold recipe sections beside
    them (``optim:``, ``model:``, ``phases:``, ...), which become its default recipe (in the flat layout
    ``train:`` is the task's manifests: the recipe's ``train:`` section needs the ``task:`` layout). ``epochs: N`` is
    short for ``phases: [{compression: none, epochs: N}]``; ``defaults:`` (kept in the recipe, for
    :func:`load_recipe`) says what the rest starts from (``finetune.task_recipes``). Paths (manifests, class
    list, a ``norm`` statistics file) are relative to the file.
    """
    if not is_task_file(task):
        try:
            return task_defaults(task)
        except ValueError as err:  # bad input: exit status 2, as every failed check before compute
            raise RecipeError(f"--task: {err}") from None
    path = Path(task)
    if not path.is_file():
        raise RecipeError(f"--task: task file {path} does not exist (a registered task is named without .yaml: "
                          f"{known_tasks()})")
    data = load_yaml(path)
    choice = data.pop("defaults", None)
    layered = "task" in data  # the task: layout (its fields under task:, the recipe's sections beside it)
    if layered:
        fields = data.pop("task")
        if not isinstance(fields, dict):
            raise RecipeError(f"task: expected the task's fields (name, train, valid, classes, ...) in {path}")
        if "defaults" in fields:
            raise RecipeError(f"task.defaults: not a task field; write defaults: at the top level of {path}, beside "
                              f"task:")
        misplaced = sorted(k for k in fields if k in RECIPE_SECTIONS and (k != "train" or isinstance(fields[k], dict)))
        if misplaced:
            raise RecipeError(f"task.{misplaced[0]}: a recipe section, not a task field; write it at the top "
                              f"level of {path}, beside task:")
        sections = data
    else:  # flat: "train" is the task's manifests; the recipe's train section needs the task: layout
        if isinstance(data.get("train"), dict):
            raise RecipeError(f"train: in a flat task file, train: lists the training manifests; write the task's "
                              f"fields under task: and the recipe's train section beside it ({path})")
        sections = {k: data.pop(k) for k in RECIPE_SECTIONS if k in data and k != "train"}
        fields = data
    fields = dict(fields)
    known = {f.name for f in dataclasses.fields(TaskConfig) if f.init} | (set() if layered else {"epochs"})
    typo = sorted((k for k in fields if k not in known), key=str)
    if typo:
        where = "task." if layered else ""
        also = "" if layered else f"; beside them: epochs and the recipe sections {', '.join(RECIPE_SECTIONS)}"
        fields_known = ", ".join(sorted(known - {"epochs"}))
        hint = did_you_mean(typo[0], known | (set() if layered else set(RECIPE_SECTIONS)))
        raise RecipeError(f"{where}{typo[0]}: unknown key in {path} ({hint}task fields: {fields_known}{also})")
    unknown = sorted(set(sections) - set(RECIPE_SECTIONS) - {"epochs"})
    if unknown:
        hint = did_you_mean(unknown[0], [*RECIPE_SECTIONS, "epochs"])
        raise RecipeError(f"{unknown[0]}: unknown key in {path} ({hint}task fields go under task:; recipe sections are "
                          f"{', '.join(RECIPE_SECTIONS)})")
    fields.setdefault("name", path.stem)
    for key in ("train", "valid", "test", "folds"):  # a user's manifests are relative to the file
        if isinstance(fields.get(key), list):
            fields[key] = [_relative_to(path, p) for p in fields[key]]
    if "classes" in fields:
        fields["classes"] = _relative_to(path, fields["classes"])
    norm = fields.get("norm")
    if isinstance(norm, str) and norm not in NORM_STATS:
        fields["norm"] = _relative_to(path, norm)
    epochs = sections.pop("epochs", None) if "epochs" in sections else fields.pop("epochs", None)
    recipe = dict(sections)
    if epochs is not None and "phases" in recipe:
        raise RecipeError(f"epochs: give epochs or phases in {path}, not both (epochs: N is short for "
                          f"phases: [{{compression: none, epochs: N}}])")
    if epochs is not None:
        recipe["phases"] = [{"compression": "none", "epochs": _epochs(epochs, path)}]
    if choice is not None:
        recipe["defaults"] = choice
    return fields, recipe


def auto_warmup(clips: int, batch: int) -> int:
    """A task file's warm-up: the first half of the first epoch, at most ``MAX_AUTO_WARMUP`` steps.

    Args:
        clips: training clips per epoch.
        batch: the global batch (clips per optimiser step over every rank).
    """
    steps_per_epoch = max(1, clips // max(1, batch))
    return max(1, min(MAX_AUTO_WARMUP, math.ceil(steps_per_epoch / 2)))


def _schedule(o: OptimConfig) -> str:
    floor = f", no lower than {o.min_lr:g}" if o.min_lr else ""
    if o.schedule == "plateau":
        return f"plateau schedule (x{o.decay:g} after more than {o.patience} epochs without improvement{floor})"
    if o.schedule == "multistep":
        every = "every epoch" if o.decay_every == 1 else f"every {o.decay_every} epochs"
        return f"multistep schedule (x{o.decay:g} {every} from epoch {o.decay_start}{floor})"
    return f"{o.schedule} schedule"


def _augmentation(a: AugmentConfig) -> str:
    if not (a.freqm or a.timem or a.mixup or a.noise):
        return "no augmentation (no SpecAugment, no mixup)"
    parts = [f"SpecAugment {a.freqm} / {a.timem}" if a.freqm or a.timem else "no SpecAugment"]
    parts += ["SSAST's noise"] if a.noise else []
    parts.append(f"mixup {a.mixup:g}" if a.mixup else "no mixup")
    return ", ".join(parts)


def _followed(recipe: FinetuneRecipe, stated: dict, warmup: str | None) -> list[str]:
    """What the run takes from the published recipe it follows (and what the user states on top)."""
    o, t, run = recipe.optim, recipe.train, []
    if "phases" not in stated:
        run.append(f"{recipe.phases[-1].epochs} epochs")
    run.append(f"optimiser {o.optimizer}, lr {o.lr:g}, {_schedule(o)}, "
               + (warmup or ("no warm-up" if o.warmup_steps == 0 else f"warm-up {o.warmup_steps} steps")))
    run.append(_augmentation(recipe.augment))
    if "loss" not in stated["task"]:
        run.append(f"{recipe.task.loss} loss")
    if t.weight_average_from is not None or t.weight_average_top is not None:
        best = f"best {t.weight_average_top} epochs" if t.weight_average_top else "epochs"
        run.append(f"weight average of the {best} from epoch {t.weight_average_from or 1}")
    return run


def apply_task_file_defaults(recipe: FinetuneRecipe, data: dict, notes: list[str] | None, stated: dict,
                             followed: str, scaled: list[str], source: str = "task file") -> FinetuneRecipe:
    """Fill in what a task file leaves to the defaults: warm-up scaled to the data, and say which defaults apply.

    Args:
        data: the recipe data with the defaults (before ``--coarse``).
        stated: what the task file, ``--recipe`` and ``--set`` state.
        followed: ``package`` or the name of the published recipe followed (``finetune.task_recipes``).
        scaled: what was fitted to the task (``SpecAugment time mask 96 -> 56 for 300 frames``).
        source: what the notes call the task (``task file``; ``task`` for a registered one given ``defaults``).
    """
    given = {k for k in ("optim", "model", "augment", "head") if k in stated}
    said = []
    optim = data.get("optim") if isinstance(data.get("optim"), dict) else {}
    warmup = None
    try:
        clips = count_clips(recipe.task.fold_splits()[0][0])
    except (OSError, EOFError, ValueError):
        clips = None  # missing or broken manifests: check_files reports them
    if clips:
        batch = recipe.phases[0].batch_size_or(recipe.data.batch_size)  # the global batch: clips per step
        # neither stated nor set by the followed recipe (a batch above the set's clips: check_batch_fits refuses it)
        if clips >= batch and "warmup_steps" not in optim:
            warmup = auto_warmup(clips, batch)
            recipe = replace(recipe, optim=replace(recipe.optim, warmup_steps=warmup))
            warmup = (f"warm-up {warmup} steps (the first half of the first epoch: {clips} clips at {batch} per "
                      f"step; at most {MAX_AUTO_WARMUP})")
    o = recipe.optim
    if followed != PACKAGE:
        said = _followed(recipe, stated, warmup)
    else:
        said += [warmup] if warmup else []
        if "optim" not in given:
            said.append(f"optimiser {o.optimizer}, lr {o.lr:g}, {_schedule(o)}")
        if "augment" not in given:
            said.append(_augmentation(recipe.augment))
    if "model" not in given and recipe.init == "none" and recipe.model.arch == "ast":
        said.append(f"model size {recipe.model.size}, patch {recipe.model.patch[0]}x{recipe.model.patch[1]}")
    if "head" not in given:
        said.append(f"{recipe.head.pool} pooling")
    if notes is None:
        return recipe
    where = "the task file, --recipe or --set" if source == "task file" else "--recipe or --set"
    package = "'defaults: package' in the task file" if source == "task file" else "--set defaults=package"
    if followed == PACKAGE:
        notes.append(f"{source} {recipe.task.name}: package defaults (defaults: package): {'; '.join(said)}; set "
                     f"any of them in {where} (optim:, model:, augment:, head:)")
    else:
        notes.append(f"{source} {recipe.task.name}: defaults: {RECIPES[followed].describe()}"
                     f"{''.join(f', {s}' for s in scaled)}; the run: {'; '.join(said)}. What {where} states wins; "
                     f"{package} keeps the package's bare defaults")
    return recipe


def task_file_data(task: str, data: dict, overrides: Sequence[str], init_weights,
                   planning: bool = False) -> tuple[dict, dict, str, list[str]]:
    """A task file's recipe data on top of its defaults (``finetune.task_recipes``).

    Args:
        data: the task file's data, the ``--recipe`` file merged in, before ``--set``.
        init_weights: the loaded ``--init`` (None: loaded here when the data names one).
        planning: a plan (``--dry-run``): an init that does not exist yet is planned as a start from scratch
            (the entry point lists it as missing).

    Returns:
        ``(data, stated, followed, said)``: the merged data with ``--set`` applied; what the user states;
        ``package`` or the followed recipe's name; what was fitted to the task.
    """
    stated = apply_overrides(data, overrides)
    choice = stated.pop("defaults", None)
    fields = stated["task"]
    model = stated.get("model") if isinstance(stated.get("model"), dict) else {}
    frames = fields.get("target_frames")
    if not isinstance(frames, int) or isinstance(frames, bool):
        frames = TaskConfig.target_frames  # a bad value is reported when the task is built
    if init_weights is None and stated["init"] != "none":
        try:
            init_weights = load_init(stated["init"])
        except FileNotFoundError:
            if not planning:
                raise
    family = init_family(init_weights, model.get("arch", "ast"))
    balanced = fields.get("balanced") is True
    followed = choose(choice, fields.get("metric") == "mAP", frames, family, balanced)
    if followed == PACKAGE:
        defaults, said = {"phases": [{"compression": "none", "epochs": PACKAGE_EPOCHS}]}, []
    else:
        defaults, said = recipe_defaults(followed, frames, stated)
    merged = apply_overrides(merge(defaults, data), overrides)
    merged.pop("defaults", None)
    if followed != PACKAGE:
        said += fit_averaging(followed, merged, stated)
    if followed != PACKAGE and choice in (None, AUTO):
        multi = "multi" if fields.get("metric") == "mAP" else "single"
        sampled = ", balanced sampling" if balanced and fields.get("metric") == "mAP" and family != "htsat" else ""
        said.insert(0, f"chosen for a {multi}-label task of {frames} frames{sampled}, {INIT_FAMILIES[family]}")
    return merged, stated, followed, said


def defaults_follow_init(task: str, recipe_path: str | Path | None = None, overrides: Sequence[str] = ()) -> bool:
    """Whether the recipe's defaults may depend on ``--init``'s family (:func:`load_recipe` then reads the init):
    a task file's, or a registered task's given ``defaults:`` in ``--recipe`` or ``--set``."""
    if is_task_file(task):
        return True
    given = load_yaml(recipe_path) if recipe_path is not None else {}
    return "defaults" in given or any(item.split("=", 1)[0].strip() == "defaults" for item in overrides)
