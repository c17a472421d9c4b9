"""``--coarse``: the derived schedules and their planned FLOPs, bad values, the baseline in the ledger; and the
paper's stop applied live (``train.stop_when_surpassing``) with a cap, as the report shows it."""

import json
from pathlib import Path

import pytest
import torch

from common.audio.compression import Compression
from common.cli import PLAN_NOT_READY
from common.config.recipe import RecipeError, build, to_dict
from common.models.arch import architecture_for, geometries
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.ast.resize import adapt_state_dict
from common.phases.coarse import CoarseConfig, apply_coarse, parse_coarse
from common.phases.config import PhaseConfig, TransferConfig, patch_mode_between
from common.phases.transition import next_phase_model
from common.training.loop import Trainer
from finetune.classifier import AugmentConfig, ClassifierObjective
from finetune.recipe import load_recipe as finetune_recipe
from finetune.run import main as finetune
from pretrain.recipe import load_recipe as pretrain_recipe
from pretrain.run import main as pretrain
from tests.helpers import TINY, _synth_root, sets

ROOT = Path(__file__).resolve().parents[2]


def lengths(recipe) -> list[tuple[str, int, int]]:
    return [(p.compression, p.factor, p.length) for p in recipe.phases]


@pytest.mark.parametrize("text,fields", [
    ("fshift:4", {"method": "fshift", "factors": [4]}),
    ("avgpool:2:0.3", {"method": "avgpool", "factors": [2], "share": 0.3}),
    ("FShift:4,2:30%", {"method": "fshift", "factors": [4, 2], "share": 0.3}),
    ("patch:4->2", {"method": "patch", "factors": [4, 2]}),
])
def test_coarse_flag_values(text, fields):
    parsed = parse_coarse(text)
    assert parsed.pop("share", None) == pytest.approx(fields.pop("share", None)) and parsed == fields


@pytest.mark.parametrize("text,message", [
    ("fshift", "not of the form METHOD:C"), ("blur:4", "unknown method 'blur'"), ("fshift:x", "C must be a factor"),
    ("fshift:4:lots", "SHARE must be a fraction"), ("fshift:4:1.5", "coarse.share: a share .* got 1.5"),
    ("fshift:2,4", "strictly decreasing"), ("fshift:1", "factors must be >= 2"),
])
def test_bad_coarse_values_fail_naming_the_flag(text, message):
    with pytest.raises(RecipeError, match=f"--coarse {text}|--coarse '{text}'") as err:
        pretrain_recipe(ROOT / "recipes" / "ssast_baseline.yaml", coarse=text)
    assert err.match(message)


def test_the_patch_transfer_is_the_patch_phases_into_and_out_of_it():
    """A patch phase's ``patch_transfer`` resizes the kernel on the way in and on the way out (the paper's BL and PI
    runs differ at both changes); between phases without patch compression the kernel keeps its shape (pi)."""
    pi = PhaseConfig(compression="patch", factor=4, steps=1)
    bl = PhaseConfig(compression="patch", factor=4, patch_transfer="bilinear", steps=1)
    full, fshift = PhaseConfig(steps=1), PhaseConfig(compression="fshift", factor=4, steps=1)
    assert [patch_mode_between(None, bl), patch_mode_between(full, bl), patch_mode_between(bl, full)] == \
        ["bilinear"] * 3
    assert [patch_mode_between(None, pi), patch_mode_between(full, pi), patch_mode_between(pi, full)] == ["pi"] * 3
    assert patch_mode_between(fshift, full) == patch_mode_between(None, full) == "pi"


