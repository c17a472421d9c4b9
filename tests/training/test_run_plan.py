"""The run's plan (``common.training.plan``): one function plans any recipe, for the dry run, the ledger and the
loop alike; the baseline is a plan of phases; the planned cost and the saving are counted in one place."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from common.cli import PLAN_NOT_READY
from common.phases.init import task_encoder_config
from common.system.distributed import Dist
from common.training.ledger import Ledger
from common.training.loop import Trainer
from common.training.plan import BaselinePlan, PhasePlan, RunPlan, build_plan, planned_cost
from common.training.spec import RunSpec
from finetune.classifier import AugmentConfig, ClassifierObjective
from finetune.recipe import load_recipe as finetune_recipe
from pretrain.recipe import load_recipe as pretrain_recipe
from pretrain.run import main as pretrain
from pretrain.run import plan as pretrain_plan
from pretrain.ssast import SSASTObjective

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
CPU = Dist(0, 1, 0, torch.device("cpu"))


def _spec(run_dir, recipe, base, audio, data=None) -> RunSpec:
    return RunSpec(run_dir=run_dir, base=base, audio=audio, phases=recipe.phases, transfer=recipe.transfer,
                   optim=recipe.optim, train=recipe.train, data=data or recipe.data)


def _loop_plan(tmp_path, recipe, objective, base, audio, plan=None) -> RunPlan:
    trainer = Trainer(_spec(tmp_path, recipe, base, audio), objective, CPU, plan)
    trainer.scalars.close()
    return trainer.plan


def test_a_pretraining_recipe_plans_the_same_for_the_entry_point_and_the_loop(tmp_path):
    recipe = pretrain_recipe(ROOT / "recipes" / "synth_pretrain_baseline.yaml", TINY, coarse="fshift:4")
    entry = pretrain_plan(recipe, 1)
    objective = SSASTObjective(recipe.ssast)
    assert build_plan(recipe, objective, 1).rows == entry.rows  # the shared function, called directly
    looped = _loop_plan(tmp_path, recipe, objective, recipe.base, recipe.audio)  # a trainer given no plan
    assert looped.rows == entry.rows and looped.configs == entry.configs and looped.splits == entry.splits
    assert [r.train_flops for r in entry.rows] == [r.flops_per_sample * r.length * r.global_batch for r in entry.rows]
    assert _loop_plan(tmp_path, recipe, objective, recipe.base, recipe.audio, entry) is entry  # consumed as given


def test_a_fine_tuning_recipe_plans_the_same_for_the_entry_point_and_the_loop(tmp_path):
    recipe = finetune_recipe("synth", overrides=["model.size=custom", *TINY], coarse="fshift:4")
    base = task_encoder_config(None, recipe.model, recipe.num_mel_bins, recipe.task.target_frames)
    audio = recipe.audio(base.num_mel_bins)
    objective = ClassifierObjective(["a", "b", "c"], recipe.task.metric, recipe.task.loss, AugmentConfig())
    entry = build_plan(recipe, objective, 1, base=base, audio=audio)
    looped = _loop_plan(tmp_path, recipe, objective, base, audio)
    assert looped.rows == entry.rows and looped.configs == entry.configs
    assert [r.unit for r in entry.rows] == ["epochs", "epochs"] and all(r.train_flops is None for r in entry.rows)


def test_the_baseline_is_a_plan_of_phases_and_the_saving_is_counted_once():
    recipe = finetune_recipe("vggsound", coarse="fshift:4")
    base = task_encoder_config(None, recipe.model, recipe.num_mel_bins, recipe.task.target_frames)
    objective = ClassifierObjective([f"c{i}" for i in range(309)], recipe.task.metric, recipe.task.loss,
                                    AugmentConfig())
    plan = build_plan(recipe, objective, 1, base=base, audio=recipe.audio(base.num_mel_bins))
    baseline = plan.baseline
    assert isinstance(baseline, BaselinePlan) and all(isinstance(r, PhasePlan) for r in baseline.phases)
    assert baseline.name == "vggsound-baseline" and [r.length for r in baseline.phases] == [20]
    assert baseline.phases[0].flops_per_sample == plan.rows[-1].flops_per_sample  # the full-resolution geometry
    # the cost of an epoch-based schedule: FLOPs per clip of the training set over every epoch
    assert plan.cost() == planned_cost(plan.rows) == sum(r.flops_per_sample * r.length for r in plan.rows)
    assert plan.saving() == 1 - plan.cost() / baseline.cost
    # the ledger takes the baseline from the plan, and counts it with the clips this run trains per epoch
    ledger = Ledger("acc")
    ledger.set_baseline(**baseline.ledger_fields())
    assert ledger.baseline == {"recipe": "vggsound-baseline", "train_flops": None,
                               "flops_per_sample": baseline.phases[0].flops_per_sample, "epochs": 20}
    # the plan table says the same saving
    assert f"saving {plan.saving():.1%}" in plan.saving_lines()[0]


def test_a_pretraining_baseline_recipe_is_planned_with_this_runs_geometry(capsys):
    recipe = pretrain_recipe(ROOT / "recipes" / "ssast_fshift4.yaml")
    from pretrain.recipe import load_baseline

    plan = pretrain_plan(recipe, 1, load_baseline(recipe))
    assert plan.baseline.name == "ssast_baseline (planned, 800000 steps)" and plan.baseline.shown == "ssast_baseline.yaml"
    assert plan.baseline.ledger_fields() == {"name": plan.baseline.name,
                                             "train_flops": sum(r.train_flops for r in plan.baseline.phases)}
    assert plan.saving() == pytest.approx(1 - sum(r.train_flops for r in plan.rows) / plan.baseline.cost)
    assert pretrain(["--recipe", str(ROOT / "recipes" / "ssast_fshift4.yaml"), "--dry-run"]) == PLAN_NOT_READY
    printed = float(re.search(r"saving (-?[\d.]+)%", capsys.readouterr().out).group(1))
    assert printed == round(100 * plan.saving(), 1)


def test_a_plan_on_ranks_that_do_not_split_the_batch_is_refused_before_any_compute():
    from common.config.recipe import RecipeError

    recipe = pretrain_recipe(ROOT / "recipes" / "synth_pretrain.yaml", TINY)
    with pytest.raises(RecipeError, match="data.batch_size"):
        pretrain_plan(replace(recipe, data=replace(recipe.data, batch_size=5)), 2)
