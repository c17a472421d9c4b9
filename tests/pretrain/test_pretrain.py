"""Pretraining end to end on the built-in corpus: recipes, phases, resume, atomic checkpoints, 2 ranks."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.cli import PLAN_NOT_READY
from common.config.recipe import RecipeError
from common.models.weights import load_encoder
from pretrain.recipe import load_recipe
from pretrain.run import main
from tests.helpers import RECIPE, _free_port, poison_loss_at, run, tiny, weights
from tests.ranks import launch_cases

ROOT = Path(__file__).resolve().parents[2]


def test_recipes_in_the_repo_are_valid():
    for path in sorted((ROOT / "recipes").glob("ssast_*.yaml")) + [RECIPE]:
        recipe = load_recipe(path)
        assert recipe.phases and recipe.description, path


@pytest.mark.parametrize("override,message", [
    ("model.sise=tiny", "model.sise: unknown key"),
    ("phases.0.steps=abc", "phases.0.steps: expected an integer"),
    ("phases.0.factor=3", "phases.0: compression factor 3 does not divide the time grid of 8"),
    ("ssast.mask_ratio=0.999", "ssast.mask_ratio: mask ratio 0.999 masks 16 of 16 patches"),
    ("ssast.eval_mask_ratio=0.999", "ssast.eval_mask_ratio: mask ratio 0.999 masks 16 of 16 patches"),
    ("phases.0.epochs=2", "exactly one of steps"),
    ("optim.lr=-1", "lr must be positive"),
    ("phases.3.steps=1", "phases.3 is not an index of a list of 2"),
])
def test_invalid_recipes_fail_before_any_compute(tmp_path, capsys, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, [override])
    assert main(["--recipe", str(RECIPE), "--run-dir", str(tmp_path / "r"), "--set", override]) == 2
    assert message.split(":")[0] in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("stem", ["..", "."])
def test_a_recipe_file_whose_stem_is_not_a_folder_of_its_own_is_refused(tmp_path, synth_corpus, capsys, monkeypatch,
                                                                         stem):
    """``runs/pretrain/<recipe stem>``: a recipe file named ``...yaml`` (stem ``..``) put the run in ``runs/``, and
    ``..yaml`` in ``runs/pretrain`` itself. Without ``--run-dir`` it is refused in one line; with it, it runs."""
    recipe = tmp_path / f"{stem}.yaml"
    recipe.write_text(RECIPE.read_text())
    (tmp_path / RECIPE.with_name("synth_pretrain_baseline.yaml").name).write_text(
        RECIPE.with_name("synth_pretrain_baseline.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["--recipe", str(recipe), "--dry-run", *tiny(synth_corpus)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --recipe {recipe}: the run directory runs/pretrain/{stem} ")
    assert not (tmp_path / "runs").exists()
    assert main(["--recipe", str(recipe), "--dry-run", "--run-dir", str(tmp_path / "r"), *tiny(synth_corpus)]) == 0


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_the_saving(capsys):
    assert main(["--recipe", str(ROOT / "recipes" / "ssast_fshift4.yaml"), "--dry-run"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "fshift x4" in out and "100000" in out and "500000" in out
    assert "saving 34.6%" in out  # the paper's SSAST row: 34.58 %


def test_a_phase_that_ends_inside_its_warm_up_is_named_in_the_plan(capsys):
    """The warm-up starts again with each phase (the paper resets the optimiser and schedule): a 50-step phase under
    a 100-step warm-up never trains at the recipe's learning rate; the plan says which phase, the shipped recipes
    do not. Likewise a schedule that changes the rate at validations in a run that has none."""
    assert main(["--recipe", str(ROOT / "recipes" / "synth_pretrain.yaml"), "--dry-run",
                 "--set", "optim.warmup_steps=100"]) == PLAN_NOT_READY
    warned = [line for line in capsys.readouterr().out.splitlines() if "learning-rate warm-up" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: phases.0 (phase1 (fshift x4)): its 50 steps end")
    assert main(["--recipe", str(ROOT / "recipes" / "synth_pretrain.yaml"), "--dry-run"]) == PLAN_NOT_READY
    assert "learning-rate warm-up" not in capsys.readouterr().out
    # a schedule that acts at validations, in a run without any, is said to train at one rate; cosine is quiet
    synth = str(ROOT / "recipes" / "synth_pretrain.yaml")
    assert main(["--recipe", synth, "--dry-run", "--set", "data.valid=[]"]) == PLAN_NOT_READY
    assert "warning: optim.schedule: plateau changes the learning rate at validations, and this run has no " \
           "validation set (data.valid is empty): after its warm-up it trains at lr 0.001 to the end" in \
           capsys.readouterr().out
    assert main(["--recipe", str(ROOT / "recipes" / "synth_pretrain.yaml"), "--dry-run", "--set", "data.valid=[]",
                 "--set", "optim.schedule=cosine"]) == PLAN_NOT_READY
    assert "optim.schedule" not in capsys.readouterr().out
    # a phase as long as its warm-up reaches the recipe's rate at its last step (lr = base x (s + 1) / warm-up)
    assert main(["--recipe", str(ROOT / "recipes" / "synth_pretrain.yaml"), "--dry-run",
                 "--set", "optim.warmup_steps=50"]) == PLAN_NOT_READY
    assert "learning-rate warm-up" not in capsys.readouterr().out


def test_a_hand_written_schedule_that_gets_coarser_or_moves_no_patch_kernel_is_named_in_the_plan(capsys):
    """A reversed ``phases:`` list (full resolution, then Fshift x4) trains and exports a compressed model; a
    ``patch_transfer`` on a phase that is not a patch phase changes nothing. Both are slips of the pen the plan
    names (``coarse:`` refuses growing factors itself); the shipped recipes say neither."""
    recipe = str(ROOT / "recipes" / "synth_pretrain.yaml")
    reverse = "phases=[{compression: none, factor: 1, steps: 3}, {compression: fshift, factor: 4, steps: 3}]"
    assert main(["--recipe", recipe, "--dry-run", "--set", reverse]) == PLAN_NOT_READY
    assert "warning: phases.1 (phase2 (fshift x4)) is coarser than phases.0 (phase1 (full resolution)): coarse to " \
           "fine trains the compressed phases first; check the order of phases" in capsys.readouterr().out
    transfer = ("phases=[{compression: patch, factor: 4, patch_transfer: pi, steps: 3}, "
                "{compression: none, factor: 1, patch_transfer: bilinear, steps: 3}]")
    assert main(["--recipe", recipe, "--dry-run", "--set", transfer]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "warning: phases.1.patch_transfer: bilinear changes nothing on a none phase: the transfer to and from " \
           "phases.0 is its own patch_transfer (pi)" in out
    assert "coarser" not in out
    for shipped in ("synth_pretrain.yaml", "ssast_patch4_bl.yaml", "ssast_fshift4.yaml"):
        assert main(["--recipe", str(ROOT / "recipes" / shipped), "--dry-run"]) == PLAN_NOT_READY
        out = capsys.readouterr().out
        assert "coarser than" not in out and "changes nothing" not in out


@pytest.mark.slow
def test_two_phase_run(tmp_path, synth_corpus):
    run_dir = tmp_path / "run"
    assert run(run_dir, synth_corpus) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    p1, p2 = ledger["phases"]
    assert (p1["compression"], p1["factor"], p1["steps"], p1["samples"]) == ("fshift", 4, 3, 12)
    assert (p2["compression"], p2["factor"], p2["steps"], p2["samples"]) == ("none", 1, 3, 12)
    assert p1["train_flops"] == 12 * p1["flops_per_sample"] and p1["flops_per_sample"] < p2["flops_per_sample"] / 3
    assert ledger["total"]["train_flops"] == p1["train_flops"] + p2["train_flops"]
    assert p1["wall_seconds"] > 0 and [e["phase"] for e in ledger["evals"]] == [0, 0, 1, 1]
    assert p1["device"] == "cpu" and p1["hardware"] == [["cpu", 1]]
    assert p1["precision"] == p2["precision"] == ["fp32"]  # what train.precision: auto resolved to on the CPU
    assert "x 1 accumulation, in fp32; memory estimate" in (run_dir / "train.log").read_text()
    assert p1["device_seconds"] == pytest.approx(p1["wall_seconds"] + p1["eval_seconds"])
    enc = load_encoder(run_dir)  # what finetune --init consumes
    assert enc.cfg.input_tdim == 128 and enc.cfg.grid == (8, 8)
    assert load_encoder(run_dir / "export" / "phase1.safetensors").cfg.grid == (8, 2)
    assert (run_dir / "recipe.yaml").is_file() and list((run_dir / "tb").glob("events.*"))
    # TensorBoard has the scalars the issue asks for
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/nce", "train/mse", "train/acc", "train/lr", "perf/samples_per_s", "perf/tokens_per_s",
            "perf/train_flops", "phase", "eval/acc"} <= tags
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[3] == pytest.approx(lrs[0])  # warm-up restarts with the phase: step 1 of phase 2 = step 1 of phase 1
    # running the same command again finds the run complete
    assert run(run_dir, synth_corpus) == 0
    assert json.loads((run_dir / "ledger.json").read_text())["total"]["steps"] == 6


def test_a_run_resumes_under_another_spelling_of_its_files(tmp_path, synth_corpus, monkeypatch, capsys):
    """The same manifests and baseline by another path (a link, another working folder, a moved project) were 'a
    run of a different recipe (data.train.0.path, data.valid differ)': the run could not be resumed. What the
    manifests hold is compared (their fingerprints, in order), not how they are spelled; other manifests are still
    refused (or accepted as changed data)."""
    link = tmp_path / "link"
    link.symlink_to(synth_corpus)
    run_dir = tmp_path / "run"
    assert run(run_dir, link, stop=2) == 0
    monkeypatch.chdir(tmp_path)  # a relative spelling, from another working folder
    assert run(run_dir, Path(os.path.relpath(synth_corpus, tmp_path))) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["total"]["steps"] == 6 and not ledger.get("interventions")
    other = tmp_path / "other"  # other manifests at the same place in the recipe: changed data, refused
    other.mkdir()
    for name in ("synth_pool.jsonl.gz", "synth_valid.jsonl.gz"):
        (other / name).write_bytes((synth_corpus / name).read_bytes())
    with gzip.open(other / "synth_valid.jsonl.gz", "rt") as handle:
        lines = handle.read().splitlines()
    with gzip.open(other / "synth_valid.jsonl.gz", "wt") as handle:
        handle.write("\n".join(lines[:-1]) + "\n")
    assert run(tmp_path / "run2", synth_corpus, stop=2) == 0
    capsys.readouterr()
    assert run(tmp_path / "run2", other) == 2
    assert f"manifests changed since the run started: valid: {other / 'synth_valid.jsonl.gz'} (sha256 " in \
        capsys.readouterr().err


def test_a_run_called_from_python_gives_the_process_its_state_back(tmp_path, synth_corpus, monkeypatch):
    """A run called from Python (a notebook, a sweep) left the root logger its handlers, its level and its open
    train.log (the caller's later lines went into the finished run's log, and printed twice beside its own handler),
    the global torch generator seeded as the run seeds it (a seed sweep drew the same numbers after every run),
    the launcher variables it filled in, torch's exception hook wrapped once more, and a caller's process group
    destroyed. It gives each back."""
    import io
    import logging
    import sys

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    root, mine = logging.getLogger(), logging.StreamHandler(io.StringIO())
    root.addHandler(mine)
    monkeypatch.setattr(root, "level", logging.WARNING)
    handlers, hook = list(root.handlers), sys.excepthook
    lhotse = logging.getLogger("lhotse").level
    try:
        torch.manual_seed(1)
        expected = torch.rand(3)  # what the caller draws next
        torch.manual_seed(1)
        assert run(tmp_path / "run", synth_corpus) == 0
        assert torch.equal(torch.rand(3), expected)
        assert root.handlers == handlers and root.level == logging.WARNING and sys.excepthook is hook
        assert logging.getLogger("lhotse").level == lhotse
        assert not [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR") if k in os.environ]
        logging.getLogger("mine").warning("a line of the caller's, after the run")
        assert "after the run" not in (tmp_path / "run" / "train.log").read_text()
        assert mine.stream.getvalue().count("after the run") == 1
        # the caller's own process group: used by the run, and left to it
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        try:
            assert run(tmp_path / "again", synth_corpus) == 0
            assert torch.distributed.is_initialized()
            torch.distributed.all_reduce(torch.ones(1))
        finally:
            torch.distributed.destroy_process_group()
    finally:
        root.removeHandler(mine)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [2, 3])  # a resume within a phase, and at a phase's end
def test_a_resumes_set_up_is_not_counted_as_training_time(tmp_path, synth_corpus, monkeypatch, stop):
    """The seconds a resume spends reading its checkpoint (and building its model) are no training: the wall
    time the ledger gives the phase, which the reported time saving divides, leaves them out."""
    import time

    from common.training.record import RunRecord

    run_dir = tmp_path / "run"
    assert run(run_dir, synth_corpus, "train.save_every=1", "train.eval_every=1", stop=stop) == 0
    load = RunRecord.load

    def slow_load(self, *args, **kwargs):
        time.sleep(3.0)  # a checkpoint on a slow shared file system
        return load(self, *args, **kwargs)

    monkeypatch.setattr(RunRecord, "load", slow_load)
    monkeypatch.setattr(RunRecord, "resume", lambda self, _r=RunRecord.resume: (time.sleep(3.0), _r(self))[1])
    assert run(run_dir, synth_corpus, "train.save_every=1", "train.eval_every=1") == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert all(p["wall_seconds"] < 3.0 for p in ledger["phases"]), [p["wall_seconds"] for p in ledger["phases"]]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [2, 3, 4])  # 3: the first phase's end, where the call stops (no step more)
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, synth_corpus, stop):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(straight, synth_corpus, "train.save_every=100") == 0
    assert run(resumed, synth_corpus, "train.save_every=100", stop=stop) == 0
    assert not (resumed / "model.safetensors").exists()
    assert json.loads((resumed / "ledger.json").read_text())["total"]["steps"] == stop
    assert run(resumed, synth_corpus, "train.save_every=100") == 0
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (json.loads((d / "ledger.json").read_text()) for d in (straight, resumed))
    assert [p["samples"] for p in la["phases"]] == [p["samples"] for p in lb["phases"]]
    assert [e["metrics"] for e in la["evals"]] == [e["metrics"] for e in lb["evals"]]


@pytest.mark.slow
def test_a_run_killed_while_saving_resumes_from_the_previous_checkpoint(tmp_path, synth_corpus, monkeypatch):
    import common.training.checkpoints as rc

    straight = tmp_path / "straight"
    assert run(straight, synth_corpus) == 0
    run_dir = tmp_path / "crash"
    real = rc.atomic_write_text
    calls = {"n": 0}

    def dying(path, text):
        if Path(path).name == "trainer_state.json" and Path(path).parent.name.startswith(".tmp-"):  # a save's
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint: DeepSpeed files written, state not yet
                raise KeyboardInterrupt("killed")
        return real(path, text)

    monkeypatch.setattr(rc, "atomic_write_text", dying)
    from pretrain import run as entry

    monkeypatch.setattr(entry, "run_main", lambda body, **_: body())  # let the "kill" propagate
    with pytest.raises(KeyboardInterrupt):
        entry.main(["--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(synth_corpus)])
    ckdir = run_dir / "checkpoints"
    assert (ckdir / "LATEST").read_text() == "phase01-step000000002"
    assert list(ckdir.glob(".tmp-*"))  # the half-written checkpoint is there, but not published
    monkeypatch.setattr(rc, "atomic_write_text", real)
    assert run(run_dir, synth_corpus) == 0
    assert not list(ckdir.glob(".tmp-*"))
    a, b = weights(straight), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path, synth_corpus, monkeypatch, capsys):
    poison_loss_at(monkeypatch, 3)
    run_dir = tmp_path / "nan"
    assert run(run_dir, synth_corpus, "train.nonfinite_check=step") == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "phase01-step000000002" in err and "stopped before the update" in err
    ckdir = run_dir / "checkpoints"
    assert (ckdir / "LATEST").read_text() == "phase01-step000000002"
    saved = torch.load(ckdir / "phase01-step000000002" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(torch.isfinite(v).all() for v in saved.values())


@pytest.mark.slow
def test_two_processes_on_the_cpu_with_the_deepspeed_launcher(tmp_path, synth_corpus):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(ROOT / "pretrain" / "run.py"), "--recipe", str(RECIPE), "--run-dir", str(run_dir),
           *tiny(synth_corpus, "train.zero_stage=1", "data.batch_size=8", steps=(2, 2))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [p["samples"] for p in ledger["phases"]] == [2 * 8, 2 * 8]  # steps x the global batch
    # data.batch_size is the global batch: 8 clips per step = 4 per rank on the 2 ranks
    assert [(p["global_batch"], p["batch_per_rank"], p["grad_accum"], p["world_size"]) for p in ledger["phases"]] \
        == [(8, 4, 1, 2)] * 2
    assert "batch 8 clips per step = 4 per rank x 2 rank(s) x 1 accumulation" in (run_dir / "train.log").read_text()
    assert all(p["device_seconds"] == pytest.approx(2 * (p["wall_seconds"] + p["eval_seconds"]))
               for p in ledger["phases"])  # two ranks' devices
    assert load_encoder(run_dir).cfg.grid == (8, 8)
    assert (run_dir / "checkpoints" / "phase02-step000000002" / "rng_rank1.pt").is_file()


@pytest.mark.slow
def test_a_zero_run_resumes_on_another_number_of_ranks(tmp_path, synth_corpus, monkeypatch, capsys):
    """Two ranks with ZeRO stage 1 stop at step 2; one rank resumes: the partitioned optimizer state goes
    through DeepSpeed's universal checkpoint, Adam continues from its saved step, the ledger says so."""
    run_dir = tmp_path / "elastic"
    sets = tiny(synth_corpus, "train.zero_stage=1", steps=(4, 2))
    launch_cases(2, [("stopped", "pretrain", ["--recipe", str(RECIPE), "--run-dir", str(run_dir), *sets,
                                              "--stop-after-steps", "2"])], tmp_path / "job", timeout=240)

    def broken(args):
        raise RuntimeError("no space left on device")

    with monkeypatch.context() as patch:  # a conversion that fails is one readable error, and nothing is lost
        patch.setattr("deepspeed.checkpoint.ds_to_universal.main", broken)
        capsys.readouterr()
        assert main(["--recipe", str(RECIPE), "--run-dir", str(run_dir), *sets]) == 1
        err = capsys.readouterr().err
        assert "written by 2 rank(s)" in err and "could not be converted for 1" in err and "no space left" in err
    assert not list((run_dir / "checkpoints").glob(".*universal-*"))
    assert main(["--recipe", str(RECIPE), "--run-dir", str(run_dir), *sets, "--stop-after-steps", "1"]) == 0
    optim = torch.load(run_dir / "checkpoints" / "phase01-step000000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       map_location="cpu", weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
    assert float(optim["state"][0]["step"]) == 3  # 2 restored + 1, not a fresh optimiser
    assert not list((run_dir / "checkpoints").glob(".universal-*"))  # the converted copy is removed once loaded
    assert not (run_dir / "checkpoints" / "latest_universal").exists()  # DeepSpeed's pointer to its temporary name
    assert main(["--recipe", str(RECIPE), "--run-dir", str(run_dir), *sets]) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [i["changes"] for i in ledger["interventions"]] == [{"world_size": {"from": 2, "to": 1}}]
    assert ledger["total"]["steps"] == 6 and (run_dir / "model.safetensors").is_file()
    # the global batch stays 4 clips per step: 2 per rank on 2 ranks, then 4 on one; the data position is kept in
    # clips (2 batches of 2 on each of 2 ranks = 2 batches of 4 on one)
    assert [p["samples"] for p in ledger["phases"]] == [4 * 4, 2 * 4]
    assert [(p["global_batch"], p["batch_per_rank"], p["world_size"]) for p in ledger["phases"]] == [(4, 4, 1)] * 2
    assert "goes on after the same share of this pass over the training set (2 batches of 4 clips per rank)" in \
        (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_zero_run_resumes_on_more_ranks(tmp_path, synth_corpus):
    """One rank with ZeRO stage 2 stops at step 2; two ranks resume from the universal checkpoint and finish."""
    run_dir = tmp_path / "grow"
    sets = tiny(synth_corpus, "train.zero_stage=2", steps=(4, 2))
    assert main(["--recipe", str(RECIPE), "--run-dir", str(run_dir), *sets, "--stop-after-steps", "2"]) == 0
    launch_cases(2, [("resumed", "pretrain", ["--recipe", str(RECIPE), "--run-dir", str(run_dir), *sets])],
                 tmp_path / "job", timeout=240)
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [i["changes"] for i in ledger["interventions"]] == [{"world_size": {"from": 1, "to": 2}}]
    # the global batch stays 4 clips per step on 1 rank and on 2 (4 per rank, then 2): 4 + 2 steps
    assert [p["samples"] for p in ledger["phases"]] == [4 * 4, 2 * 4]
    assert [(p["global_batch"], p["batch_per_rank"], p["world_size"]) for p in ledger["phases"]] == [(4, 2, 2)] * 2
    assert (run_dir / "checkpoints" / "phase02-step000000002" / "rng_rank1.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method,transfer", [("patch", "pi"), ("patch", "bilinear"), ("avgpool", "pi"),
                                             ("maxpool", "pi")])
def test_every_compression_method_runs_coarse_to_fine(tmp_path, synth_corpus, method, transfer):
    run_dir = tmp_path / method
    assert run(run_dir, synth_corpus, f"phases.0.compression={method}", f"phases.0.patch_transfer={transfer}",
               "phases.0.factor=2", "train.eval_every=100", "train.save_every=100", steps=(2, 1)) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["phases"][0]["compression"] == method
    coarse = load_encoder(run_dir / "export" / "phase1.safetensors").cfg
    assert coarse.grid == (8, 4) and (coarse.tshape == 32) == (method == "patch")
    assert load_encoder(run_dir).cfg.tshape == 16


@pytest.mark.slow
def test_gradient_accumulation_and_zero_stage_2(tmp_path, synth_corpus):
    run_dir = tmp_path / "accum"
    assert run(run_dir, synth_corpus, "optim.grad_accum=2", "train.zero_stage=2", "optim.grad_clip=1.0",
               "data.batch_size=8", "train.eval_every=100", "train.save_every=100", steps=(2, 1)) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [p["samples"] for p in ledger["phases"]] == [2 * 8, 1 * 8]  # steps x the global batch (4 x 2 accumulation)
    assert [(p["batch_per_rank"], p["grad_accum"]) for p in ledger["phases"]] == [(4, 2)] * 2
    assert [p["steps"] for p in ledger["phases"]] == [2, 1]
