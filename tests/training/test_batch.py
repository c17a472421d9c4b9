"""The global batch a recipe states, split over the ranks and accumulation of a launch (common/training/batch.py)."""

import json
from pathlib import Path

import pytest

from common.cli import PLAN_NOT_READY
from common.config.recipe import RecipeError
from common.training.batch import BatchSplit, phase_splits, split_batch
from common.training.ledger import Ledger, PhaseRecord

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"


@pytest.mark.parametrize("ranks,per_rank", [(1, 24), (2, 12), (3, 8), (4, 6), (24, 1)])
def test_a_global_batch_splits_evenly_over_the_ranks(ranks, per_rank):
    split = split_batch(24, ranks)
    assert split == BatchSplit(24, ranks, 1, per_rank)
    assert split.per_rank * split.world_size * split.grad_accum == 24
    assert split.describe() == f"24 clips per step = {per_rank} per rank x {ranks} rank(s) x 1 accumulation"


@pytest.mark.parametrize("batch,ranks,accum,cap,expected", [
    (24, 1, 2, None, (12, 2)),      # an explicit accumulation
    (128, 1, 1, 48, (32, 4)),       # HTS-AT's 128 on one GPU that takes 48: 3 does not divide 128, 4 does
    (128, 4, 1, 32, (32, 1)),       # the official 32 x 4 GPUs: the cap does not bite
    (24, 4, 1, 4, (3, 2)),          # 6 per rank would exceed 4: 3 x 2 accumulation
    (24, 3, 2, 3, (2, 4)),          # at least the given accumulation, raised until the cap holds
    (12, 4, 1, 1, (1, 3)),
])
def test_a_per_rank_cap_raises_the_accumulation(batch, ranks, accum, cap, expected):
    split = split_batch(batch, ranks, accum, cap)
    assert (split.per_rank, split.grad_accum) == expected
    assert split.per_rank * ranks * split.grad_accum == batch and split.per_rank <= (cap or batch)


@pytest.mark.parametrize("batch,ranks,accum,cap,names", [
    (12, 8, 1, None, ["12 clips", "8 rank(s)", "1 accumulation", "launch 1, 2, 3, 4, 6, 12 rank(s)"]),
    (24, 64, 1, None, ["24 clips", "64 rank(s)"]),
    (12, 4, 2, None, ["12 clips", "4 rank(s) x 2 accumulation", "not a multiple of 8"]),
    (2, 1, 4, None, ["2 clips", "1 rank(s) x 4 accumulation"]),
    (12, 8, 1, 2, ["12 clips", "8 rank(s)", "at most 2 clips (data.max_batch_per_rank)"]),
    (12, 3, 5, 4, ["12 clips", "3 rank(s) x 5 or more accumulation"]),
])
def test_an_impossible_split_is_refused_naming_the_numbers(batch, ranks, accum, cap, names):
    with pytest.raises(RecipeError) as err:
        split_batch(batch, ranks, accum, cap, key="phases.1.batch_size")
    message = str(err.value)
    assert message.startswith("phases.1.batch_size: a global batch of ") and "\n" not in message
    assert all(name in message for name in names), message


def test_a_phase_batch_is_its_own_global_batch():
    from pretrain.recipe import load_recipe

    recipe = load_recipe(RECIPES / "ssast_fshift4.yaml", ["phases.0.batch_size=48", "data.max_batch_per_rank=8"])
    assert phase_splits(recipe.phases, recipe.data, recipe.optim, 4) == [BatchSplit(48, 4, 2, 6),
                                                                         BatchSplit(24, 4, 1, 6)]
    with pytest.raises(RecipeError, match=r"^phases\.0\.batch_size: a global batch of 48 clips does not split over 5"):
        phase_splits(recipe.phases, recipe.data, recipe.optim, 5)


