"""A run directory after a failed start, and the documented recovery from a non-finite loss."""

import json

import pytest
import torch

from common.cli import PLAN_NOT_READY
from common.training.ledger import Ledger
from finetune.run import main as finetune
from pretrain.run import main
from tests.helpers import RECIPE, _synth_root, poison_loss_at, tiny

REFUSED = "what the command refuses in its run directory (it would stop before any compute):\n"


def _run(run_dir, corpus, *extra, stop=None) -> int:
    argv = ["--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(corpus, *extra)]
    return main(argv + (["--stop-after-steps", str(stop)] if stop else []))


@pytest.mark.slow
def test_a_failed_start_leaves_no_recipe_behind(tmp_path, synth_corpus, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    poison_loss_at(monkeypatch, 1)  # fails at the very first step: nothing was trained
    assert _run(run_dir, synth_corpus) == 1
    assert "non-finite loss" in capsys.readouterr().err
    assert not (run_dir / "recipe.yaml").exists() and not list(run_dir.glob("checkpoints/phase*"))
    monkeypatch.undo()
    # the corrected command (here: another model) starts the run; nothing refuses it
    assert _run(run_dir, synth_corpus, "model.depth=1", stop=2) == 0
    assert "depth: 1" in (run_dir / "recipe.yaml").read_text()  # written with the first checkpoint
    assert _run(run_dir, synth_corpus, "model.depth=2") == 2  # from now on the run is protected
    assert "model.depth" in capsys.readouterr().err
    # a plan of the same command says it resumes the run; one the run would refuse says so and gives the refusal
    # under its own heading (no file is missing), and writes nothing
    files = sorted(p.name for p in run_dir.rglob("*"))
    for depth, refused in ((1, False), (2, True)):
        argv = ["--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(synth_corpus, f"model.depth={depth}")]
        assert main([*argv, "--dry-run"]) == (PLAN_NOT_READY if refused else 0)  # a run would stop, or start
        out = capsys.readouterr().out
        assert (f"{run_dir} holds a run; this command resumes it from checkpoint phase01-step000000002" in out) \
            != refused, out
        assert (f"{run_dir} holds a run that this command refuses (why: below)" in out) == refused, out
        assert (f"{REFUSED}  {run_dir} holds a run of a different recipe (model.depth differ)" in out) == refused, out
        assert main([*argv, "--dry-run", "--restart"]) == 0
        assert "holds a run" not in capsys.readouterr().out  # --restart starts over: nothing resumed or refused
    assert sorted(p.name for p in run_dir.rglob("*")) == files


def test_a_plan_on_a_finished_run_of_another_recipe_says_the_command_refuses_it(tmp_path, synth_corpus, capsys):
    """A finished run is "nothing left to train" only for its own recipe: for another one (here a fine-tuning run
    where pretraining plans) the plan says what the command does, refuse it, and why under a heading of its own,
    not among the files a run would miss."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ledger = Ledger("acc")
    for i in range(2):  # recipes/synth_pretrain.yaml's two phases, both ended
        ledger.start_phase(i, name=f"p{i}", compression="none", factor=1, flops_per_sample=1)
        ledger.end_phase(i, "length", "planned length")
    ledger.write(run_dir / "ledger.json")
    (run_dir / "model.safetensors").write_bytes(b"")
    (run_dir / "recipe.yaml").write_text("task: {name: synth}\n")
    argv = ["--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(synth_corpus)]
    assert main([*argv, "--dry-run"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "nothing left to train" not in out and "files a run needs" not in out, out
    assert f"run directory: {run_dir} holds a run that this command refuses (why: below) (--restart starts over)" \
        in out
    refusal = f"{run_dir} holds a fine-tuning run ({run_dir / 'recipe.yaml'}), and this command is pretraining"
    assert f"{REFUSED}  {refusal}" in out, out
    assert main(argv) == 2  # as the command does
    assert refusal in capsys.readouterr().err
    # fine-tuning's plan the same way, on a finished pretraining run of one phase
    (run_dir / "recipe.yaml").write_text("ssast: {}\n")
    ledger = Ledger("acc")
    ledger.start_phase(0, name="p0", compression="none", factor=1, flops_per_sample=1)
    ledger.end_phase(0, "length", "planned length")
    ledger.write(run_dir / "ledger.json")
    argv = ["--init", "none", "--task", "synth", "--data-root", str(_synth_root(tmp_path, synth_corpus)),
            "--run-dir", str(run_dir), "--set", "phases=[{compression: none, epochs: 1}]"]
    assert finetune([*argv, "--dry-run"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "nothing left to train" not in out and "files a run needs" not in out, out
    assert f"{REFUSED}  {run_dir} holds a pretraining run" in out, out


def test_a_recipe_yaml_without_any_checkpoint_is_replaced(tmp_path, synth_corpus):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("model: {depth: 7}\n")  # left by an older version's failed start
    assert _run(run_dir, synth_corpus, stop=1) == 0
    assert "depth: 7" not in (run_dir / "recipe.yaml").read_text()


@pytest.mark.slow
def test_resuming_with_a_lower_learning_rate_is_recorded(tmp_path, synth_corpus, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    poison_loss_at(monkeypatch, 3)  # after the checkpoint at step 2
    assert _run(run_dir, synth_corpus) == 1
    err = capsys.readouterr().err
    assert "--set optim.lr=" in err and "phase01-step000000002" in err
    monkeypatch.undo()
    # anything but learning-rate and schedule settings is still refused, and the message says what may change
    assert _run(run_dir, synth_corpus, "optim.lr=5e-4", "model.depth=1") == 2
    err = capsys.readouterr().err
    assert "model.depth" in err and "optim.lr" in err and "phases.N.lr" in err and "optim.warmup_steps" in err
    # the documented recovery: the same command with a lower learning rate resumes
    assert _run(run_dir, synth_corpus, "optim.lr=5e-4", "optim.patience=5") == 0
    assert "with changed optim.lr 0.001 -> 0.0005, optim.patience 2 -> 5; recorded in ledger.json" in \
        capsys.readouterr().err
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["interventions"] == [{"step": 2, "phase": 0, "changes": {
        "optim.lr": {"from": 1e-3, "to": 5e-4}, "optim.patience": {"from": 2, "to": 5}}}]
    assert ledger["total"]["steps"] == 6
    assert "lr: 0.0005" in (run_dir / "recipe.yaml").read_text()
    # the new learning rate is the one used from step 3 on (warm-up is 2 steps), not the checkpoint's
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    lr = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lr[2] == pytest.approx(1e-3, rel=1e-6) and lr[3] == pytest.approx(5e-4, rel=1e-3)
    # the same command again: the run is complete and no second intervention is recorded
    assert _run(run_dir, synth_corpus, "optim.lr=5e-4", "optim.patience=5") == 0
    assert len(json.loads((run_dir / "ledger.json").read_text())["interventions"]) == 1
    # a change to a complete run trains nothing and is not said to be recorded
    assert _run(run_dir, synth_corpus, "optim.lr=1e-4", "optim.patience=5") == 0
    err = capsys.readouterr().err
    assert "the run is complete: changed optim.lr 0.0005 -> 0.0001 trains nothing" in err and "recorded in" not in err
    assert len(json.loads((run_dir / "ledger.json").read_text())["interventions"]) == 1


def test_the_lr_schedule_takes_its_peak_from_the_recipe_on_resume():
    from common.training.optim import LRSchedule, OptimConfig

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = LRSchedule(opt, OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"), 1e-3)
    old.step()
    new = LRSchedule(opt, OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"), 1e-4)
    new.load_state_dict(old.state_dict())
    assert new.steps == 1 and new.get_last_lr() == [pytest.approx(1e-4)]


def test_the_ledger_keeps_interventions_through_a_round_trip():
    from common.training.ledger import Ledger

    ledger = Ledger("acc")
    ledger.add_intervention(step=40, phase=1, changes={"optim.lr": {"from": 1e-4, "to": 5e-5}})
    again = Ledger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert again.interventions == [{"step": 40, "phase": 1, "changes": {"optim.lr": {"from": 1e-4, "to": 5e-5}}}]
    assert "interventions" not in Ledger("acc").to_dict()


@pytest.mark.slow
def test_a_resume_that_validates_on_another_share_is_recorded(tmp_path, synth_corpus):
    """Which validation clips are scored (``train.eval_batches`` x ``data.eval_batch_size``) may change on resume,
    but the schedule, the criteria and the best epoch then compare scores of two sets: the ledger says so."""
    run_dir = tmp_path / "run"
    assert _run(run_dir, synth_corpus, stop=2) == 0
    assert _run(run_dir, synth_corpus, "train.eval_batches=2") == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["interventions"] == [{"step": 2, "phase": 0, "changes": {
        "train.eval_batches": {"from": 1, "to": 2}}}]


@pytest.mark.slow
def test_a_resume_naming_the_recipe_otherwise_is_the_same_run(tmp_path, synth_corpus, monkeypatch):
    """``--recipe`` relative to the repository and the same file by its absolute path are one recipe (its baseline
    recipe's path was stored as spelled, and the resume refused as "a different recipe")."""
    from tests.helpers import ROOT

    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "run"
    sets = tiny(synth_corpus, "baseline=synth_pretrain_baseline.yaml")
    assert main(["--recipe", "recipes/synth_pretrain.yaml", "--run-dir", str(run_dir), *sets,
                 "--stop-after-steps", "2"]) == 0
    assert main(["--recipe", str(ROOT / "recipes" / "synth_pretrain.yaml"), "--run-dir", str(run_dir), *sets]) == 0
    from common.training.run_recipe import recipe_diff  # a recipe.yaml of an older version: the path as typed

    assert recipe_diff({"baseline": "recipes/synth_pretrain_baseline.yaml"},
                       {"baseline": str(ROOT / "recipes" / "synth_pretrain_baseline.yaml")}) == []
    assert recipe_diff({"baseline": "recipes/synth_pretrain_baseline.yaml"},
                       {"baseline": str(ROOT / "recipes" / "ssast_baseline.yaml")}) == ["baseline"]


@pytest.mark.slow
def test_tensorboard_keeps_one_history_when_a_crash_undid_logged_steps(tmp_path, synth_corpus, monkeypatch):
    """A crash after step 5 (checkpoints at 2 and 4): steps 5 was logged, then trained again from step 4's
    checkpoint. TensorBoard shows each step once, the resumed run's (the earlier launch's step 5 is purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.ssast import SSASTObjective

    real, calls = SSASTObjective.train_step, {"n": 0}

    def crashing(self, *args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("the node went away")
        return real(self, *args)

    monkeypatch.setattr(SSASTObjective, "train_step", crashing)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the node went away"):
        _run(run_dir, synth_corpus, "phases.0.steps=6", "train.eval_every=100")
    monkeypatch.undo()
    assert _run(run_dir, synth_corpus, "phases.0.steps=6", "train.eval_every=100") == 0
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[:6] == [1, 2, 3, 4, 5, 6], steps
    # a crash before the first checkpoint: the run starts again from step 0, and so does its history
    calls["n"] = 0
    monkeypatch.setattr(SSASTObjective, "train_step", crashing)
    early = tmp_path / "early"
    with pytest.raises(RuntimeError, match="the node went away"):
        _run(early, synth_corpus, "phases.0.steps=6", "train.eval_every=100", "train.save_every=100")
    monkeypatch.undo()
    assert _run(early, synth_corpus, "phases.0.steps=6", "train.eval_every=100", "train.save_every=100") == 0
    events = EventAccumulator(str(early / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[:6] == [1, 2, 3, 4, 5, 6], steps


def _without(data: dict, key: str) -> dict:
    """``data`` (a nested recipe dict) without the flattened ``key``."""
    head, _, rest = key.partition(".")
    if not rest:
        return {k: v for k, v in data.items() if k != head}
    return {**data, head: _without(data[head], rest)}


def test_a_recipe_yaml_written_before_a_key_existed_resumes():
    """A run's recipe.yaml lacks every key added after it started: the resume reads each as its default, which keeps
    the behaviour from before the key (``data.shuffle_buffer``, added later, refused every older run), or as the
    behaviour from before it where the default is another (``BEFORE_KEY``, ``data.channels``: refused unless the
    recipe says that behaviour, as ``--set`` can); a value other than the default is a change."""
    import yaml

    from common.config.recipe import parse_yaml, to_dict
    from common.training.run_recipe import BEFORE_KEY, LOCATIONS, RESUMABLE_CHANGES, field_defaults, recipe_diff
    from common.training.run_recipe import flat_keys as _flatten
    from finetune.recipe import load_recipe as finetuning
    from pretrain.recipe import load_recipe as pretraining
    from tests.helpers import ROOT

    for recipe in (pretraining(ROOT / "recipes" / "ssast_fshift4.yaml"), finetuning("vggsound"),
                   finetuning("esc50", ROOT / "recipes" / "htsat_esc50.yaml")):
        new, defaults = parse_yaml(yaml.safe_dump(to_dict(recipe), sort_keys=False)), field_defaults(recipe)
        flat = _flatten(new)
        keys = [k for k in flat if k in defaults and flat[k] == defaults[k]]  # what a new key holds in a run
        assert "data.shuffle_buffer" in keys and len(keys) > 40
        for key in keys:  # data.channels: before the key, the first channel was read, not HTS-AT's mean (`auto`)
            changed = (key == "data.channels" and recipe.model.arch == "htsat"
                       or BEFORE_KEY.get(key, flat[key]) != flat[key])
            assert recipe_diff(_without(new, key), new, defaults) == ([key] if changed else []), key
        assert {"data.shuffle", "data.full_shuffle_max", "data.train_crop"} <= set(keys)
        before = parse_yaml(yaml.safe_dump(to_dict(recipe), sort_keys=False))  # --set to the old behaviour: resumes
        before["data"].update(shuffle="buffer", full_shuffle_max=0, train_crop="random")
        old = new
        for key in BEFORE_KEY:
            old = _without(old, key)
        assert recipe_diff(old, before, defaults) == []
        other = next(k for k in flat if k in defaults and flat[k] != defaults[k] and not k.startswith("data.train")
                     and not LOCATIONS.fullmatch(k) and not k.startswith(RESUMABLE_CHANGES))  # (where the data
        # is: compared by what it holds; what a resume may change)
        assert recipe_diff(_without(new, other), new, defaults) == [other]  # the run had the default then
        changed = parse_yaml(yaml.safe_dump(to_dict(recipe), sort_keys=False))
        changed["data"]["shuffle_buffer"] = 1000
        assert recipe_diff(_without(new, "data.shuffle_buffer"), changed, defaults) == ["data.shuffle_buffer"]


def test_a_run_whose_recipe_yaml_predates_a_key_is_told_the_value_it_had(tmp_path):
    """Refused for a key whose default is not what the run did (``BEFORE_KEY``), the error gives the ``--set`` that
    resumes it; with it, the resume goes on."""
    from dataclasses import replace

    import yaml

    from common.config.recipe import RecipeError, to_dict
    from common.training.run_dir import prepare_run_dir
    from finetune.recipe import load_recipe

    recipe = load_recipe("esc50")
    old = to_dict(recipe)
    del old["data"]["shuffle"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    (tmp_path / "checkpoints" / "phase01-step000000001").mkdir(parents=True)
    with pytest.raises(RecipeError, match=r"data.shuffle differ.*recipe.yaml predates data.shuffle: the run had "
                                          r"--set data.shuffle=buffer\)"):
        prepare_run_dir(tmp_path, recipe, True)
    resumed = prepare_run_dir(tmp_path, replace(recipe, data=replace(recipe.data, shuffle="buffer")), True)
    assert resumed.changes == {}


def test_a_recorded_zero_stage_resumes_under_auto_where_auto_takes_that_stage(tmp_path):
    """A run recorded with ``train.zero_stage: 0`` (the default before ``auto``) resumed by a recipe of ``auto``:
    the same recipe where ``auto`` gives the recorded stage (a resumed run keeps its checkpoint's; a fold not started
    takes 0 on one rank, 1 on several); elsewhere the refusal gives the ``--set`` that resumes it."""
    from dataclasses import replace

    import yaml

    from common.config.recipe import RecipeError, to_dict
    from common.training.run_dir import prepare_run_dir
    from finetune.recipe import load_recipe

    def recorded(run_dir, recipe, stage, trained):
        old = to_dict(recipe)
        old["train"]["zero_stage"] = stage
        run_dir.mkdir()
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
        (run_dir / trained / "checkpoints" / "phase01-step000000001").mkdir(parents=True)
        return run_dir

    one = load_recipe("vggsound")  # one run, resumed from its checkpoints: on its stage whatever the ranks
    single = recorded(tmp_path / "single", one, 0, ".")
    for ranks in (1, 4):
        assert prepare_run_dir(single, one, True, world_size=ranks).changes == {}
    two = recorded(tmp_path / "two", one, 2, ".")  # a checkpoint written before stages were recorded reads as 1
    with pytest.raises(RecipeError, match=r"train.zero_stage differ.*\(the run trained with ZeRO stage 2: --set "
                                          r"train.zero_stage=2 resumes it so\)$"):
        prepare_run_dir(two, one, True, world_size=1)
    assert prepare_run_dir(two, replace(one, train=replace(one.train, zero_stage=2)), True).changes == {}

    folds = load_recipe("esc50")  # fold 1 started, folds 2-5 start under auto: 0 on one rank, 1 on several
    cv = recorded(tmp_path / "cv", folds, 0, "fold1")
    assert prepare_run_dir(cv, folds, True, world_size=1).changes == {}
    with pytest.raises(RecipeError, match=r"\(train.zero_stage differ\).*--set train.zero_stage=0 resumes it so"):
        prepare_run_dir(cv, folds, True, world_size=2)
    assert prepare_run_dir(cv, replace(folds, train=replace(folds.train, zero_stage=0)), True,
                           world_size=2).changes == {}


def test_a_run_directory_of_the_other_command_is_named_as_such(tmp_path):
    """A fine-tuning command given a pretraining run's directory (or the reverse) is told what the folder holds,
    not that some twenty keys differ."""
    import yaml

    from common.config.recipe import RecipeError, to_dict
    from common.training.run_dir import prepare_run_dir
    from finetune.recipe import load_recipe as finetuning
    from pretrain.recipe import load_recipe as pretraining
    from tests.helpers import RECIPE

    for held, given, said in ((pretraining(RECIPE, []), finetuning("esc50"), "a pretraining run"),
                              (finetuning("esc50"), pretraining(RECIPE, []), "a fine-tuning run")):
        run_dir = tmp_path / said.replace(" ", "-")
        (run_dir / "checkpoints" / "phase01-step000000001").mkdir(parents=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(held), sort_keys=False))
        other = "fine-tuning" if "pretraining" in said else "pretraining"
        with pytest.raises(RecipeError, match=f"^{run_dir} holds {said} \\({run_dir / 'recipe.yaml'}\\), and this "
                                              f"command is {other}: use a new --run-dir"):
            prepare_run_dir(run_dir, given, True)


def test_a_tensorboard_file_opened_in_the_same_second_sorts_after_the_last(tmp_path):
    """TensorBoard reads event files in name order (second, host, pid, a counter): a writer opened in the second of
    an earlier one of the same process (a resume at once) could sort before it, and its events were dropped."""
    import os
    import socket
    import time

    from common.system.logger import Scalars

    (tmp_path / "tb").mkdir()
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.99999"
    earlier = tmp_path / "tb" / name
    earlier.write_bytes(b"")
    scalars = Scalars(tmp_path, enabled=True)
    scalars.log({"train/loss": 1.0}, 0)
    scalars.close()
    assert sorted(p.name for p in (tmp_path / "tb").iterdir())[-1] != earlier.name


@pytest.mark.parametrize("text, said", [("model: {depth: 2\n", "not valid YAML"),
                                        ("- model\n", "holds a list, not a recipe's mapping of sections")])
def test_a_run_whose_recipe_yaml_no_longer_parses_is_refused_in_one_line(tmp_path, synth_corpus, capsys, text, said):
    """RUN/recipe.yaml damaged (edited by hand, truncated) after the run's first checkpoint: the resume and its plan
    refuse in one line naming the file and what to do (it was a traceback from yaml or from the recipe diff)."""
    run_dir = tmp_path / "run"
    assert _run(run_dir, synth_corpus, stop=2) == 0
    path = run_dir / "recipe.yaml"
    path.write_text(text)
    capsys.readouterr()
    assert _run(run_dir, synth_corpus) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert line.startswith(f"error: {path}: {said}") and "--restart" in line and "Traceback" not in err, err
    argv = ["--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(synth_corpus), "--dry-run"]
    assert main(argv) == PLAN_NOT_READY
    assert f"{path}: {said}" in capsys.readouterr().out
    assert path.read_text() == text and (run_dir / "checkpoints" / "phase01-step000000002").is_dir()
