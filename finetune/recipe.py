"""The fine-tuning recipe: the task, the phases (epoch-based) and the training settings.

Values come, from lowest to highest precedence, from the dataclass defaults, the task's default recipe
(``finetune/tasks.py``), the ``--recipe`` file and ``--set`` overrides. Without a recipe file a task
trains its published baseline recipe at full resolution; a coarse-to-fine recipe (``recipes/ft_*.yaml``)
replaces the ``phases``; ``coarse`` (or ``--coarse``) derives a coarse-to-fine schedule from the
full-resolution recipe (``common.coarse``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

from common.coarse import CoarseConfig, apply_coarse, baseline_name, build_derived
from common.criteria import check_schedule
from common.data import DataConfig
from common.features import AudioConfig
from common.frontend import NORM_STATS
from common.model import ModelSpec
from common.optim import OptimConfig
from common.phases import PhaseConfig
from common.preflight import check_classes, check_labels, check_manifest, check_norm, count_clips
from common.recipe import RecipeError, apply_overrides, load_yaml, merge
from common.run_spec import TrainConfig
from finetune.classifier import AugmentConfig, HeadConfig
from finetune.init import InitTransferConfig
from finetune.tasks import TASKS, TaskConfig, task_defaults

__all__ = ["FinetuneRecipe", "load_recipe", "task_source", "file_checks", "check_files", "auto_warmup"]


@dataclass(frozen=True)
class FinetuneRecipe:
    """A fine-tuning run's recipe. ``init`` is ``--init``; ``expected_init`` says what the recipe was written
    to start from (``any``, ``none``, ``imagenet`` or ``audio``: weights trained on audio), and a run whose
    ``--init`` is of another kind is warned that it does not start as the recipe's source did."""

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
        check_schedule(self.phases, self.train.stop_when_surpassing, True, self.train.weight_average_from)

    def audio(self, num_mel_bins: int | None = None) -> AudioConfig:
        return AudioConfig(num_mel_bins=num_mel_bins or self.num_mel_bins, target_frames=self.task.target_frames,
                           norm=self.task.norm)


# the sections of a fine-tuning recipe that a task file may hold next to its task fields
RECIPE_SECTIONS = ("phases", "model", "head", "augment", "data", "transfer", "optim", "train", "num_mel_bins")
DEFAULT_EPOCHS = 10  # a task file without epochs: or phases:
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


def task_source(task: str) -> tuple[dict, dict]:
    """``(task fields, default recipe)`` for a task name or a task YAML file.

    A task file holds the task's fields (flat, or under ``task:``) and may hold recipe sections beside
    them (``optim:``, ``model:``, ``phases:``, ...), which become its default recipe (in the flat layout
    ``train:`` is the task's manifests: the recipe's ``train:`` section needs the ``task:`` layout). ``epochs: N`` is
    short for ``phases: [{compression: none, epochs: N}]``. Paths (manifests, class list, a ``norm``
    statistics file) are relative to the file.
    """
    path = Path(task)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        return task_defaults(task)
    data = load_yaml(path)
    if "task" in data:
        fields = data.pop("task")
        if not isinstance(fields, dict):
            raise RecipeError(f"task: expected the task's fields (name, train, valid, classes, ...) in {path}")
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
    if "phases" not in recipe:
        recipe["phases"] = [{"compression": "none",
                             "epochs": DEFAULT_EPOCHS if epochs is None else _epochs(epochs, path)}]
    return fields, recipe