# what each recipe's source trains with, clips per optimiser step over all its GPUs
PRETRAINING = {  # SSAST: batch 24 under nn.DataParallel over 4 GPUs
    "ssast_fshift4": 24, "ssast_baseline": 24, "ssast_avgpool4": 24, "ssast_maxpool4": 24, "ssast_patch4_bl": 24,
    "ssast_patch4_pi": 24, "ssast_fshift421": 24,
    "synth_pretrain": 16, "synth_pretrain_baseline": 16,  # the demo's own
}
FINETUNING = [  # (task, recipe file or None: the task's own recipe, global batch)
    ("audioset", None, 12), ("audioset", "ft_audioset_fshift4", 12),  # AST AudioSet full: 12 (DataParallel)
    ("audioset20k", None, 12),  # AST / SSAST AudioSet balanced: 12
    ("vggsound", None, 12), ("voxceleb", None, 12), ("kinetics_sounds", None, 12),  # the paper: AST's AudioSet setup
    *[("vggsound", f"ft_{name}", 12) for name in ("fshift4", "fshift2", "avgpool2", "avgpool4", "maxpool2", "maxpool4",
                                                   "patch4_bl", "patch4_pi", "fshift421")],
    ("esc50", None, 48), ("speechcommands", None, 128),  # SSAST's ESC-50 and SpeechCommands recipes
    ("audioset", "htsat_audioset", 128), ("audioset", "ft_htsat_audioset_fshift4", 128),  # HTS-AT: 32 x 4 GPUs
    ("vggsound", "htsat_vggsound", 128), ("vggsound", "ft_htsat_vggsound_fshift4", 128),
    ("esc50", "htsat_esc50", 64), ("esc50", "ft_htsat_esc50_fshift4", 64),  # HTS-AT's ESC-50 config
    ("synth", None, 24), ("synth", "ft_synth_fshift4", 24), ("synth", "synth_htsat", 24),
    ("synth", "ft_synth_htsat_fshift4", 24),
]


@pytest.mark.parametrize("name,batch", sorted(PRETRAINING.items()))
def test_every_pretraining_recipe_states_its_sources_global_batch(name, batch):
    from pretrain.recipe import load_recipe

    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert {phase.batch_size_or(recipe.data.batch_size) for phase in recipe.phases} == {batch}
    assert f"{batch} clips per step" in (RECIPES / f"{name}.yaml").read_text().split("\ndescription:")[0]


@pytest.mark.parametrize("task,recipe_name,batch", FINETUNING)
def test_every_finetuning_recipe_states_its_sources_global_batch(task, recipe_name, batch):
    from finetune.recipe import load_recipe

    path = RECIPES / f"{recipe_name}.yaml" if recipe_name else None
    recipe = load_recipe(task, path)
    assert {phase.batch_size_or(recipe.data.batch_size) for phase in recipe.phases} == {batch}
    header = path.read_text().split("\ndescription:")[0] if path is not None else ""
    if "Batch:" in header:  # a header that states the batch states the global one
        assert f"{batch} clips per step" in header, header


def test_every_recipe_file_is_in_the_table():
    listed = set(PRETRAINING) | {r for _, r, _ in FINETUNING if r}
    assert {p.stem for p in RECIPES.glob("*.yaml")} - listed == {"linear_probe"}


