"""The planned FLOPs saving against a recipe's baseline follows this run's geometry and batch overrides."""

import json
import re
from pathlib import Path

import pytest

from common.cli import PLAN_NOT_READY
from pretrain.recipe import load_baseline, load_recipe, shared_with_baseline
from pretrain.run import _flops_per_sample, main, planned_total
from pretrain.ssast import SSASTObjective
from tests.helpers import RECIPE, tiny

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "recipes" / "ssast_fshift4.yaml"


def _saving(capsys, *sets: str) -> float:
    assert main(["--recipe", str(PAPER), *[a for s in sets for a in ("--set", s)], "--dry-run"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    return float(re.search(r"saving (-?[\d.]+)%", out).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["data.batch_size=24"], ["model.size=small", "audio.target_frames=512"],
                                       ["model={size: tiny}", "optim.grad_accum=4", "data.batch_size=8"]])
def test_geometry_and_batch_overrides_apply_to_the_baseline(capsys, overrides):
    recipe = load_recipe(PAPER, overrides)
    coarse, full = (_flops_per_sample(recipe.ssast, cfg) for cfg in recipe.encoder_configs())  # common.models.flops
    expected = 1 - (100_000 * coarse + 500_000 * full) / (800_000 * full)  # the baseline: 800K full steps
    assert _saving(capsys, *overrides) == pytest.approx(100 * expected, abs=0.05)
    assert 30 < 100 * expected < 40  # the paper's 34.58 % at SSAST-base


def test_schedule_overrides_stay_with_this_run(capsys):
    saving = _saving(capsys, "phases.0.steps=50000")  # 50K coarse + 500K full against 800K full
    assert saving == pytest.approx(36.0, abs=0.1)
    assert main(["--recipe", str(PAPER), "--set", "phases.0.steps=50000", "--dry-run"]) == PLAN_NOT_READY
    assert "the baseline keeps its own 800000 steps" in capsys.readouterr().out


def test_which_overrides_the_baseline_shares():
    items = ["model.depth=2", "audio.norm=esc50", "data.batch_size=4", "optim.grad_accum=2", "ssast.mask_ratio=0.5",
             "data.valid=[x]", "optim.lr=1e-3", "phases.0.steps=3", "train.seed=1", "data={batch_size: 2}"]
    assert shared_with_baseline(items) == ["model.depth=2", "audio.norm=esc50", "data.batch_size=4",
                                           "optim.grad_accum=2", "ssast.mask_ratio=0.5", "data={batch_size: 2}"]


def test_a_tiny_run_is_compared_with_a_baseline_of_its_own_size(tmp_path, synth_corpus):
    run_dir = tmp_path / "run"
    sets = tiny(synth_corpus, "baseline=synth_pretrain_baseline.yaml", steps=(2, 2))
    assert main(["--recipe", str(RECIPE), "--run-dir", str(run_dir), *sets, "--stop-after-steps", "1"]) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    overrides = sets[1::2]
    recipe = load_recipe(RECIPE, overrides)
    baseline = load_baseline(recipe, overrides)
    assert (baseline.model.embed_dim, baseline.model.depth, baseline.data.batch_size) == (32, 2, 4)
    assert [p.steps for p in baseline.phases] == [400]  # the baseline's own schedule
    full = SSASTObjective(recipe.ssast).flops_per_sample(recipe.encoder_configs()[-1])  # this run's full geometry
    assert ledger["baseline"]["train_flops"] == planned_total(baseline, 1) == 400 * 4 * full
    assert ledger["baseline"]["recipe"] == "synth_pretrain_baseline (planned, 400 steps)"
