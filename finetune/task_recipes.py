"""The published recipe a user's task file starts from.

A registered task (``finetune.tasks``) carries its published recipe; a task file gets, for what it leaves
out, the published recipe closest to it (``defaults: auto``, the default), chosen from what the file says:

- multi-label (``metric: mAP``): the AudioSet-20K recipe, the one published fine-tuning on a small
  multi-label set; with balanced sampling (``balanced: true``, which AST uses for AudioSet-2M alone) AST's
  AudioSet-2M recipe (5 epochs at lr 1e-5, halved every epoch from the 2nd, weight averaging from the 1st: 25
  epochs of the 20K recipe over two million clips would be five times its compute);
- single-label: the SpeechCommands recipe (128-frame clips) for clips shorter than 256 frames (2.56 s, the
  geometric middle of 128 and 512), the ESC-50 recipe (512 frames) otherwise;
- the init's family (``common.phases.init.init_family``) picks whose: SSAST's recipes for SSAST-pretrained
  weights; AST's for ImageNet weights, and for a model from scratch (AST's model: no recipe trains it from
  scratch, ImageNet is the nearest published start); AST's recipes with its AudioSet-pretrained ESC-50
  learning rate (1e-5) for weights already trained on labelled audio; HTS-AT's AudioSet / ESC-50 recipes
  for HTS-AT (``model.arch: htsat`` with them).

What the recipe gives, unless the task file, ``--recipe`` or ``--set`` states it: its epochs, optimiser,
learning rate and schedule, warm-up (none where the recipe has none; the task file's warm-up rule,
``finetune.task_file.auto_warmup``, where it warms up), augmentation, weight averaging and loss. SpecAugment's
time mask is scaled to the clip length against the recipe's (ESC-50's 96 of 512 frames -> 56 of 300), so
that the same share of the clip is masked; the frequency mask (128 mel bins in every recipe) and SSAST's
noise roll (10 frames in the 128- and the 512-frame recipes alike: a fixed stretch of audio) are kept.
HTS-AT's input is its fixed 10 s image, so nothing is scaled for it. With fewer (or more) epochs than the
recipe, weight averaging covers the same share of the final phase. The recipe's batch is not taken:
``data.batch_size`` (the global batch) is the task file's, or the package's 24 clips per step.

``defaults: package`` in a task file keeps the package's bare defaults (Adam at 1e-4 with a plateau
schedule, no augmentation, 10 epochs); ``defaults: NAME`` follows one recipe of :data:`RECIPES`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from common.config.recipe import RecipeError

__all__ = ["PublishedRecipe", "RECIPES", "AUTO", "PACKAGE", "PACKAGE_EPOCHS", "SHORT_CLIP_FRAMES", "closest",
           "choose", "recipe_defaults", "fit_averaging"]

AUTO, PACKAGE = "auto", "package"
PACKAGE_EPOCHS = 10  # the bare defaults' length (defaults: package)
SHORT_CLIP_FRAMES = 256  # below it a single-label task follows the SpeechCommands recipe


@dataclass(frozen=True)
class PublishedRecipe:
    """A published fine-tuning recipe as task-file defaults.

    Args:
        title: whose recipe, on which task (``SSAST ESC-50``).
        multi_label: whether it trains a multi-label task.
        frames: its clip length (10 ms frames), which SpecAugment's time mask is relative to; None: HTS-AT's
            fixed input.
        init: what it starts from (a value of ``common.phases.init.INIT_FAMILIES``).
        loss: its loss, for a task file that does not say.
        sections: the recipe sections it sets (``phases``, ``augment``, ``optim``, ``train``, ...); without
            ``optim.warmup_steps`` it warms up (the task file's rule).
    """

    title: str
    multi_label: bool
    frames: int | None
    init: str
    loss: str
    sections: dict

    def describe(self) -> str:
        clips = "HTS-AT's 10 s input" if self.frames is None else f"{self.frames}-frame clips"
        return f"{self.title} recipe ({'multi' if self.multi_label else 'single'}-label, {clips}, {self.init})"


def _phases(epochs: int) -> list[dict]:
    return [{"compression": "none", "epochs": epochs}]


def _multistep(lr: float, start: int, every: int, decay: float, warmup: bool) -> dict:
    optim = {"lr": lr, "schedule": "multistep", "decay_start": start, "decay_every": every, "decay": decay}
    return optim if warmup else {**optim, "warmup_steps": 0}


_ESC50_AUG = {"freqm": 24, "timem": 96, "mixup": 0.0}
_SC_AUG = {"freqm": 48, "timem": 48, "mixup": 0.6, "noise": True}
_AS_AUG = {"freqm": 48, "timem": 192, "mixup": 0.5, "noise": False}
_HTSAT_AUDIOSET = {
    "model": {"arch": "htsat"},
    "phases": _phases(25),
    "augment": {"freqm": 8, "timem": 64, "freq_stripes": 2, "time_stripes": 2, "mixup": 1.0, "mixup_alpha": 0.5,
                "mixup_on": "spectrogram", "mixup_targets": "unmixed", "noise": False},
    "optim": {"optimizer": "adamw", "lr": 1.0e-3, "betas": [0.9, 0.999], "weight_decay": 0.05, "warmup_steps": 0,
              "schedule": "piecewise",
              "piecewise": [[0, 0.02], [1, 0.05], [2, 0.1], [11, 0.05], [21, 0.02], [31, 0.03]],
              "grad_clip": 1.0},
    "train": {"weight_average_from": None, "weight_average_top": 15},
}

# name -> the recipe (the registered tasks hold the same values: finetune/tasks.py, recipes/htsat_*.yaml)
RECIPES: dict[str, PublishedRecipe] = {
    "ssast_esc50": PublishedRecipe(
        "SSAST ESC-50", False, 512, "SSAST-pretrained init", "ce",
        {"phases": _phases(50), "augment": {**_ESC50_AUG, "noise": True},
         "optim": _multistep(1.0e-4, 6, 1, 0.85, warmup=False)}),
    "ssast_speechcommands": PublishedRecipe(
        "SSAST SpeechCommands", False, 128, "SSAST-pretrained init", "bce",
        {"phases": _phases(30), "augment": dict(_SC_AUG), "optim": _multistep(2.5e-4, 5, 1, 0.85, warmup=True)}),
    "ssast_audioset20k": PublishedRecipe(
        "SSAST AudioSet-20K", True, 1024, "SSAST-pretrained init", "bce",
        {"phases": _phases(25), "augment": dict(_AS_AUG), "optim": _multistep(5.0e-5, 10, 5, 0.5, warmup=False),
         "train": {"weight_average_from": 6}}),
    "ast_esc50": PublishedRecipe(
        "AST ESC-50", False, 512, "ImageNet init", "ce",
        {"phases": _phases(25), "augment": {**_ESC50_AUG, "noise": False},
         "optim": _multistep(1.0e-4, 5, 1, 0.85, warmup=False)}),
    "ast_esc50_audioset": PublishedRecipe(
        "AST ESC-50", False, 512, "supervised audio init", "ce",
        {"phases": _phases(25), "augment": {**_ESC50_AUG, "noise": False},
         "optim": _multistep(1.0e-5, 5, 1, 0.85, warmup=False)}),
    "ast_speechcommands": PublishedRecipe(
        "AST SpeechCommands", False, 128, "ImageNet init", "bce",
        {"phases": _phases(30), "augment": dict(_SC_AUG), "optim": _multistep(2.5e-4, 5, 1, 0.85, warmup=False)}),
    "ast_audioset20k": PublishedRecipe(
        "AST AudioSet-20K", True, 1024, "ImageNet init", "bce",
        {"phases": _phases(25), "augment": dict(_AS_AUG), "optim": _multistep(5.0e-5, 10, 5, 0.5, warmup=True),
         "train": {"weight_average_from": 6}}),
    "ast_audioset2m": PublishedRecipe(
        "AST AudioSet-2M", True, 1024, "ImageNet init", "bce",
        {"phases": _phases(5), "augment": dict(_AS_AUG), "optim": _multistep(1.0e-5, 2, 1, 0.5, warmup=True),
         "train": {"weight_average_from": 1}}),
    "htsat_audioset": PublishedRecipe("HTS-AT AudioSet", True, None, "HTS-AT", "bce", _HTSAT_AUDIOSET),
    "htsat_esc50": PublishedRecipe(
        "HTS-AT ESC-50", False, None, "HTS-AT", "ce",
        {**_HTSAT_AUDIOSET, "phases": _phases(100), "data": {"pad": "repeat"},
         "augment": {**_HTSAT_AUDIOSET["augment"], "mixup": 0.0},
         "train": {"weight_average_from": None, "weight_average_top": None}}),
}


def closest(multi_label: bool, frames: int, family: str, balanced: bool = False) -> str:
    """The name of the published recipe closest to a task.

    Args:
        multi_label: the task's metric is mAP.
        frames: the task's clip length (``target_frames``).
        family: the init's family (``common.phases.init.init_family``).
        balanced: the task samples its clips balanced (AST's AudioSet-2M).
    """
    if family == "htsat":
        return "htsat_audioset" if multi_label else "htsat_esc50"
    whose = "ssast" if family == "ssast" else "ast"
    if multi_label:
        return "ast_audioset2m" if balanced else f"{whose}_audioset20k"
    if frames < SHORT_CLIP_FRAMES:
        return f"{whose}_speechcommands"
    return "ast_esc50_audioset" if family == "ast" else f"{whose}_esc50"


def choose(choice, multi_label: bool, frames: int, family: str, balanced: bool = False) -> str:
    """``defaults:`` as written (None: ``auto``) -> ``package`` or a name of :data:`RECIPES`.

    Raises:
        RecipeError: naming ``defaults`` for an unknown choice; where its value was written (a task file,
            ``--recipe``, ``--set``) is the caller's to add (``finetune.recipe.load_recipe``:
            ``common.config.recipe.with_source``), as for every other key.
    """
    if choice is None or choice == AUTO:
        return closest(multi_label, frames, family, balanced)
    if choice == PACKAGE or choice in RECIPES:
        return choice
    raise RecipeError(f"defaults: expected {AUTO} (the published recipe closest to the task), {PACKAGE} (the "
                      f"package's bare defaults) or one of {', '.join(RECIPES)}; got {choice!r}")


def _last_share(value: int, epochs: int, total: int) -> int:
    """Weight averaging from epoch ``value`` of ``total``, moved to cover the same share of ``epochs``."""
    return max(1, epochs - round((total - value + 1) * epochs / total) + 1)


def recipe_defaults(name: str, target_frames: int, stated: dict) -> tuple[dict, list[str]]:
    """The sections recipe ``name`` puts under a task file, and what was scaled to the task.

    Args:
        name: a key of :data:`RECIPES`.
        target_frames: the task's clip length.
        stated: the recipe data the task file, ``--recipe`` and ``--set`` state (it goes on top).

    Returns:
        ``(sections, scaled)``: recipe data, ``task.loss`` included; ``scaled`` says what was fitted to the
        task (``SpecAugment time mask 96 -> 56 for 300 frames``).
    """
    recipe = RECIPES[name]
    sections = copy.deepcopy(recipe.sections)
    sections["task"] = {"loss": recipe.loss}
    scaled = []
    optim = stated.get("optim") if isinstance(stated.get("optim"), dict) else {}
    if optim.get("schedule", "piecewise") != "piecewise":  # another schedule stated: the recipe's table is not its
        sections["optim"].pop("piecewise", None)
    augment = stated.get("augment") if isinstance(stated.get("augment"), dict) else {}
    timem = sections["augment"].get("timem", 0)
    if recipe.frames is not None and timem and "timem" not in augment and target_frames != recipe.frames:
        sections["augment"]["timem"] = max(1, round(timem * target_frames / recipe.frames))
        scaled.append(f"SpecAugment time mask {timem} -> {sections['augment']['timem']} for {target_frames} frames")
    return sections, scaled


def fit_averaging(name: str, data: dict, stated: dict) -> list[str]:
    """Move recipe ``name``'s weight averaging in ``data`` (the merged recipe data) to the final phase's
    epochs where they differ from the recipe's, unless ``stated`` gives it; says what moved."""
    averaging = RECIPES[name].sections.get("train", {})
    if not isinstance(data.get("train"), dict):  # `train: null` or a scalar: the recipe's build says what is wrong
        return []
    train = stated.get("train") if isinstance(stated.get("train"), dict) else {}
    phases = data.get("phases")
    last = phases[-1] if isinstance(phases, list) and phases and isinstance(phases[-1], dict) else {}
    epochs, total = last.get("epochs"), RECIPES[name].sections["phases"][-1]["epochs"]
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1 or epochs == total:
        return []
    said = []
    start, top = averaging.get("weight_average_from"), averaging.get("weight_average_top")
    if start is not None and "weight_average_from" not in train:
        data["train"]["weight_average_from"] = _last_share(start, epochs, total)
        said.append(f"weight averaging from epoch {start} of {total} -> {data['train']['weight_average_from']} "
                    f"of {epochs}")
    if top is not None and "weight_average_top" not in train:
        data["train"]["weight_average_top"] = max(1, min(epochs, round(top * epochs / total)))
        said.append(f"weight average of the best {top} of {total} epochs -> {data['train']['weight_average_top']} "
                    f"of {epochs}")
    return said
