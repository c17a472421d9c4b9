"""The pretraining recipe: every section typed and checked before any compute.

A recipe file (YAML) has the sections ``model``, ``audio``, ``data``, ``phases``, ``transfer``, ``optim``,
``train``, ``ssast`` and optionally ``baseline`` (the path of the recipe whose FLOPs the ledger compares
against, relative to this file) or ``coarse`` (derive the phases from this full-resolution recipe, which is
then the baseline: ``common.phases.coarse``). See ``recipes/ssast_fshift4.yaml`` for a commented example.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from common.audio.pipeline import AudioConfig
from common.config.recipe import (
    RecipeError,
    apply_overrides,
    load_yaml,
    recipe_file,
    recipe_files,
    shipped_recipe,
    with_source,
)
from common.data.config import DataConfig
from common.models.arch import architecture_for, geometries
from common.models.ast.encoder import EncoderConfig
from common.models.spec import ModelSpec
from common.phases.coarse import CoarseConfig, apply_coarse, baseline_name, build_derived
from common.phases.config import PhaseConfig
from common.phases.init import InitTransferConfig
from common.phases.until import check_schedule
from common.training.optim import OptimConfig
from common.training.spec import TrainConfig
from pretrain.masking import mask_count
from pretrain.ssast import SSASTConfig

__all__ = ["PretrainRecipe", "load_recipe", "load_baseline", "shared_with_baseline"]

# --set keys that change what one training step computes (model and input geometry, the global batch and
# its split, the pretext task): applied to the baseline recipe as well, so that the planned saving compares
# like with like. Other keys (phases, optimiser schedule, data files, logging) belong to this run only.
BASELINE_SHARED = ("model", "audio", "ssast", "data.batch_size", "data.max_batch_per_rank", "optim.grad_accum")


@dataclass(frozen=True)
class PretrainRecipe:
    """An SSAST pretraining run's recipe (``recipes/ssast_*.yaml``).

    Args:
        phases: the schedule, compressed phases first (iteration-based: ``steps``).
        model: the encoder (architecture, size, patches).
        audio: the front end (fbank, clip length, normalisation).
        data: the manifests to pretrain on and validate with, the batch, the loader.
        transfer: how weights move at a phase change and how an ``--init`` is fitted.
        optim: optimiser and learning-rate schedule (restarted at every phase).
        train: precision, logging, validation, checkpoints, seeds.
        ssast: the masked-patch pretext tasks.
        baseline: the full-resolution recipe whose planned FLOPs the saving is measured against (a path, next
            to this recipe or from here; null: none).
        coarse: derive the coarse-to-fine schedule from this (full-resolution) recipe (``--coarse``).
        description: one line on the recipe.
    """

    phases: list[PhaseConfig]
    model: ModelSpec = field(default_factory=ModelSpec)
    audio: AudioConfig = field(default_factory=AudioConfig)
    data: DataConfig = field(default_factory=DataConfig)
    transfer: InitTransferConfig = field(default_factory=InitTransferConfig)  # init_pos_embed: for --init
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ssast: SSASTConfig = field(default_factory=SSASTConfig)
    baseline: str | None = None
    coarse: CoarseConfig | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.model.arch != "ast":
            raise ValueError("model.arch: SSAST masked-patch pretraining is defined for ViT encoders (model.arch: ast)")
        if not self.data.train:
            raise ValueError("data.train: at least one training manifest is needed")
        if self.model.stride is not None and tuple(self.model.stride) != tuple(self.model.patch):
            raise ValueError("model.stride: SSAST pretraining uses non-overlapping patches (stride = patch)")
        for i, phase in enumerate(self.phases):
            if not phase.iteration_based:
                raise ValueError(f"phases.{i}.epochs: pretraining phases are iteration-based; give steps")
        for i, cfg in enumerate(self.encoder_configs()):
            for key, ratio in (("mask_ratio", self.ssast.mask_ratio), ("eval_mask_ratio", self.ssast.eval_ratio)):
                try:
                    mask_count(cfg.num_patches, ratio)
                except ValueError as err:
                    raise ValueError(f"ssast.{key}: {err} (phases.{i})") from None
        if self.coarse is not None and self.baseline is not None:
            raise ValueError(f"baseline: a recipe derived by coarse is compared with the recipe it came from; this "
                             f"one also names {self.baseline} (set baseline: null)")
        check_schedule(self.phases, self.train.stop_when_surpassing, bool(self.data.valid),
                       eval_every=self.train.eval_every)

    @property
    def base(self) -> EncoderConfig:
        """The full-resolution encoder geometry."""
        return self.model.encoder_config(self.audio.num_mel_bins, self.audio.target_frames)

    def encoder_configs(self) -> list[EncoderConfig]:
        """The encoder geometry of every phase (``ValueError`` naming the phase if one is impossible)."""
        return geometries(architecture_for(self.base, self.audio), self.phases)


def load_recipe(path: str | Path, overrides: Sequence[str] = (), coarse: str | None = None) -> PretrainRecipe:
    """Read, override (``key=value``) and validate a pretraining recipe; ``coarse`` (``METHOD:C[:SHARE]``,
    or the recipe's ``coarse`` section) derives a coarse-to-fine schedule from it (``common.phases.coarse``);
    ``path`` may name one of the package's recipes (``common.config.recipe.recipe_file``)."""
    path = recipe_file(path)
    given = load_yaml(path)
    other = sorted(k for k in given if k in ("task", "head", "augment", "expected_init", "init", "num_mel_bins"))
    if other or "data" not in given and not any(item.strip().startswith("data") for item in overrides):
        why = f"its {other[0]}: section is fine-tuning's" if other else "it names no data to pretrain on"
        raise RecipeError(f"{path} reads as a fine-tuning recipe ({why}); run it with finetune/run.py --task NAME "
                          f"--recipe {path}, or give a pretraining recipe its data.train manifests")
    data, derived = apply_coarse(apply_overrides(given, overrides), baseline_name(path), coarse)
    try:
        recipe = build_derived(PretrainRecipe, data, derived)
    except RecipeError as err:  # the key named, and where its value was written
        raise with_source(err, overrides, recipe_files(path)) from None
    if recipe.baseline is not None:
        baseline = Path(recipe.baseline)
        if not baseline.is_absolute() and not baseline.exists():
            baseline = path.parent / baseline
        if not baseline.is_file() and len(Path(recipe.baseline).parts) == 1:  # a user's copy of a shipped recipe
            baseline = shipped_recipe(recipe.baseline) or baseline  # names the package's baseline of that name
        if not baseline.is_file():
            raise FileNotFoundError(f"baseline: recipe {recipe.baseline} not found (next to {path} or here)")
        recipe = replace(recipe, baseline=str(baseline.resolve()))  # one spelling: the run's recipe.yaml holds it
    return recipe


def shared_with_baseline(overrides: Sequence[str]) -> list[str]:
    """The ``--set`` overrides that apply to the baseline recipe too (see ``BASELINE_SHARED``)."""
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in ("data", "optim") or any(key == k or key.startswith(k + ".") for k in BASELINE_SHARED):
            out.append(item)
    return out


def load_baseline(recipe: PretrainRecipe, overrides: Sequence[str] = ()) -> PretrainRecipe | None:
    """The recipe's ``baseline`` with the geometry and batch overrides of this run applied, or None.

    Raises:
        RecipeError: the baseline recipe (named in the message) is broken, or an override does not apply.
    """
    if recipe.baseline is None:
        return None
    try:
        return load_recipe(recipe.baseline, shared_with_baseline(overrides))
    except (RecipeError, FileNotFoundError) as err:
        raise RecipeError(f"baseline: recipe {recipe.baseline}: {err}") from None