@pytest.mark.parametrize("transfer", ["pi", "bilinear"])
def test_leaving_a_patch_phase_resizes_the_kernel_its_way(transfer):
    """The coarse -> fine change of a ``patch x4`` schedule (16x64 -> 16x16 kernel) resizes the kernel by the patch
    phase's transfer, which is not the other's."""
    full = EncoderConfig(embed_dim=32, depth=1, num_heads=2, num_mel_bins=64, input_tdim=128,
                         fshape=16, tshape=16, fstride=16, tstride=16)
    coarse = Compression("patch", 4, transfer).encoder_config(full)
    objective = ClassifierObjective(["a", "b"], "acc", "ce", AugmentConfig())
    torch.manual_seed(0)
    model = objective.build_model(coarse)
    state = {k: v.detach() for k, v in model.encoder.state_dict().items()}
    prev = PhaseConfig(compression="patch", factor=4, patch_transfer=transfer, steps=1)
    fine = next_phase_model(architecture_for(full), objective, model, coarse, full, prev, PhaseConfig(steps=1),
                            TransferConfig(), 1).encoder.patch_embed.proj.weight.detach()
    assert isinstance(model.encoder, ASTEncoder) and fine.shape[-2:] == (16, 16)
    other = "bilinear" if transfer == "pi" else "pi"
    expected, not_expected = (adapt_state_dict(state, coarse, full, "bilinear", mode)["patch_embed.proj.weight"]
                              for mode in (transfer, other))
    assert torch.allclose(fine, expected, atol=1e-6) and not torch.allclose(fine, not_expected, atol=1e-3)


@pytest.mark.slow
def test_pretraining_schedules_are_the_papers_lengths_and_flops():
    from pretrain.run import plan

    recipe = pretrain_recipe(ROOT / "recipes" / "ssast_baseline.yaml", coarse="fshift:4")
    assert lengths(recipe) == [("fshift", 4, 100_000), ("none", 1, 500_000)]  # 1/8 and 5/8 of 800K
    assert recipe.coarse.baseline.name == "ssast_baseline" and recipe.baseline is None
    # the planned FLOPs by hand: steps x 24 clips (6 per rank x 4 ranks) x FLOPs per clip at each geometry
    from pretrain.ssast import SSASTObjective

    f4, f1 = (SSASTObjective(recipe.ssast).flops_per_sample(c) for c in recipe.encoder_configs())
    rows = plan(recipe, world_size=4).rows
    assert [r.train_flops for r in rows] == [100_000 * 24 * f4, 500_000 * 24 * f1]
    base = plan(recipe, 4).baseline.phases  # the recipe it was derived from, planned with it
    assert base[0].train_flops == 800_000 * 24 * f1
    assert 1 - (100_000 * f4 + 500_000 * f1) / (800_000 * f1) == pytest.approx(0.3458, abs=5e-4)  # paper 34.58 %
    # the same as the hand-written recipes of the paper and the demo
    assert to_dict(recipe.phases) == to_dict(pretrain_recipe(ROOT / "recipes" / "ssast_fshift4.yaml").phases)
    three = pretrain_recipe(ROOT / "recipes" / "ssast_baseline.yaml", coarse="fshift:4,2")
    assert lengths(three) == [("fshift", 4, 50_000), ("fshift", 2, 50_000), ("none", 1, 500_000)]
    assert to_dict(three.phases) == to_dict(pretrain_recipe(ROOT / "recipes" / "ssast_fshift421.yaml").phases)
    demo = pretrain_recipe(ROOT / "recipes" / "synth_pretrain_baseline.yaml", coarse="fshift:4")
    assert to_dict(demo.phases) == to_dict(pretrain_recipe(ROOT / "recipes" / "synth_pretrain.yaml").phases)


@pytest.mark.parametrize("task,flag,expected", [
    ("vggsound", "fshift:4", [("fshift", 4, 5), ("none", 1, 15)]),  # 25 % of 20 epochs (Table 2)
    ("audioset", "fshift:4", [("fshift", 4, 1), ("none", 1, 4)]),  # 1 + 4 of AST's 5 (section 3.3)
    ("vggsound", "avgpool:4,2", [("avgpool", 4, 3), ("avgpool", 2, 3), ("none", 1, 14)]),  # 30 % (Table 4)
    ("synth", "maxpool:2:0.5", [("maxpool", 2, 4), ("none", 1, 4)]),
])
def test_fine_tuning_schedules_are_the_papers_lengths(task, flag, expected):
    recipe = finetune_recipe(task, coarse=flag)
    assert lengths(recipe) == expected
    assert recipe.coarse.baseline.name == f"{task}-baseline" and len(recipe.coarse.baseline.phases) == 1
    # the resolved recipe (what recipe.yaml holds) loads as it is: derived once, not twice
    again = build(type(recipe), to_dict(recipe))
    assert to_dict(again) == to_dict(recipe)
    data, label = apply_coarse(to_dict(recipe), "ignored")
    assert label is None and data["phases"] == to_dict(recipe.phases)


