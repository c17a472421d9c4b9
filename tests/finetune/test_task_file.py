"""A user's task file behaves as written: paths relative to it, recipe sections beside the task fields,
validated epochs, and defaults (warm-up) that suit the user's data and are said."""

import json
import re
from pathlib import Path

import pytest

from common.config.recipe import RecipeError
from finetune.recipe import load_recipe
from finetune.task_file import auto_warmup


def task_file(folder: Path, corpus: Path, extra: str = "", nested: bool = False) -> Path:
    """A task file in ``folder`` whose manifests are those of the test corpus (24 train clips), copied next to it."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("synth_train.jsonl.gz", "synth_valid.jsonl.gz", "synth_classes.json"):
        (data / name).write_bytes((corpus / name).read_bytes())
    fields = ("name: mine\ntrain: [data/synth_train.jsonl.gz]\nvalid: [data/synth_valid.jsonl.gz]\n"
              "classes: data/synth_classes.json\ntarget_frames: 128\n")
    if nested:
        fields = "task:\n" + "".join(f"  {line}\n" for line in fields.splitlines())
    path = folder / "mine.yaml"
    path.write_text(fields + extra)
    return path


def test_norm_is_relative_to_the_task_file(tmp_path, synth_corpus, monkeypatch):
    path = task_file(tmp_path / "project", synth_corpus, "norm: data/mine.stats.json\n")
    (tmp_path / "project" / "data" / "mine.stats.json").write_text(json.dumps({"mean": -5.0, "std": 4.0}))
    monkeypatch.chdir(tmp_path)  # the working directory has no data/mine.stats.json
    recipe = load_recipe(str(path))
    assert recipe.task.norm == str(tmp_path / "project" / "data" / "mine.stats.json")
    from common.audio.fbank import resolve_norm_stats
    assert resolve_norm_stats(recipe.audio().norm).mean == -5.0
    assert load_recipe(str(task_file(tmp_path / "p2", synth_corpus, "norm: esc50\n"))).task.norm == "esc50"


@pytest.mark.parametrize("nested", [False, True])
def test_recipe_sections_beside_the_task_fields_are_honoured(tmp_path, synth_corpus, nested):
    extra = ("optim: {lr: 3.0e-4, warmup_steps: 5, schedule: cosine}\nmodel: {size: tiny}\n"
             "augment: {freqm: 8, timem: 16}\ndata: {batch_size: 6}\nepochs: 3\n")
    recipe = load_recipe(str(task_file(tmp_path, synth_corpus, extra, nested=nested)))
    assert (recipe.optim.lr, recipe.optim.warmup_steps, recipe.optim.schedule) == (3e-4, 5, "cosine")
    assert recipe.model.size == "tiny" and (recipe.augment.freqm, recipe.augment.timem) == (8, 16)
    assert recipe.data.batch_size == 6 and [p.epochs for p in recipe.phases] == [3]
    # a --recipe file and --set still come on top
    over = tmp_path / "over.yaml"
    over.write_text("optim: {lr: 1.0e-4}\n")
    recipe = load_recipe(str(task_file(tmp_path, synth_corpus, extra, nested=nested)), over, ["data.batch_size=2"])
    assert (recipe.optim.lr, recipe.optim.schedule, recipe.data.batch_size) == (1e-4, "cosine", 2)


def test_the_train_section_beside_a_task_section(tmp_path, synth_corpus):
    recipe = load_recipe(str(task_file(tmp_path, synth_corpus, "train: {seed: 7}\n", nested=True)))
    assert recipe.train.seed == 7 and recipe.task.train == [str(tmp_path / "data" / "synth_train.jsonl.gz")]
    flat = tmp_path / "flat.yaml"
    flat.write_text("name: x\nclasses: c.json\ntrain: {seed: 7}\n")
    with pytest.raises(RecipeError, match="train: in a flat task file, train: lists the training manifests"):
        load_recipe(str(flat))


def test_warm_up_is_scaled_to_the_data_and_said(tmp_path, synth_corpus):
    notes: list[str] = []  # the package's bare defaults (a published recipe's: tests/finetune/test_task_defaults.py)
    recipe = load_recipe(str(task_file(tmp_path, synth_corpus, "defaults: package\n")), overrides=["data.batch_size=4"],
                         notes=notes)
    assert recipe.optim.warmup_steps == 3  # 24 clips / 4 per step = 6 steps per epoch: the first half
    assert "warm-up 3 steps (the first half of the first epoch: 24 clips at 4 per step" in notes[0]
    assert "lr 0.0001" in notes[0] and "no augmentation" in notes[0] and "model size base" in notes[0]
    # a warm-up given anywhere is kept
    assert load_recipe(str(task_file(tmp_path, synth_corpus, "optim: {warmup_steps: 50}\n"))).optim.warmup_steps == 50
    given = load_recipe(str(task_file(tmp_path, synth_corpus)), overrides=["data.batch_size=4", "optim.warmup_steps=0"])
    assert given.optim.warmup_steps == 0
    # the registered tasks keep their published recipes
    assert load_recipe("vggsound").optim.warmup_steps == 1000


def test_auto_warmup_rule():
    assert auto_warmup(24, 4) == 3 and auto_warmup(25, 4) == 3 and auto_warmup(2, 24) == 1
    assert auto_warmup(2_000_000, 12) == 1000  # AST's 1000 steps at most


def test_dry_run_says_which_defaults_apply(tmp_path, synth_corpus, capsys):
    from finetune.run import main

    assert main(["--init", "none", "--task", str(task_file(tmp_path, synth_corpus, "defaults: package\n")),
                 "--dry-run", "--set", "data.batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "optimiser adam, lr 0.0001, warm-up 2 steps, plateau schedule" in out
    assert "batch: 8 clips per step = 8 per rank x 1 rank(s) x 1 accumulation" in out  # data.batch_size is global
    assert "task file mine: package defaults (defaults: package): warm-up 2 steps" in out


def test_the_linear_probe_names_a_task_files_unknown_key_in_one_line(tmp_path, capsys):
    """A typo in a task file (``epoch:``) is one line naming the key and what the file may hold, in the linear
    probe as in fine-tuning (the probe raised a TypeError traceback)."""
    from finetune.linear_probe import main as probe

    task = tmp_path / "mine.yaml"
    task.write_text("name: mine\ntrain: [a.jsonl.gz]\nvalid: [b.jsonl.gz]\nclasses: c.json\nepoch: 2\n")
    assert probe(["--init", "none", "--task", str(task)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: epoch: unknown key in {task}") and "epochs" in err[0], err
    assert "(did you mean epochs? task fields: " in err[0], err  # a flat file's epochs is one letter off


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "a/b", "a\\b", "..", ".", ""])
def test_a_task_name_that_is_not_one_plain_name_is_refused_naming_the_file(tmp_path, synth_corpus, monkeypatch, name,
                                                                           capsys):
    """The run directory is ``runs/finetune/<task name>-...``: a downloaded task file's ``name: ../../x`` (or an
    absolute one, which replaces the base) moved it anywhere. It is one line naming the key and the file, before
    anything is written."""
    from finetune.run import main as finetune

    path = task_file(tmp_path / "project", synth_corpus)
    path.write_text(path.read_text().replace("name: mine", f"name: {json.dumps(name)}"))
    with pytest.raises(RecipeError, match=rf"^task\.name: .* must be one plain name.*\(in {path}\)$"):
        load_recipe(str(path))
    monkeypatch.chdir(tmp_path)
    assert finetune(["--init", "none", "--task", str(path), "--set", "data.num_workers=0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: task.name: ") and str(path) in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escaped-baseline").exists()


def test_a_task_name_from_the_file_name_or_set_is_checked_too(tmp_path, synth_corpus):
    """Without ``name:`` the file's stem names the task (``..yaml`` gives ``.``); ``--set task.name=`` is checked
    as the file's key is."""
    path = task_file(tmp_path, synth_corpus)
    dots = path.with_name("..yaml")
    dots.write_text(path.read_text().replace("name: mine\n", ""))
    with pytest.raises(RecipeError, match=r"^task\.name: '\.' must be one plain name"):
        load_recipe(str(dots))
    with pytest.raises(RecipeError, match=r"^task\.name: '/x/y' .*\(--set task\.name=/x/y\)$"):
        load_recipe(str(path), overrides=["task.name=/x/y"])
    assert load_recipe(str(path), overrides=["task.name=mine-2.b_c"]).task.name == "mine-2.b_c"


