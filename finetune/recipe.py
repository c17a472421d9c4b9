"""The fine-tuning recipe: the task, the phases (epoch-based) and the training settings.

Values come, from lowest to highest precedence, from the dataclass defaults, the task's default recipe
(``finetune/tasks.py``; for a task file the published recipe closest to it, ``finetune.task_recipes``),
the ``--recipe`` file and ``--set`` overrides. Without a recipe file a task trains its published baseline
recipe at full resolution; a coarse-to-fine recipe (``recipes/ft_*.yaml``) replaces the ``phases``;
``coarse`` (or ``--coarse``) derives a coarse-to-fine schedule from the full-resolution recipe
(``common.phases.coarse``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

from common.audio.fbank import NORM_STATS
from common.audio.pipeline import AudioConfig
from common.config.recipe import RecipeError, apply_overrides, load_yaml, merge, recipe_files, with_source
from common.data.config import DataConfig
from common.data.preflight import check_classes, check_labels, check_manifest, check_norm, count_clips
from common.models.spec import ModelSpec
from common.phases.coarse import CoarseConfig, apply_coarse, baseline_name, build_derived
from common.phases.config import PhaseConfig
from common.phases.init import INIT_FAMILIES, InitTransferConfig, init_family, load_init
from common.phases.until import check_schedule
from common.training.optim import OptimConfig
from common.training.spec import TrainConfig
from finetune.classifier import AugmentConfig, HeadConfig
from finetune.task_recipes import AUTO, PACKAGE, PACKAGE_EPOCHS, RECIPES, choose, fit_averaging, recipe_defaults
from finetune.tasks import TaskConfig, known_tasks, task_defaults

__all__ = ["FinetuneRecipe", "load_recipe", "task_source", "is_task_file", "file_checks", "check_files",
           "auto_warmup"]


@dataclass(frozen=True)
class FinetuneRecipe:
    """A fine-tuning run's recipe. ``init`` is ``--init``; ``expected_init`` says what the recipe was written
    to start from (``any``, ``none``, ``imagenet`` or ``audio``: weights trained on audio), and a run whose
    ``--init`` is of another kind is warned that it does not start as the recipe's source did.

    Args:
        task: the task (``--task``: a registered one or a task file); its fields can be changed with ``--set``.
        phases: the schedule, compressed phases first (epoch-based: ``epochs``).
        init: the weights to start from (``--init``: a run directory, an export, an official checkpoint, an HF
            directory, or ``none``).
        expected_init: what the recipe was written to start from (``any``, ``none``, ``imagenet``, ``audio``).
        model: the encoder (architecture, size, patches, stride).
        head: the classifier head (pooling).
        augment: SpecAugment, mixup, noise.
        data: the batch and the loader (the manifests are the task's).
        transfer: how weights move at a phase change and how ``--init`` is fitted.
        optim: optimiser and learning-rate schedule (restarted at every phase).
        train: precision, logging, validation, checkpoints, weight averaging, seeds.
        num_mel_bins: mel bins of the fbank (128 in AST / SSAST).
        coarse: derive the coarse-to-fine schedule from this (full-resolution) recipe (``--coarse``).
        description: one line on the recipe.
    """

    task: TaskConfig
    phases: list[PhaseConfig]
    init: str = "none"
    expected_init: Literal["any", "none", "imagenet", "audio"] = "any"
    model: ModelSpec = field(default_factory=ModelSpec)
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    transfer: InitTransferConfig = field(default_factory=InitTransferConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    num_mel_bins: int = 128
    coarse: CoarseConfig | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("phases: at least one phase is needed")
        for i, phase in enumerate(self.phases):
            if phase.iteration_based:
                raise ValueError(f"phases.{i}.steps: fine-tuning phases are epoch-based; give epochs")
        start, last = self.train.weight_average_from, self.phases[-1].epochs
        if start is not None and start > last:
            raise ValueError(f"train.weight_average_from: epoch {start} is after the final phase's last epoch ({last})")
        top = self.train.weight_average_top
        if top is not None and top > last - (start or 1) + 1:
            raise ValueError(f"train.weight_average_top: {top} epochs, but the final phase averages only "
                             f"{last - (start or 1) + 1} (epochs {start or 1}-{last})")
        if self.data.train or self.data.valid:
            raise ValueError("data.train / data.valid: fine-tuning takes its manifests from the task section")
        if self.model.arch == "htsat" and self.augment.noise:
            raise ValueError("augment.noise: SSAST's fbank noise belongs to the AST family (model.arch: ast); HTS-AT "
                             "has none: --set augment.noise=false, or HTS-AT's published recipe (--set defaults=auto "
                             "with an HTS-AT init, recipes/htsat_*.yaml)")
        check_schedule(self.phases, self.train.stop_when_surpassing, True, self.train.weight_average_from)

    def audio(self, num_mel_bins: int | None = None) -> AudioConfig:
        return AudioConfig(num_mel_bins=num_mel_bins or self.num_mel_bins, target_frames=self.task.target_frames,
                           norm=self.task.norm)


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
    if "task" in data:
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
    known = {f.name for f in dataclasses.fields(TaskConfig) if f.init} | ({"epochs"} if "task" not in data else set())
    typo = sorted((k for k in fields if k not in known), key=str)
    if typo:
        where = "task." if "task" in data else ""
        also = "" if "task" in data else f"; beside them: epochs and the recipe sections {', '.join(RECIPE_SECTIONS)}"
        raise RecipeError(f"{where}{typo[0]}: unknown key in {path} (task fields: {', '.join(sorted(known - {'epochs'}))}"
                          f"{also})")
    unknown = sorted(set(sections) - set(RECIPE_SECTIONS) - {"epochs"})
    if unknown:
        raise RecipeError(f"{unknown[0]}: unknown key in {path} (task fields go under task:; recipe sections are "
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
    if o.schedule == "plateau":
        return f"plateau schedule (x{o.decay:g} after more than {o.patience} epochs without improvement)"
    if o.schedule == "multistep":
        every = "every epoch" if o.decay_every == 1 else f"every {o.decay_every} epochs"
        return f"multistep schedule (x{o.decay:g} {every} from epoch {o.decay_start})"
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


def _apply_task_file_defaults(recipe: FinetuneRecipe, data: dict, notes: list[str] | None, stated: dict,
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
        batch = recipe.phases[0].batch_size or recipe.data.batch_size  # the global batch: clips per step
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


def _task_file_data(task: str, data: dict, overrides: Sequence[str], init_weights,
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
    followed = choose(choice, fields.get("metric") == "mAP", frames, family, fields.get("name", task), balanced)
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


def load_recipe(task: str, recipe_path: str | Path | None = None, overrides: Sequence[str] = (),
                init: str = "none", data_root: str | None = None, notes: list[str] | None = None,
                coarse: str | None = None, init_weights=None, planning: bool = False) -> FinetuneRecipe:
    """Assemble and validate the recipe of a fine-tuning run.

    Args:
        task: a registered task name or a task YAML file.
        recipe_path: a recipe file overriding the task's defaults (e.g. a coarse-to-fine schedule).
        overrides: ``key=value`` strings (``--set``).
        init: what the encoder starts from.
        data_root: folder the task's relative manifest paths are under.
        notes: if given, receives lines saying which defaults a task file relies on.
        coarse: ``METHOD:C[:SHARE]`` (``--coarse``; or the recipe's ``coarse`` section): derive a
            coarse-to-fine schedule from the full-resolution recipe (``common.phases.coarse``).
        init_weights: ``init`` loaded (``common.phases.init.load_init``), whose family picks a task file's
            defaults; loaded here when needed and not given.
        planning: for a plan (``--dry-run``): a task file's init that does not exist yet is planned as a start
            from scratch.
    """
    fields, defaults = task_source(task)
    given = {}
    if recipe_path is not None:
        given = load_yaml(recipe_path)
        other = sorted(k for k in given if k in ("audio", "ssast", "baseline"))
        if other:
            raise RecipeError(f"{recipe_path} is a pretraining recipe (its {other[0]}: section is pretraining's); run "
                              f"it with pretrain/run.py --recipe {recipe_path}")
        if "task" in given and not isinstance(given["task"], dict):
            raise RecipeError(f"task: expected a mapping of task fields (e.g. task: {{valid: [...]}}), got "
                              f"{given['task']!r} (in {recipe_path}); the task itself is --task's")

    def assembled(own: dict) -> dict:  # the task's fields and the init over ``own`` defaults and the --recipe file
        data = merge(dict(own), given)
        data["task"] = merge(fields, data.get("task", {}) if isinstance(data.get("task"), dict) else {})
        if data_root:
            data["task"]["data_root"] = data_root
        data["init"] = init
        return data

    data = assembled(defaults)
    task_file = is_task_file(task)
    applied = apply_overrides(data, overrides)
    if not task_file and applied.get("defaults") is not None:
        # a registered task follows its own published recipe (finetune/tasks.py) unless defaults: names another
        # (or auto: the one closest to the init, as for a task file): its own defaults give way to that recipe's,
        # but for its data section (the batch: a published recipe leaves it to the task, as to a task file)
        data, task_file = assembled({k: v for k, v in defaults.items() if k == "data"}), True
        applied = apply_overrides(data, overrides)
    _check_sections(applied)
    if task_file:
        data, stated, followed, said = _task_file_data(task, data, overrides, init_weights, planning)
    else:
        data = applied
        data.pop("defaults", None)  # `--set defaults=null`: the task's own recipe, as without it
    name = baseline_name(recipe_path) if recipe_path is not None else f"{data['task'].get('name', task)}-baseline"
    full, (data, derived) = data, apply_coarse(data, name, coarse)
    try:
        recipe = build_derived(FinetuneRecipe, data, derived)
    except RecipeError as err:  # the key named, and where its value was written: --set, --recipe, the task file
        files = [*(recipe_files(recipe_path) if recipe_path is not None else []),
                 *([(task, {**defaults, "task": fields})] if is_task_file(task) else [])]  # what the task file says
        raise with_source(err, overrides, files) from None
    if task_file:
        recipe = _apply_task_file_defaults(recipe, full, notes, stated, followed, said,
                                           "task file" if is_task_file(task) else "task")
    return recipe


def _check_sections(data: dict) -> None:
    """What a fine-tuning recipe cannot say, with ``--set`` applied: a task that is not a mapping of its fields, or
    ``data.balanced: true`` (the task says how it is sampled: ``task.balanced``; the ``false`` of a run's resolved
    recipe.yaml, the default, says nothing)."""
    if not isinstance(data.get("task"), dict):
        raise RecipeError(f"task: expected a mapping of the task's fields (e.g. --set task.valid=[...]), got "
                          f"{data.get('task')!r}")
    if isinstance(data.get("data"), dict) and data["data"].get("balanced") not in (None, False):
        raise RecipeError("data.balanced: a fine-tuning run samples as its task says; set task.balanced instead")


def check_batch_fits(recipe: FinetuneRecipe) -> None:
    """Every phase's step (its global batch) has the clips of a step in every training split (each fold's), in a
    plan too: the run would stop at its first epoch with no whole batch. Splits whose manifests are missing or
    cannot be counted are left to :func:`file_checks`.

    Raises:
        RecipeError: naming the batch key, the step's clips and the split's.
    """
    sizes = [(phase.batch_size or recipe.data.batch_size,
              f"phases.{i}.batch_size" if phase.batch_size else "data.batch_size")
             for i, phase in enumerate(recipe.phases)]
    batch, key = max(sizes)
    splits = recipe.task.fold_splits()
    for k, (train, _) in enumerate(splits):
        try:
            clips = count_clips(train)
        except (OSError, EOFError, ValueError):
            return  # missing or broken manifests: file_checks reports them
        if clips < batch:
            fold = f" (fold {k + 1}'s)" if len(splits) > 1 else ""
            raise RecipeError(f"{key}: a step takes {batch} clips, but the training set{fold} of {recipe.task.name} "
                              f"has {clips}; set a smaller {key}")


def file_checks(recipe: FinetuneRecipe) -> list:
    """One check per file a fine-tuning run reads (class list, manifests, statistics); each raises a
    ``RecipeError`` naming the task key (``task.classes``, ``task.valid.0``, ``task.norm``, ...)."""
    return task_checks(recipe.task)


def task_checks(task: TaskConfig) -> list:
    """:func:`file_checks` of a task alone (the linear probe checks every task of a suite before the first's
    features)."""
    checks = [lambda: check_classes(task.path(task.classes), "task.classes")]
    single_label = task.metric == "acc" or task.loss == "ce"
    for key in ("train", "valid", "test", "folds"):
        for i, manifest in enumerate(getattr(task, key)):
            checks.append(lambda m=manifest, k=f"task.{key}.{i}": check_manifest(task.path(m), k))
            # after check_manifest: an unreadable manifest is reported as such first
            checks.append(lambda m=manifest, k=f"task.{key}.{i}": check_labels(
                task.path(m), k, task.path(task.classes), single_label))
    checks.append(lambda: check_norm(task.norm, "task.norm"))
    return checks


def check_files(recipe: FinetuneRecipe) -> None:
    """The files a fine-tuning run reads, before any compute (:func:`file_checks`).

    Raises:
        RecipeError: naming the task key of the first file that is missing or unreadable.
    """
    for check in file_checks(recipe):
        check()