def test_until_sections_reach_the_derived_phases_and_a_derived_recipe_is_not_derived_again():
    recipe = finetune_recipe("vggsound", coarse="fshift:4", overrides=[
        "coarse.until={criterion: plateau, patience: 1, max: 8}", "coarse.final_until={max: 30}",
        "train.stop_when_surpassing=runs/base"])
    coarse, final = recipe.phases
    assert (coarse.length, coarse.max_length, coarse.until.criterion) == (5, 8, "plateau")
    assert (final.length, final.max_length) == (15, 30)
    with pytest.raises(RecipeError, match="--coarse fshift:4: derives a schedule from a full-resolution recipe"):
        finetune_recipe("vggsound", ROOT / "recipes" / "ft_fshift4.yaml", coarse="fshift:4")
    with pytest.raises(RecipeError, match="--coarse fshift:4: coarse.until: the derived phase has 5 epochs: .*within"):
        finetune_recipe("vggsound", coarse="fshift:4", overrides=["coarse.until={criterion: plateau, max: 3}"])
    assert isinstance(recipe.coarse, CoarseConfig)


@pytest.mark.slow
def test_dry_runs_print_the_derived_schedule_and_its_saving(tmp_path, synth_corpus, capsys):
    assert pretrain(["--recipe", str(ROOT / "recipes" / "ssast_baseline.yaml"), "--coarse", "fshift:4",
                     "--dry-run"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "derived from ssast_baseline" in out and "100000" in out and "500000" in out
    assert "baseline ssast_baseline (800000 steps)" in out and "saving 34.6%" in out
    from finetune.classifier import ClassifierObjective

    data = _synth_root(tmp_path, synth_corpus)
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(data), "--coarse", "fshift:4",
                     "--dry-run", *sets("coarse.until={criterion: plateau, max: 4}")]) == 0
    out = capsys.readouterr().out
    recipe = finetune_recipe("synth", coarse="fshift:4")
    from common.phases.init import task_encoder_config

    base = task_encoder_config(None, recipe.model, recipe.num_mel_bins, recipe.task.target_frames)
    objective = ClassifierObjective([str(i) for i in range(12)], "acc", "ce", recipe.augment, recipe.head)
    f4, f1 = (objective.flops_per_sample(c) for c in geometries(architecture_for(base), recipe.phases))
    saving = 1 - (2 * f4 + 6 * f1) / (8 * f1)  # 2 + 6 epochs against 8 at full resolution
    assert f"saving {saving:.1%}" in out and "baseline synth-baseline (8 epochs)" in out
    assert f"between {1 - (4 * f4 + 6 * f1) / (8 * f1):.1%}" in out
    assert "ends at plateau (patience 2, min_delta 0.0, noise 2.0), after 0 to 4 epochs (planned 2)" in out


def test_a_bad_coarse_value_fails_before_compute(tmp_path, synth_corpus, capsys):
    data = _synth_root(tmp_path, synth_corpus)
    run_dir = tmp_path / "r"
    # the synth clips have a time grid of 8 patches: a factor of 3 does not divide it
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                     "--coarse", "fshift:3", *sets(*TINY)]) == 2
    err = capsys.readouterr().err
    assert "--coarse fshift:3: the derived schedule is invalid: phases.0: compression factor 3" in err
    assert pretrain(["--recipe", str(ROOT / "recipes" / "synth_pretrain_baseline.yaml"), "--run-dir", str(run_dir),
                     "--coarse", "fshift:3"]) == 2
    assert "--coarse fshift:3: the derived schedule is invalid" in capsys.readouterr().err
    # a recipe's coarse: section derives the schedule; a bad --set under it is still named as that --set
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                     "--recipe", str(ROOT / "recipes" / "ft_synth_htsat_fshift4.yaml"), "--dry-run",
                     "--set", "model.size=custom"]) == 2
    assert capsys.readouterr().err.strip().endswith("(in the schedule coarse derived) (--set model.size=custom)")
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                     "--coarse", "fshift:4", *sets(*TINY, f"train.stop_when_surpassing={tmp_path / 'nobase'}")]) == 2
    assert "train.stop_when_surpassing: no ledger at" in capsys.readouterr().err
    assert not run_dir.exists()