def test_a_misspelt_recipe_section_beside_task_is_given_its_likely_name(tmp_path):
    """In the ``task:`` layout a key beside ``task:`` one letter off a recipe section names the section it likely
    is; one close to nothing lists the sections alone."""
    from finetune.task_file import task_source

    task = tmp_path / "mine.yaml"
    for key, hint in (("optimm", "(did you mean optim? task fields go under task:"),
                      ("zzz", "(task fields go under task:")):
        task.write_text(f"task:\n  name: mine\n{key}: {{lr: 1.0e-3}}\n")
        with pytest.raises(RecipeError, match="^" + re.escape(f"{key}: unknown key in {task} {hint}")):
            task_source(str(task))


def test_a_decaying_schedules_floor_is_said_with_it():
    """The line that says a task's schedule says its min_lr floor where it has one."""
    from common.training.optim import OptimConfig
    from finetune.task_file import _schedule

    assert _schedule(OptimConfig(patience=1)) == "plateau schedule (x0.5 after more than 1 epochs without improvement)"
    assert _schedule(OptimConfig(schedule="multistep", decay_every=1, decay_start=2, min_lr=1e-6)) == \
        "multistep schedule (x0.5 every epoch from epoch 2, no lower than 1e-06)"


def test_a_misspelt_field_under_task_is_named_under_task():
    """In the task: layout a misspelt task field is task.KEY, with the task's fields alone (the check ran after
    task: was taken out of the file and read every file as flat: no task. prefix, the recipe sections offered)."""
    import tempfile

    from finetune.task_file import task_source

    with tempfile.TemporaryDirectory() as folder:
        task = Path(folder) / "mine.yaml"
        task.write_text("task:\n  name: mine\n  clases: c.json\n")
        with pytest.raises(RecipeError, match="^" + re.escape(f"task.clases: unknown key in {task} (did you mean "
                                                              f"classes? task fields: ")) as err:
            task_source(str(task))
        assert "beside them" not in str(err.value)