def auto_warmup(clips: int, batch: int) -> int:
    """A task file's warm-up: the first half of the first epoch, at most ``MAX_AUTO_WARMUP`` steps.

    Args:
        clips: training clips per epoch.
        batch: the global batch (clips per optimiser step over every rank).
    """
    steps_per_epoch = max(1, clips // max(1, batch))
    return max(1, min(MAX_AUTO_WARMUP, math.ceil(steps_per_epoch / 2)))


def _apply_task_file_defaults(recipe: FinetuneRecipe, data: dict, notes: list[str] | None) -> FinetuneRecipe:
    """Fill in what a task file leaves to the package: warm-up scaled to the data, and say which defaults apply."""
    given = {k for k in ("optim", "model", "augment", "head") if k in data}
    said = []
    optim = data.get("optim") if isinstance(data.get("optim"), dict) else {}
    try:
        clips = count_clips(recipe.task.fold_splits()[0][0])
    except (OSError, EOFError, ValueError):
        clips = None  # missing or broken manifests: check_files reports them
    if clips:
        batch = recipe.phases[0].batch_size or recipe.data.batch_size  # the global batch: clips per step
        if clips < batch:
            raise RecipeError(f"data.batch_size: a step takes {batch} clips, but the training set of "
                              f"{recipe.task.name} has {clips}; set a smaller data.batch_size")
        if "warmup_steps" not in optim:
            warmup = auto_warmup(clips, batch)
            recipe = replace(recipe, optim=replace(recipe.optim, warmup_steps=warmup))
            said.append(f"warm-up {warmup} steps (the first half of the first epoch: {clips} clips at {batch} per "
                        f"step; at most {MAX_AUTO_WARMUP})")
    o = recipe.optim
    if "optim" not in given:
        plateau = f" (x{o.decay:g} after more than {o.patience} epochs without improvement)"
        said.append(f"optimiser {o.optimizer}, lr {o.lr:g}, {o.schedule} schedule"
                    + (plateau if o.schedule == "plateau" else ""))
    if "model" not in given and recipe.init == "none":
        said.append(f"model size {recipe.model.size}, patch {recipe.model.patch[0]}x{recipe.model.patch[1]}")
    if "augment" not in given:
        said.append("no augmentation (no SpecAugment, no mixup)")
    if "head" not in given:
        said.append(f"{recipe.head.pool} pooling")
    if said and notes is not None:
        notes.append(f"task file {recipe.task.name}: package defaults: {'; '.join(said)}; set any of them in the "
                     f"task file (optim:, model:, augment:, head:) or with --set")
    return recipe


def load_recipe(task: str, recipe_path: str | Path | None = None, overrides: Sequence[str] = (),
                init: str = "none", data_root: str | None = None, notes: list[str] | None = None,
                coarse: str | None = None) -> FinetuneRecipe:
    """Assemble and validate the recipe of a fine-tuning run.

    Args:
        task: a registered task name or a task YAML file.
        recipe_path: a recipe file overriding the task's defaults (e.g. a coarse-to-fine schedule).
        overrides: ``key=value`` strings (``--set``).
        init: what the encoder starts from.
        data_root: folder the task's relative manifest paths are under.
        notes: if given, receives lines saying which package defaults a task file relies on.
        coarse: ``METHOD:C[:SHARE]`` (``--coarse``; or the recipe's ``coarse`` section): derive a
            coarse-to-fine schedule from the full-resolution recipe (``common.coarse``).
    """
    fields, defaults = task_source(task)
    data = dict(defaults)
    if recipe_path is not None:
        data = merge(data, load_yaml(recipe_path))
    data["task"] = merge(fields, data.get("task", {}) if isinstance(data.get("task"), dict) else {})
    if data_root:
        data["task"]["data_root"] = data_root
    data["init"] = init
    data = apply_overrides(data, overrides)
    name = baseline_name(recipe_path) if recipe_path is not None else f"{data['task'].get('name', task)}-baseline"
    data, derived = apply_coarse(data, name, coarse)
    recipe = build_derived(FinetuneRecipe, data, derived)
    if task not in TASKS:
        recipe = _apply_task_file_defaults(recipe, data, notes)
    return recipe


def file_checks(recipe: FinetuneRecipe) -> list:
    """One check per file a fine-tuning run reads (class list, manifests, statistics); each raises a
    ``RecipeError`` naming the task key (``task.classes``, ``task.valid.0``, ``task.norm``, ...)."""
    task = recipe.task
    checks = [lambda: check_classes(task.path(task.classes), "task.classes")]
    single_label = task.metric == "acc" or task.loss == "ce"
    for key in ("train", "valid", "test", "folds"):
        for i, manifest in enumerate(getattr(task, key)):
            checks.append(lambda m=manifest, k=f"task.{key}.{i}": check_manifest(task.path(m), k))
            if single_label:  # after check_manifest: an unreadable manifest is reported as such first
                checks.append(lambda m=manifest, k=f"task.{key}.{i}": check_labels(task.path(m), k))
    checks.append(lambda: check_norm(task.norm, "task.norm"))
    return checks


def check_files(recipe: FinetuneRecipe) -> None:
    """The files a fine-tuning run reads, before any compute (:func:`file_checks`).

    Raises:
        RecipeError: naming the task key of the first file that is missing or unreadable.
    """
    for check in file_checks(recipe):
        check()