def test_the_plan_prints_the_global_and_the_per_rank_batch(capsys):
    from pretrain.run import main

    recipe = str(RECIPES / "ssast_fshift4.yaml")
    assert main(["--recipe", recipe, "--dry-run", "--world-size", "4"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    header, coarse, full = out.splitlines()[:3]
    assert header.split()[2:4] == ["batch", "per"] and coarse.split()[4:6] == ["24", "6"] \
        and full.split()[4:6] == ["24", "6"]
    assert "batch: 24 clips per step = 6 per rank x 4 rank(s) x 1 accumulation" in out
    assert "differs" not in out and "saving 34.6%" in out

    assert main(["--recipe", recipe, "--dry-run"]) == PLAN_NOT_READY  # one GPU: the same global batch, all on one rank
    out = capsys.readouterr().out
    assert "batch: 24 clips per step = 24 per rank x 1 rank(s) x 1 accumulation" in out and "saving 34.6%" in out

    assert main(["--recipe", recipe, "--dry-run", "--set", "data.batch_size=48", "--set",
                 "data.max_batch_per_rank=8", "--world-size", "2"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "batch: 48 clips per step = 8 per rank x 2 rank(s) x 3 accumulation" in out
    assert "global batch 48 differs from the 24 that ssast_fshift4.yaml states" in out
    assert out.splitlines()[1].split()[4:6] == ["48", "8x3"]


@pytest.mark.slow
def test_the_finetuning_plan_prints_both_batches_and_refuses_a_split_that_cannot_be_made(capsys):
    from finetune.run import main

    argv = ["--init", "none", "--task", "audioset", "--recipe", str(RECIPES / "ft_audioset_fshift4.yaml"), "--dry-run"]
    assert main([*argv, "--world-size", "4"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "batch: 12 clips per step = 3 per rank x 4 rank(s) x 1 accumulation" in out and "differs" not in out
    assert main([*argv, "--world-size", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.batch_size: a global batch of 12 clips does not split over 8 rank(s) x 1 "
                          "accumulation") and "\n" not in err
    assert main(["--init", "none", "--task", "esc50", "--dry-run", "--set", "data.batch_size=24"]) == PLAN_NOT_READY
    assert "global batch 24 differs from the 48 that the esc50 task's recipe states" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_dry_runs_world_size_is_the_one_every_check_plans_with(capsys, monkeypatch, tmp_path, command):
    """The baseline's precheck (``train.stop_when_surpassing``) read the launcher's WORLD_SIZE, not --world-size."""
    monkeypatch.setenv("WORLD_SIZE", "2x")  # what no check of a planned run may read
    if command == "pretrain":
        from pretrain.run import main

        argv = ["--recipe", str(RECIPES / "ssast_fshift4.yaml")]
    else:
        from finetune.run import main

        argv = ["--init", "none", "--task", "esc50", "--set", f"train.stop_when_surpassing={tmp_path / 'none'}"]
    assert main([*argv, "--dry-run", "--world-size", "2"]) == PLAN_NOT_READY
    assert "WORLD_SIZE" not in capsys.readouterr().err


def test_world_size_plans_a_dry_run_only(capsys, tmp_path):
    from pretrain.run import main

    assert main(["--recipe", str(RECIPES / "ssast_fshift4.yaml"), "--world-size", "4",
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert "--world-size 4: plans a --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_launch_that_cannot_split_the_batch_stops_before_any_compute(tmp_path, synth_corpus, monkeypatch, capsys):
    """The launcher's WORLD_SIZE (3 ranks here) is read before the process group, data or model."""
    from tests.helpers import run

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert run(tmp_path / "run", synth_corpus) == 2  # the tiny recipe's global batch of 4
    err = capsys.readouterr().err
    assert "data.batch_size: a global batch of 4 clips does not split over 3 rank(s) x 1 accumulation" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["2x", "0", "-1"])
def test_a_malformed_world_size_is_one_error_line(tmp_path, synth_corpus, monkeypatch, capsys, value):
    """The reporter of the error read WORLD_SIZE itself and failed on it: two tracebacks and status 1."""
    from tests.helpers import run

    monkeypatch.setenv("WORLD_SIZE", value)
    assert run(tmp_path / "run", synth_corpus) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: WORLD_SIZE: expected a whole number of ranks (1 or more), got {value!r}"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_records_the_split_in_its_log_and_ledger(tmp_path, synth_corpus):
    """A per-rank cap of 2 clips on the tiny recipe's global batch of 4: 2 micro-batches of 2 per step."""
    from tests.helpers import run

    run_dir = tmp_path / "capped"
    assert run(run_dir, synth_corpus, "data.max_batch_per_rank=2", "train.eval_every=100", "train.save_every=100",
               steps=(2, 1)) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [(p["global_batch"], p["batch_per_rank"], p["grad_accum"], p["world_size"]) for p in ledger["phases"]] \
        == [(4, 2, 2, 1)] * 2
    assert [p["samples"] for p in ledger["phases"]] == [2 * 4, 1 * 4]  # steps x the global batch
    assert "batch 4 clips per step = 2 per rank x 1 rank(s) x 2 accumulation" in (run_dir / "train.log").read_text()


def test_the_ledger_keeps_the_batch_fields_through_its_file():
    ledger = Ledger("acc")
    record = ledger.start_phase(0, name="p1", compression="none", factor=1, flops_per_sample=10)
    record.set_batch(BatchSplit(24, 4, 1, 6))
    phase = ledger.to_dict()["phases"][0]
    assert {k: phase[k] for k in ("global_batch", "batch_per_rank", "grad_accum", "world_size")} == \
        {"global_batch": 24, "batch_per_rank": 6, "grad_accum": 1, "world_size": 4}
    again = Ledger.from_dict(json.loads(json.dumps(ledger.to_dict()))).phases[0]
    assert (again.global_batch, again.batch_per_rank, again.grad_accum, again.world_size) == (24, 6, 1, 4)
    assert "global_batch" not in PhaseRecord().to_dict()  # an old ledger without them stays as it was
