"""The fine-tuning recipe: the task, the phases (epoch-based) and the training settings.

Values come, from lowest to highest precedence, from the dataclass defaults, the task's default recipe
(``finetune/tasks.py``; for a task file the published recipe closest to it, ``finetune.task_recipes``),
the ``--recipe`` file and ``--set`` overrides. Without a recipe file a task trains its published baseline
recipe at full resolution; a coarse-to-fine recipe (``recipes/ft_*.yaml``) replaces the ``phases``;
``coarse`` (or ``--coarse``) derives a coarse-to-fine schedule from the full-resolution recipe
(``common.phases.coarse``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from common.audio.pipeline import AudioConfig
from common.config.recipe import RecipeError, apply_overrides, load_yaml, merge, recipe_file, recipe_files, with_source
from common.data.config import DataConfig
from common.data.preflight import check_classes, check_labels, check_manifest, check_norm, count_clips
from common.models.spec import ModelSpec
from common.phases.coarse import CoarseConfig, apply_coarse, baseline_name, build_derived
from common.phases.config import PhaseConfig
from common.phases.init import InitTransferConfig
from common.phases.until import check_schedule
from common.training.batch import split_batch
from common.training.optim import OptimConfig
from common.training.spec import TrainConfig
from finetune.classifier import AugmentConfig, HeadConfig
from finetune.task_file import apply_task_file_defaults, is_task_file, task_file_data, task_source
from finetune.tasks import TaskConfig

__all__ = ["FinetuneRecipe", "load_recipe", "file_checks", "check_files", "check_batch_fits", "task_checks"]

LEFT_OUT = 0.1  # the share of a training set an epoch may leave out (its last, partial step) without a warning


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
        recipe_path = recipe_file(recipe_path)  # a name of the package's recipes too
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
    # what the task file says, for where a key's value was written: --set, --recipe, the task file
    files = [*(recipe_files(recipe_path) if recipe_path is not None else []),
             *([(task, {**defaults, "task": fields})] if is_task_file(task) else [])]
    if task_file:
        try:
            data, stated, followed, said = task_file_data(task, data, overrides, init_weights, planning)
        except RecipeError as err:  # defaults: an unknown choice
            raise with_source(err, overrides, files) from None
    else:
        data = applied
        data.pop("defaults", None)  # `--set defaults=null`: the task's own recipe, as without it
    name = baseline_name(recipe_path) if recipe_path is not None else f"{data['task'].get('name', task)}-baseline"
    full, (data, derived) = data, apply_coarse(data, name, coarse)
    try:
        recipe = build_derived(FinetuneRecipe, data, derived)
    except RecipeError as err:  # the key named, and where its value was written
        raise with_source(err, overrides, files) from None
    if task_file:
        recipe = apply_task_file_defaults(recipe, full, notes, stated, followed, said,
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


def _splits(batch: int, world_size: int, recipe: FinetuneRecipe) -> bool:
    """Whether a global batch of ``batch`` clips splits over ``world_size`` ranks as the recipe's would."""
    try:
        split_batch(batch, world_size, recipe.optim.grad_accum, recipe.data.max_batch_per_rank)
    except RecipeError:
        return False
    return True


def check_batch_fits(recipe: FinetuneRecipe, world_size: int = 1) -> list[str]:
    """Every phase's step (its global batch) has the clips of a step in every training split (each fold's), in a
    plan too: the run would stop at its first epoch with no whole batch. Returns a caution where an epoch's last,
    partial step leaves out more than :data:`LEFT_OUT` of the clips (a small set at a large batch). Splits whose
    manifests are missing or cannot be counted are left to :func:`file_checks`. The batch a caution suggests
    instead splits over ``world_size`` ranks.

    Raises:
        RecipeError: naming the batch key, the step's clips and the split's.
    """
    sizes = [(phase.batch_size_or(recipe.data.batch_size),
              f"phases.{i}.batch_size" if phase.batch_size else "data.batch_size")
             for i, phase in enumerate(recipe.phases)]
    batch, key = max(sizes)
    splits, cautions = recipe.task.fold_splits(), []
    for k, (train, _) in enumerate(splits):
        try:
            clips = count_clips(train)
        except (OSError, EOFError, ValueError):
            return cautions  # missing or broken manifests: file_checks reports them
        fold = f" (fold {k + 1}'s)" if len(splits) > 1 else ""
        if clips < batch:
            raise RecipeError(f"{key}: a step takes {batch} clips, but the training set{fold} of {recipe.task.name} "
                              f"has {clips}; set a smaller {key}")
        if recipe.task.balanced:  # drawn with replacement: an epoch is a number of draws, none left over
            continue
        for size, size_key in sorted(set(sizes)):
            left = clips % size
            if left > LEFT_OUT * clips:  # an epoch ends with its last whole step (drop_last)
                better = next((b for b in range(size, 0, -1) if clips % b <= LEFT_OUT * clips
                               and _splits(b, world_size, recipe)), None)
                cautions.append(f"{size_key}: a step takes {size} clips of the {clips} in the training set{fold} of "
                                f"{recipe.task.name}: {left} ({100 * left / clips:.0f}%) are left out of every epoch "
                                f"(other clips each epoch: the shuffle's last)" +
                                (f"; {size_key}={better} would leave out {clips % better}" if better else ""))
    return cautions


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