# ----------------------------------------------------------------------- runs: the ledger, the live stop
def ft(tmp_path: Path, corpus: Path, run_dir: Path, *extra: str, coarse: str | None = "fshift:4",
       stop: int | None = None) -> int:
    data = tmp_path / "data" if (tmp_path / "data").is_dir() else _synth_root(tmp_path, corpus)
    argv = ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
            *sets(*TINY, "data.batch_size=8", "phases=[{compression: none, epochs: 4}]", *extra)]
    argv += ["--coarse", coarse] if coarse else []
    return finetune(argv + (["--stop-after-steps", str(stop)] if stop else []))


@pytest.mark.slow
def test_the_ledger_saving_is_against_the_recipe_it_was_derived_from(tmp_path, synth_corpus):
    run_dir = tmp_path / "c2f"
    assert ft(tmp_path, synth_corpus, run_dir) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    coarse, final = ledger["phases"]
    assert (coarse["epochs"], final["epochs"]) == (1, 3)  # 25 % of 4 epochs, then the rest
    per_epoch = coarse["samples"]  # 24 clips, batches of 8: 24 per epoch
    assert per_epoch == 24 and final["samples"] == 3 * per_epoch
    base = ledger["baseline"]
    assert base["recipe"] == "synth-baseline" and base["epochs"] == 4 and base["flops_per_sample"] == \
        final["flops_per_sample"]
    assert base["train_flops"] == 4 * per_epoch * final["flops_per_sample"]
    assert ledger["flops_saving"] == pytest.approx(1 - ledger["total"]["train_flops"] / base["train_flops"])
    assert [(p["ended_by"], p["ended_at"]["epoch"]) for p in ledger["phases"]] == [("length", 1), ("length", 3)]
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "coarse:" in recipe and "name: synth-baseline" in recipe


def scripted_epochs(monkeypatch, table: dict) -> None:
    monkeypatch.setattr(Trainer, "_evaluate",
                        lambda self, model, index: {"acc": table.get((index, self.state.epoch_in_phase), 0.0)})


def comparable_baseline(tmp_path: Path, corpus: Path, name: str = "base", finished: bool = True,
                        averaged: float | None = None) -> Path:
    """A finished baseline run of :func:`ft`'s task as the trainer writes it: 4 epochs at full resolution
    (accuracy 0.3, 0.5, 0.4, 0.45), the same validation manifest and settings; ``averaged``: the score of its
    weight average (above its best epoch)."""
    from common.data.fingerprint import run_fingerprints
    from common.phases.baseline import evaluation_settings

    data = tmp_path / "data" if (tmp_path / "data").is_dir() else _synth_root(tmp_path, corpus)
    recipe = finetune_recipe("synth", overrides=[*TINY, "data.batch_size=8"], data_root=str(data))
    (_, valid), = recipe.task.fold_splits()
    evals = [{"phase": 0, "epoch": e + 1, "train_flops": 100.0 * (e + 1), "wall_seconds": 1.0 * (e + 1),
              "metrics": {"acc": v}} for e, v in enumerate([0.3, 0.5, 0.4, 0.45])]
    if averaged is not None:
        evals.append({**evals[-1], "weight_averaged": [2, 4], "metrics": {"acc": averaged}})
        del evals[-1]["epoch"]
    baseline = tmp_path / name
    baseline.mkdir()
    (baseline / "ledger.json").write_text(json.dumps({
        "score": "acc", "phases": [{"compression": "none", "factor": 1, "epochs": 4, "ended_by": "length"}],
        "evals": evals, "data": run_fingerprints([], valid),
        "evaluation": evaluation_settings(recipe.train, recipe.data, 8, 1)}))
    if finished:
        (baseline / "model.safetensors").write_bytes(b"weights")
    return baseline


@pytest.mark.slow
@pytest.mark.parametrize("final,epochs,reason", [([0.4, 0.5, 0.45, 0.55, 0.6], 4, "surpassed"),
                                                 ([0.4, 0.5, 0.45, 0.5, 0.5, 0.5, 0.5], 5, "cap")])
