"""Downstream tasks: their manifests, classes, clip length, statistics, loss, metric and default recipe.

``--task NAME`` picks a registered task; ``--task my_task.yaml`` reads a user task (the ``task:`` fields
below, e.g. the manifests of a ``custom`` corpus). Manifest and class-list paths are relative to
``data_root`` (default ``data``), where ``python -m common.data.corpora prepare NAME --out data/NAME`` puts them.

Default recipes follow the published AST / SSAST recipes (SSAST's
``src/finetune`` run scripts, AST's ``egs/*`` run scripts); a task file's
defaults follow the closest of them (``finetune.task_recipes``). The paper's own
setup (section 3.2) differs for VGGSound, VoxCeleb and Kinetics-Sounds: 20 epochs, "the setup of the
AudioSet training" (AST's full-AudioSet learning rate, batch, SpecAugment and epoch-wise decay), no mixup
and no weight averaging; and non-overlapping patches everywhere. Its coarse-to-fine recipes are in
``recipes/ft_*.yaml``.

Losses and statistics of those three follow the authors' FlexiAST recipes where they exist: VGGSound
BCE with its own statistics (``egs/vggsound``), VoxCeleb cross-entropy with mean -3.7614744 / std
4.2011642 (``egs/voxceleb``). Kinetics-Sounds has no published recipe: it takes the AudioSet setup the
paper names, so BCE (as VGGSound, the other set the authors ran that way) with the AudioSet statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.audio.fbank import check_norm_name
from common.system.paths import check_plain_name

__all__ = ["TaskConfig", "TASKS", "PAPER_20_EPOCHS", "task_defaults", "known_tasks"]


@dataclass(frozen=True)
class TaskConfig:
    """A fine-tuning / linear-probe task.

    Args:
        name: task name (used for run directories and reports).
        train, valid, test: manifests; ``valid`` is evaluated after every epoch, ``test`` once at the end
            with the best epoch's model (SpeechCommands' protocol).
        folds: cross-validation manifests, one per fold (ESC-50); each fold in turn is the evaluation set
            and the others the training set. Replaces ``train`` / ``valid``.
        classes: the class list (``*_classes.json`` written by the corpus preparation).
        target_frames: clip length in frames at 10 ms (1024 = 10.24 s in AST).
        norm: normalisation statistics: a name in ``common.audio.fbank.NORM_STATS`` or a stats JSON file.
        metric: ``mAP`` (multi-label) or ``acc``.
        loss: ``bce`` (sigmoid; AudioSet, and also the single-label SpeechCommands (SSAST), VGGSound
            (FlexiAST) and Kinetics-Sounds) or ``ce`` (softmax; ESC-50, VoxCeleb).
        balanced: AST's balanced sampler (AudioSet-2M).
        data_root: folder the relative manifest paths are under.
        num_classes: how many classes the task has, for planning (``--dry-run``) before the class list
            exists (a run takes its classes from the class list).
        description: one line on the task, for ``--list-tasks``.
    """

    name: str = "custom"
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    folds: list[str] = field(default_factory=list)
    classes: str = ""
    target_frames: int = 1024
    norm: str = "audioset"
    metric: Literal["mAP", "acc"] = "acc"
    loss: Literal["bce", "ce"] = "ce"
    balanced: bool = False
    data_root: str = "data"
    num_classes: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        check_plain_name(self.name, "name", "the run directory runs/finetune/<name>-... is named after it")
        if not self.classes:
            raise ValueError("classes: the class list file is required")
        if self.folds:
            if len(self.folds) < 2:
                raise ValueError("folds: cross-validation needs at least two folds")
        elif not self.train or not self.valid:
            raise ValueError("train: give train and valid manifests (or folds)")
        if self.target_frames < 16:
            raise ValueError(f"target_frames must be >= 16, got {self.target_frames}")

        check_norm_name(self.norm)

    def path(self, relative: str) -> str:
        expanded = os.path.expandvars(os.path.expanduser(relative))
        return expanded if os.path.isabs(expanded) else str(Path(self.data_root) / expanded)

    def fold_splits(self) -> list[tuple[list[str], list[str]]]:
        """``(train manifests, evaluation manifests)`` per run: one per fold, or the one split."""
        if not self.folds:
            return [([self.path(p) for p in self.train], [self.path(p) for p in self.valid])]
        paths = [self.path(p) for p in self.folds]
        return [([p for j, p in enumerate(paths) if j != i], [paths[i]]) for i in range(len(paths))]


def _as(name, metric, loss, **kw) -> dict:
    return {"name": name, "metric": metric, "loss": loss, **kw}


# The paper's baseline for VGGSound, VoxCeleb and Kinetics-Sounds: 20 epochs with AST's full-AudioSet
# setup (batch 12, lr 1e-5 halved every epoch from the 2nd, SpecAugment 48 / 192), without mixup or
# weight averaging.
PAPER_20_EPOCHS = {
    "phases": [{"compression": "none", "epochs": 20}], "data": {"batch_size": 12},
    "augment": {"freqm": 48, "timem": 192, "mixup": 0.0},
    "optim": {"lr": 1.0e-5, "warmup_steps": 1000, "schedule": "multistep", "decay_start": 2, "decay_every": 1,
              "decay": 0.5},
}

# name -> (task fields, default recipe overrides)
TASKS: dict[str, tuple[dict, dict]] = {
    "audioset": (
        _as("audioset", "mAP", "bce", train=["audioset/audioset_balanced_train.jsonl.gz",
                                             "audioset/audioset_unbalanced_train.jsonl.gz"],
            valid=["audioset/audioset_eval.jsonl.gz"], classes="audioset/audioset_classes.json",
            target_frames=1024, norm="audioset", balanced=True,
            num_classes=527, description="AudioSet-2M, 527 classes, mAP (AST: 5 epochs, balanced sampling, weight averaging)"),
        {"phases": [{"compression": "none", "epochs": 5}], "data": {"batch_size": 12},
         "augment": {"freqm": 48, "timem": 192, "mixup": 0.5},
         "optim": {"lr": 1.0e-5, "warmup_steps": 1000, "schedule": "multistep", "decay_start": 2, "decay_every": 1,
                   "decay": 0.5},
         "train": {"weight_average_from": 1}},
    ),
    "audioset20k": (
        _as("audioset20k", "mAP", "bce", train=["audioset/audioset_balanced_train.jsonl.gz"],
            valid=["audioset/audioset_eval.jsonl.gz"], classes="audioset/audioset_classes.json",
            target_frames=1024, norm="audioset",
            num_classes=527, description="AudioSet balanced (20K clips), 527 classes, mAP (SSAST: 25 epochs, WA from epoch 6)"),
        {"phases": [{"compression": "none", "epochs": 25}], "data": {"batch_size": 12},
         "augment": {"freqm": 48, "timem": 192, "mixup": 0.5},
         "optim": {"lr": 5.0e-5, "warmup_steps": 0, "schedule": "multistep", "decay_start": 10, "decay_every": 5,
                   "decay": 0.5},
         "train": {"weight_average_from": 6}},
    ),
    "vggsound": (
        _as("vggsound", "acc", "bce", train=["vggsound/vggsound_train.jsonl.gz"],
            valid=["vggsound/vggsound_test.jsonl.gz"], classes="vggsound/vggsound_classes.json",
            target_frames=1024, norm="vggsound",
            num_classes=309, description="VGGSound, 309 classes, accuracy (paper: 20 epochs; BCE and stats of the FlexiAST recipe)"),
        PAPER_20_EPOCHS,
    ),
    "voxceleb": (
        _as("voxceleb", "acc", "ce", train=["voxceleb/voxceleb_train.jsonl.gz"],
            valid=["voxceleb/voxceleb_valid.jsonl.gz"], test=["voxceleb/voxceleb_test.jsonl.gz"],
            classes="voxceleb/voxceleb_classes.json",
            target_frames=1024, norm="voxceleb",
            num_classes=1251, description="VoxCeleb1 speaker identification, 1251 speakers, accuracy (paper: 20 epochs, AST pipeline; "
                        "CE and stats of the FlexiAST recipe)"),
        PAPER_20_EPOCHS,
    ),
    "kinetics_sounds": (
        _as("kinetics_sounds", "acc", "bce", train=["kinetics_sounds/kinetics_sounds_train.jsonl.gz"],
            valid=["kinetics_sounds/kinetics_sounds_test.jsonl.gz"],
            classes="kinetics_sounds/kinetics_sounds_classes.json", target_frames=1024, norm="audioset",
            description="Kinetics-Sounds, accuracy (paper: ~20K train / 2.7K test clips, 20 epochs; BCE as the "
                        "AudioSet setup)"),
        PAPER_20_EPOCHS,
    ),
    "esc50": (
        _as("esc50", "acc", "ce", folds=[f"esc50/esc50_fold{i}.jsonl.gz" for i in range(1, 6)],
            classes="esc50/esc50_classes.json", target_frames=512, norm="esc50",
            num_classes=50, description="ESC-50, 50 classes, 5-fold cross-validation, mean accuracy (SSAST patch recipe)"),
        {"phases": [{"compression": "none", "epochs": 50}], "data": {"batch_size": 48},
         "augment": {"freqm": 24, "timem": 96, "mixup": 0.0, "noise": True},
         "optim": {"lr": 1.0e-4, "warmup_steps": 0, "schedule": "multistep", "decay_start": 6, "decay_every": 1,
                   "decay": 0.85}},
    ),
    "speechcommands": (
        _as("speechcommands", "acc", "bce", train=["speechcommands/speechcommands_train.jsonl.gz"],
            valid=["speechcommands/speechcommands_valid.jsonl.gz"],
            test=["speechcommands/speechcommands_test.jsonl.gz"],
            classes="speechcommands/speechcommands_classes.json", target_frames=128, norm="speechcommands",
            num_classes=35, description="Speech Commands V2, 35 words, accuracy (best epoch on valid, reported on test)"),
        {"phases": [{"compression": "none", "epochs": 30}], "data": {"batch_size": 128},
         "augment": {"freqm": 48, "timem": 48, "mixup": 0.6, "noise": True},
         "optim": {"lr": 2.5e-4, "warmup_steps": 1000, "schedule": "multistep", "decay_start": 5, "decay_every": 1,
                   "decay": 0.85}},
    ),
    "synth": (
        _as("synth", "acc", "ce", train=["synth/synth_train.jsonl.gz"], valid=["synth/synth_valid.jsonl.gz"],
            test=["synth/synth_test.jsonl.gz"], classes="synth/synth_classes.json", target_frames=128,
            norm="audioset", num_classes=12, description="the built-in generated corpus, 12 classes, accuracy (demo)"),
        {"phases": [{"compression": "none", "epochs": 8}], "data": {"batch_size": 24, "num_workers": 1},
         "augment": {"freqm": 12, "timem": 24, "mixup": 0.0},
         "optim": {"lr": 5.0e-4, "warmup_steps": 20, "schedule": "multistep", "decay_start": 5, "decay_every": 1,
                   "decay": 0.7}},
    ),
}


def known_tasks() -> str:
    return ", ".join(sorted(TASKS))


def task_defaults(name: str) -> tuple[dict, dict]:
    """``(task fields, default recipe overrides)`` of a registered task."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {known_tasks()} (or the path of a task YAML file)")
    fields, recipe = TASKS[name]
    return dict(fields), recipe

