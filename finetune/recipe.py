"""The fine-tuning recipe: the task, the phases (epoch-based) and the training settings.

Values come, from lowest to highest precedence, from the dataclass defaults, the task's default recipe
(``finetune/tasks.py``), the ``--recipe`` file and ``--set`` overrides. Without a recipe file a task
trains its published baseline recipe at full resolution; a coarse-to-fine recipe (``recipes/ft_*.yaml``)
replaces the ``phases``; ``coarse`` (or ``--coarse``) derives a coarse-to-fine schedule from the
full-resolution recipe (``common.coarse``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from common.coarse import CoarseConfig, apply_coarse, build_derived
from common.criteria import check_schedule
from common.data import DataConfig
from common.features import AudioConfig
from common.model import ModelSpec
from common.optim import OptimConfig
from common.phases import PhaseConfig, TransferConfig
from common.recipe import apply_overrides, load_yaml, merge
from common.trainer import TrainConfig
from finetune.classifier import AugmentConfig, HeadConfig
from finetune.tasks import TaskConfig, task_defaults

__all__ = ["FinetuneRecipe", "load_recipe", "task_source"]


@dataclass(frozen=True)
class FinetuneRecipe:
    task: TaskConfig
    phases: list[PhaseConfig]
    init: str = "none"
    model: ModelSpec = field(default_factory=ModelSpec)
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
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
        if self.data.train or self.data.valid:
            raise ValueError("data.train / data.valid: fine-tuning takes its manifests from the task section")
        check_schedule(self.phases, self.train.stop_when_surpassing, True, self.train.weight_average_from)

    def audio(self, num_mel_bins: int | None = None) -> AudioConfig:
        return AudioConfig(num_mel_bins=num_mel_bins or self.num_mel_bins, target_frames=self.task.target_frames,
                           norm=self.task.norm)


def task_source(task: str) -> tuple[dict, dict]:
    """``(task fields, default recipe)`` for a task name or a task YAML file."""
    path = Path(task)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        data = load_yaml(path)
        fields = data.pop("task", None) or data
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: expected the task's fields (name, train, valid, classes, ...)")
        fields.setdefault("name", path.stem)
        for key in ("train", "valid", "test", "folds"):  # a user's manifests are relative to the file
            if isinstance(fields.get(key), list):
                fields[key] = [p if Path(p).is_absolute() else str((path.parent / p).resolve()) for p in fields[key]]
        if fields.get("classes") and not Path(fields["classes"]).is_absolute():
            fields["classes"] = str((path.parent / fields["classes"]).resolve())
        recipe = {"phases": [{"compression": "none", "epochs": int(fields.pop("epochs", 10))}]}
        return fields, recipe
    return task_defaults(task)


def load_recipe(task: str, recipe_path: str | Path | None = None, overrides: Sequence[str] = (),
                init: str = "none", data_root: str | None = None, coarse: str | None = None) -> FinetuneRecipe:
    """Assemble and validate the recipe of a fine-tuning run; ``coarse`` (``METHOD:C[:SHARE]``, or the
    recipe's ``coarse`` section) derives a coarse-to-fine schedule from it (``common.coarse``)."""
    fields, defaults = task_source(task)
    data = dict(defaults)
    if recipe_path is not None:
        data = merge(data, load_yaml(recipe_path))
    data["task"] = merge(fields, data.get("task", {}) if isinstance(data.get("task"), dict) else {})
    if data_root:
        data["task"]["data_root"] = data_root
    data["init"] = init
    name = Path(recipe_path).stem if recipe_path is not None else f"{data['task'].get('name', task)}-baseline"
    data, derived = apply_coarse(apply_overrides(data, overrides), name, coarse)
    return build_derived(FinetuneRecipe, data, derived)