def test_stop_when_surpassing_ends_the_final_phase_live_and_may_run_past_its_plan_to_the_cap(
        tmp_path, synth_corpus, monkeypatch, final, epochs, reason):
    from common.reports.report import main as report

    baseline = comparable_baseline(tmp_path, synth_corpus, averaged=0.7)  # its average is not the target
    scripted_epochs(monkeypatch, {(0, 1): 0.2, **{(1, e + 1): v for e, v in enumerate(final)}})
    run_dir = tmp_path / "c2f"
    # 1 + 3 epochs planned; the final phase may run to 5 until it beats the baseline's best epoch (0.5, strictly)
    assert ft(tmp_path, synth_corpus, run_dir, f"train.stop_when_surpassing={baseline}",
              "coarse.final_until={max: 5}") == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    last = ledger["phases"][1]
    assert (last["epochs"], last["ended_by"], last["ended_at"]["epoch"]) == (epochs, reason, epochs)
    assert ledger["stop_when_surpassing"] == {"run": str(baseline), "score": "acc", "best": 0.5,
                                              "at": {"phase": 0, "epoch": 2}, "averaged": 0.7}
    assert [e["epoch"] for e in ledger["evals"] if e["phase"] == 1] == list(range(1, epochs + 1))
    assert report(["--baseline", str(baseline), "--runs", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    table = (tmp_path / "rep" / "report.md").read_text()
    if reason == "surpassed":
        assert "stopped live on surpassing its baseline (epoch 4 of the final phase)" in table
    else:
        assert "the cap ended it (epoch 5 of the final phase) before it surpassed its baseline" in table
        assert "not surpassed" in table


@pytest.mark.slow
def test_a_baseline_that_is_not_comparable_is_refused_before_compute_or_accepted_and_recorded(
        tmp_path, synth_corpus, monkeypatch, capsys):
    unfinished = comparable_baseline(tmp_path, synth_corpus, finished=False)
    run_dir = tmp_path / "c2f"
    assert ft(tmp_path, synth_corpus, run_dir, f"train.stop_when_surpassing={unfinished}") == 2  # bad input
    err = capsys.readouterr().err
    assert "train.stop_when_surpassing: the baseline" in err and "is not comparable with this run: not finished: no " \
        "model.safetensors" in err and "train.accept_baseline_differences=true" in err
    assert not run_dir.exists()
    scripted_epochs(monkeypatch, {(0, 1): 0.2, (1, 1): 0.6})
    assert ft(tmp_path, synth_corpus, run_dir, f"train.stop_when_surpassing={unfinished}",
              "train.accept_baseline_differences=true") == 0
    target = json.loads((run_dir / "ledger.json").read_text())["stop_when_surpassing"]
    assert target["best"] == 0.5 and len(target["accepted_differences"]) == 1
    assert target["accepted_differences"][0].startswith("not finished: no model.safetensors")


@pytest.mark.slow
def test_a_resumed_run_needs_no_baseline_directory(tmp_path, synth_corpus, monkeypatch):
    import shutil

    baseline = comparable_baseline(tmp_path, synth_corpus)
    scripted_epochs(monkeypatch, {(0, 1): 0.2, (1, 1): 0.4, (1, 2): 0.55})
    run_dir = tmp_path / "c2f"
    assert ft(tmp_path, synth_corpus, run_dir, f"train.stop_when_surpassing={baseline}", stop=4) == 0  # in epoch 1
    assert not (run_dir / "model.safetensors").exists()
    shutil.rmtree(baseline)  # moved, deleted: the target is in the checkpoint
    # (resumed validating on one batch: the ledger records that its validation now scores other clips)
    assert ft(tmp_path, synth_corpus, run_dir, f"train.stop_when_surpassing={baseline}", "train.eval_batches=1") == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["stop_when_surpassing"]["best"] == 0.5
    assert [i["changes"] for i in ledger["interventions"]] == [{"train.eval_batches": {"from": None, "to": 1}}]
    assert ledger["evaluation"] == {"eval_batches": 1, "eval_batch_size": 8, "ranks": 1, "eval_crop": "start",
                                    "pad": "zeros"}
    assert (ledger["phases"][1]["ended_by"], ledger["phases"][1]["epochs"]) == ("surpassed", 2)
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("final,top,averaged", [
    ([0.45, 0.4, 0.42, 0.55], 2, [1, 4]),  # the best 2 of the 4 that ran (one past the 3 planned)
    ([0.45, 0.6], 3, [1, 2]),  # fewer than 3 ran: all of them
])
def test_weight_average_top_with_an_early_stop_averages_the_best_epochs_that_ran(
        tmp_path, synth_corpus, monkeypatch, final, top, averaged):
    from safetensors.torch import load_file

    from common.training.weight_average import average_state_dicts

    baseline = comparable_baseline(tmp_path, synth_corpus)
    scripted_epochs(monkeypatch, {(0, 1): 0.2, **{(1, e + 1): v for e, v in enumerate(final)}})
    run_dir = tmp_path / "c2f"
    assert ft(tmp_path, synth_corpus, run_dir, f"train.stop_when_surpassing={baseline}", "coarse.final_until={max: 5}",
              f"train.weight_average_top={top}") == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert (ledger["phases"][1]["ended_by"], ledger["phases"][1]["epochs"]) == ("surpassed", len(final))
    assert ledger["evals"][-1]["weight_averaged"] == averaged
    model = load_file(str(run_dir / "model.safetensors"))
    expected = average_state_dicts(load_file(str(run_dir / "average" / f"epoch{e:03d}.safetensors")) for e in averaged)
    assert model.keys() == expected.keys() and all(torch.equal(model[k], v) for k, v in expected.items())
    # the epochs that fell out of the best as the phase went are gone: only the averaged ones are kept
    assert sorted(p.name for p in (run_dir / "average").iterdir()) == [f"epoch{e:03d}.safetensors" for e in averaged]
    assert ft(tmp_path, synth_corpus, run_dir, f"train.stop_when_surpassing={baseline}", "coarse.final_until={max: 5}",
              f"train.weight_average_top={top}") == 0  # run again: complete


def test_weight_averaging_with_an_adaptive_final_phase_is_checked_at_load():
    recipe = finetune_recipe("audioset", ROOT / "recipes" / "ft_htsat_audioset_fshift4.yaml",
                             overrides=["train.stop_when_surpassing=runs/base"])  # the recipe's own suggestion
    assert recipe.train.weight_average_top == 15 and recipe.train.stop_when_surpassing == "runs/base"
    with pytest.raises(RecipeError, match="train.weight_average_from: averaging a range of epochs needs the final "
                                          "phase's length in advance.*train.weight_average_top can"):
        finetune_recipe("audioset", ROOT / "recipes" / "ft_audioset_fshift4.yaml",
                        overrides=["train.stop_when_surpassing=runs/base"])


@pytest.mark.slow
def test_a_fine_tuning_run_resumed_mid_epoch_ends_its_phase_at_the_same_epoch(tmp_path, synth_corpus, monkeypatch):
    from safetensors.torch import load_file

    # the coarse phase is planned for 3 epochs and may run 5; it shows learning at epoch 3 (.4 and .5 above
    # the first check's .1), then plateaus after one check without a gain: epoch 4
    scripted_epochs(monkeypatch, {(0, 1): 0.1, (0, 2): 0.4, (0, 3): 0.5, (0, 4): 0.5, (0, 5): 0.6, (1, 1): 0.5})
    sets_ = ("coarse.until={criterion: plateau, patience: 1, max: 5}", "train.deterministic=true")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert ft(tmp_path, synth_corpus, straight, *sets_, coarse="fshift:4:0.75") == 0
    # 3 steps per epoch: inside epoch 3, while the evidence builds up (one check above the first)
    assert ft(tmp_path, synth_corpus, resumed, *sets_, coarse="fshift:4:0.75", stop=7) == 0
    assert not (resumed / "model.safetensors").exists()
    assert ft(tmp_path, synth_corpus, resumed, *sets_, coarse="fshift:4:0.75") == 0
    for run_dir in (straight, resumed):
        phases = json.loads((run_dir / "ledger.json").read_text())["phases"]
        assert [(p["epochs"], p["ended_by"]) for p in phases] == [(4, "plateau"), (1, "length")]
    a, b = (load_file(str(d / "model.safetensors")) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
