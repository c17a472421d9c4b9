"""Broken recipes, task files and --set values: all rejected before any compute, naming the key (or file).

"Before any compute" is checked three ways for every case: the entry point returns 2, the run directory is
never created, and no encoder is ever constructed (ASTEncoder.__init__ is replaced by a tripwire).
"""

import gzip
import json
from pathlib import Path

import pytest

from common.config.recipe import RecipeError, apply_overrides, load_yaml, parse_yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "synth_pretrain.yaml"
TINY_FT = ["model.size=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.batch_size=4",
           "data.num_workers=0", "optim.warmup_steps=0"]


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """Files a recipe can point at, broken in the ways real ones are."""
    d = tmp_path_factory.mktemp("broken")
    (d / "garbage.jsonl.gz").write_bytes(b"\x00\xffnot gzip at all" * 8)
    (d / "text.jsonl.gz").write_text("just some text\n")
    with gzip.open(d / "empty.jsonl.gz", "wt"):
        pass
    with gzip.open(d / "notcuts.jsonl.gz", "wt") as handle:
        handle.write('{"hello": "world"}\n')
    (d / "shar_without_shards").mkdir()
    (d / "shar_missing_tar").mkdir()  # two cuts shards, one audio tar
    for n in range(2):
        with gzip.open(d / "shar_missing_tar" / f"cuts.00000{n}.jsonl.gz", "wt") as handle:
            handle.write('{"id": "clip", "start": 0, "duration": 1, "channel": 0}\n')
    (d / "shar_missing_tar" / "recording.000000.tar").write_bytes(b"")
    (d / "invalid.json").write_text("{mean: ")
    (d / "nomean.json").write_text(json.dumps({"std": 4.5}))
    (d / "folder.json").mkdir()
    (d / "badclasses.json").write_text(json.dumps({"classes": ["a", "a"]}))
    (d / "broken.yaml").write_text("phases: [\n")
    (d / "extends_missing.yaml").write_text("extends: nowhere.yaml\n")
    (d / "extends_broken.yaml").write_text("extends: broken.yaml\n")
    (d / "cycle_a.yaml").write_text("extends: cycle_b.yaml\n")
    (d / "cycle_b.yaml").write_text("extends: cycle_a.yaml\n")
    (d / "a_list.yaml").write_text("- phases\n- model\n")
    (d / "twice.yaml").write_text(f"extends: {RECIPE}\ndata:\n  batch_size: 16\n  batch_size: 8\n")
    (d / "unknown_key_baseline.yaml").write_text(f"extends: {RECIPE}\nbaseline: null\nmodel: {{sise: tiny}}\n")
    (d / "baseline_missing.yaml").write_text(f"extends: {RECIPE}\nbaseline: nowhere_baseline.yaml\n")
    (d / "baseline_broken.yaml").write_text(f"extends: {RECIPE}\nbaseline: unknown_key_baseline.yaml\n")
    (d / "task_scalar.yaml").write_text("task: vggsound\nphases: [{compression: none, epochs: 2}]\n")
    return d


@pytest.fixture
def tripwire(monkeypatch):
    from common.models.ast import encoder as model

    def no_model(self, *args, **kwargs):
        raise AssertionError("a model was built before the recipe was rejected")

    monkeypatch.setattr(model.ASTEncoder, "__init__", no_model)


# (id, recipe file or None, --set values, what the error must name)
PRETRAIN_CASES = [
    ("valid manifest missing", None, ["data.valid=[/nonexistent/valid.jsonl.gz]"], "data.valid.0"),
    ("valid manifest not gzip", None, ["data.valid=[{broken}/garbage.jsonl.gz]"], "data.valid.0"),
    ("valid manifest plain text", None, ["data.valid=[{broken}/text.jsonl.gz]"], "data.valid.0"),
    ("valid manifest empty", None, ["data.valid=[{broken}/empty.jsonl.gz]"], "data.valid.0"),
    ("valid manifest not cuts", None, ["data.valid=[{broken}/notcuts.jsonl.gz]"], "data.valid.0"),
    ("train manifest missing", None, ["data.train=[{{path: /nonexistent/train.jsonl.gz}}]"], "data.train.0.path"),
    ("train manifest not gzip", None, ["data.train=[{{path: {broken}/garbage.jsonl.gz}}]"], "data.train.0.path"),
    ("train Shar folder empty", None, ["data.train=[{{path: {broken}/shar_without_shards}}]"], "data.train.0.path"),
    ("train Shar folder missing a tar", None, ["data.train=[{{path: {broken}/shar_missing_tar}}]"],
     "data.train.0.path: Shar folder"),
    ("eval_batches 0", None, ["train.eval_batches=0"], "train.eval_batches"),
    ("eval_batches negative", None, ["train.eval_batches=-2"], "train.eval_batches"),
    ("beta1 = 1", None, ["optim.betas=[1.0, 0.999]"], "optim.betas"),
    ("beta2 > 1", None, ["optim.betas=[0.9, 1.5]"], "optim.betas"),
    ("beta negative", None, ["optim.betas=[-0.1, 0.999]"], "optim.betas"),
    ("weight_decay negative", None, ["optim.weight_decay=-0.0001"], "optim.weight_decay"),
    ("head_lr_scale negative", None, ["optim.head_lr_scale=-1"], "optim.head_lr_scale"),
    ("min_lr negative", None, ["optim.min_lr=-0.000001"], "optim.min_lr"),
    ("drop_path_rate 1", None, ["model.drop_path_rate=1.0"], "model.drop_path_rate"),
    ("drop_path_rate negative", None, ["model.drop_path_rate=-0.1"], "model.drop_path_rate"),
    ("norm unknown name", None, ["audio.norm=audioseet"], "audio.norm"),
    ("norm file missing", None, ["audio.norm=/nonexistent/stats.json"], "audio.norm"),
    ("norm file not JSON", None, ["audio.norm={broken}/invalid.json"], "audio.norm"),
    ("norm file without mean", None, ["audio.norm={broken}/nomean.json"], "got keys ['std']"),  # its own keys
    ("norm a folder", None, ["audio.norm={broken}/folder.json"], "folder.json is a folder"),
    ("--set unparseable", None, ["optim.lr=[1,"], "--set optim.lr"),
    ("--set without =", None, ["optim.lr"], "--set 'optim.lr'"),
    ("--set without key", None, ["=3"], "--set '=3'"),
    ("--set a string for a number", None, ["optim.lr=abc"], "optim.lr"),
    ("--set a newline in a value", None, ["optim.lr=a\nb"], "got 'a b' (--set optim.lr=a\\nb)\n"),  # one line
    ("recipe: a newline in its name", "x\ny.yaml", [], "x\\ny.yaml does not exist\n"),
    ("--set past a list", None, ["phases.5.steps=3"], "phases.5"),
    ("unknown key", None, ["model.sise=tiny"], "model.sise: unknown key (did you mean size? known keys here: arch,"),
    ("unknown key, nothing close", None, ["model.qqq=1"], "model.qqq: unknown key (known keys here: arch,"),
    ("misspelt section", None, ["optm.lr=1"], "optm: unknown key (did you mean optim? known keys here: audio,"),
    ("lr zero", None, ["optim.lr=0"], "optim.lr"),
    ("decay zero", None, ["optim.decay=0"], "optim.decay"),
    ("grad_clip negative", None, ["optim.grad_clip=-1"], "optim.grad_clip"),
    ("batch_size zero", None, ["data.batch_size=0"], "data.batch_size"),
    ("eval_batch_size zero", None, ["data.eval_batch_size=0"], "data.eval_batch_size"),
    ("max_bad_fraction above 1", None, ["data.max_bad_fraction=1.5"], "data.max_bad_fraction"),
    ("manifest weight negative", None, ["data.train.0.weight=-1"], "data.train.0"),
    ("factor does not divide the grid", None, ["phases.0.factor=3"], "phases.0"),
    ("phase batch size zero", None, ["phases.0.batch_size=0"], "phases.0"),
    ("mask ratio above 1", None, ["ssast.mask_ratio=1.5"], "ssast.mask_ratio"),
    ("index into a list the recipe does not write", None, ["optim.betas.0=0.9"],
     "the recipe does not write optim.betas; set the whole list (--set optim.betas=[...])"),
    ("validation mask ratio zero", None, ["ssast.eval_mask_ratio=0"], "ssast.eval_mask_ratio"),
    ("patch of one number", None, ["model.patch=[16]"], "model.patch"),
    ("num_heads zero", None, ["model.num_heads=0"], "model.num_heads"),
    ("zero stage 3", None, ["train.zero_stage=3"], "train.zero_stage"),
    ("zero stage true", None, ["train.zero_stage=true"], "train.zero_stage"),  # true == 1 in Python
    ("zero stage 1.0", None, ["train.zero_stage=1.0"], "train.zero_stage"),
    ("a section with a number for a key", None, ["model={{1: a, size: tiny}}"], "model.1"),
    ("precision fp16", None, ["train.precision=fp16"], "train.precision"),
    ("prefix tokens 3", None, ["model.num_prefix_tokens=3"], "model.num_prefix_tokens"),
    ("epochs in pretraining", None, ["phases.0.epochs=2"], "phases.0"),
    ("recipe: extends a missing file", "extends_missing.yaml", [], "extends_missing.yaml: extends nowhere.yaml"),
    ("recipe: extends broken YAML", "extends_broken.yaml", [], "broken.yaml: not valid YAML"),
    ("recipe: extends in a cycle", "cycle_a.yaml", [], "in a cycle"),
    ("recipe: invalid YAML", "broken.yaml", [], "broken.yaml: not valid YAML: line 2, column 1: expected the node "
                                                "content, but found '<stream end>' (while parsing a flow node)\n"),
    ("recipe: a key written twice", "twice.yaml", [], "twice.yaml: not valid YAML: line 4, column 3: key "
                                                      "'batch_size' is written twice in one mapping (first at line 3)"),
    ("--set: a key written twice", None, ["data={{batch_size: 4, batch_size: 8}}"], "--set data: the value"),
    ("recipe: a list", "a_list.yaml", [], "a_list.yaml: a recipe is a mapping"),
    ("recipe: missing", "nowhere.yaml", [], "nowhere.yaml"),
    ("baseline recipe missing", "baseline_missing.yaml", [], "baseline: recipe nowhere_baseline.yaml not found"),
    ("baseline recipe broken", "baseline_broken.yaml", [], "unknown_key_baseline.yaml: model.sise: unknown key"),
    # a fuzzing review: NaN and inf passed checks written `x <= 0`, huge numbers reached torch as a traceback
    ("mpg_weight NaN", None, ["ssast.mpg_weight=.nan"], "ssast.mpg_weight"),
    ("mpg_weight infinite", None, ["ssast.mpg_weight=.inf"], "ssast.mpg_weight"),
    ("manifest weight NaN", None, ["data.train.0.weight=.nan"], "data.train.0"),
    ("manifest weight infinite", None, ["data.train.0.weight=.inf"], "data.train.0"),
    ("num_mel_bins huge", None, ["audio.num_mel_bins=1000000"], "audio.num_mel_bins"),
    ("target_frames huge", None, ["audio.target_frames=10000000000"], "audio.target_frames"),
    ("frame shift infinite", None, ["audio.frame_shift_ms=.inf"], "audio.frame_shift_ms"),
    ("frame shift under a sample", None, ["audio.sample_rate=3"], "at least one sample"),
    ("sample rate huge", None, ["audio.sample_rate=1000000000000"], "audio.sample_rate"),
    ("seed huge", None, ["train.seed=1000000000000000000000000000000"], "train.seed"),
    ("seed negative", None, ["train.seed=-1"], "train.seed"),
    ("batch_size huge", None, ["data.batch_size=1000000000000000000000000000000"], "data.batch_size"),
]


@pytest.mark.parametrize("case", PRETRAIN_CASES, ids=[c[0] for c in PRETRAIN_CASES])
def test_pretraining_rejects_before_compute(case, broken, synth_corpus, tmp_path, tripwire, capsys):
    from pretrain.run import main

    _, recipe, overrides, key = case
    base = [f"data.train=[{{path: {synth_corpus / 'synth_pool.jsonl.gz'}}}]",
            f"data.valid=[{synth_corpus / 'synth_valid.jsonl.gz'}]", "data.num_workers=0"]
    if recipe is None:
        base.append("baseline=null")
    argv = ["--recipe", str(broken / recipe if recipe else RECIPE), "--run-dir", str(tmp_path / "run"),
            *sets(*base, *(o.format(broken=broken) for o in overrides))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def ft_data(tmp_path, synth_corpus) -> Path:
    data = tmp_path / "data"
    (data / "synth").mkdir(parents=True)
    for f in synth_corpus.glob("synth_*.json*"):
        (data / "synth" / f.name).symlink_to(f)
    return data


def _task_file(tmp_path: Path, synth_corpus: Path, extra: str) -> str:
    path = tmp_path / "task" / "mine.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"name: mine\ntrain: [{synth_corpus / 'synth_train.jsonl.gz'}]\n"
                    f"valid: [{synth_corpus / 'synth_valid.jsonl.gz'}]\n"
                    f"classes: {synth_corpus / 'synth_classes.json'}\ntarget_frames: 64\n{extra}")
    return str(path)


# (id, task file body after the fields (None: the registered synth task), --recipe, --set, what the error names)
FINETUNE_CASES = [
    ("valid manifest missing", None, None, ["task.valid=[/nonexistent/valid.jsonl.gz]"], "task.valid.0"),
    ("valid manifest not gzip", None, None, ["task.valid=[{broken}/garbage.jsonl.gz]"], "task.valid.0"),
    ("valid manifest empty", None, None, ["task.valid=[{broken}/empty.jsonl.gz]"], "task.valid.0"),
    ("train manifest missing", None, None, ["task.train=[/nonexistent/train.jsonl.gz]"], "task.train.0"),
    ("test manifest missing", None, None, ["task.test=[/nonexistent/test.jsonl.gz]"], "task.test.0"),
    ("class list missing", None, None, ["task.classes=/nonexistent/classes.json"], "task.classes"),
    ("class list with duplicates", None, None, ["task.classes={broken}/badclasses.json"], "task.classes"),
    ("norm unknown name", None, None, ["task.norm=audiosett"], "task.norm"),
    ("norm file missing", None, None, ["task.norm=/nonexistent/stats.json"], "task.norm"),
    ("norm file not JSON", None, None, ["task.norm={broken}/invalid.json"], "task.norm"),
    ("eval_batches 0", None, None, ["train.eval_batches=0"], "train.eval_batches"),
    ("beta2 = 1", None, None, ["optim.betas=[0.9, 1.0]"], "optim.betas"),
    ("weight_decay negative", None, None, ["optim.weight_decay=-1"], "optim.weight_decay"),
    ("head_lr_scale negative", None, None, ["optim.head_lr_scale=-0.5"], "optim.head_lr_scale"),
    ("min_lr negative", None, None, ["optim.min_lr=-1"], "optim.min_lr"),
    ("drop_path_rate 1.5", None, None, ["model.drop_path_rate=1.5"], "model.drop_path_rate"),
    ("--set unparseable", None, None, ["optim.lr=[1,"], "--set optim.lr"),
    ("mixup above 1", None, None, ["augment.mixup=1.5"], "augment.mixup"),
    ("freqm negative", None, None, ["augment.freqm=-1"], "augment.freqm"),
    ("unknown pooling", None, None, ["head.pool=max"], "head.pool"),
    ("steps in fine-tuning", None, None, ["phases=[{{compression: none, steps: 10}}]"], "phases.0.steps"),
    ("weight average from 0", None, None, ["train.weight_average_from=0"], "train.weight_average_from"),
    ("target_frames 8", None, None, ["task.target_frames=8"], "task.target_frames"),
    ("batch_size zero", None, None, ["data.batch_size=0"], "data.batch_size"),
    ("manifests in the data section", None, None, ["data.valid=[x.jsonl.gz]"], "data.train / data.valid"),
    ("recipe: extends a missing file", None, "extends_missing.yaml", [], "extends_missing.yaml: extends nowhere"),
    ("recipe: invalid YAML", None, "broken.yaml", [], "broken.yaml: not valid YAML"),
    ("recipe: a folder", None, ".", [], "is a folder; name a recipe file"),
    ("task file: epochs abc", "epochs: abc\n", None, [], "epochs: expected a whole number"),
    ("task file: epochs 2.7", "epochs: 2.7\n", None, [], "got 2.7"),
    ("task file: epochs 0", "epochs: 0\n", None, [], "epochs: expected a whole number"),
    ("task file: epochs and phases", "epochs: 2\nphases: [{compression: none, epochs: 2}]\n", None, [],
     "epochs: give epochs or phases"),
    ("task file: unknown key", "optimiser: {lr: 1.0e-3}\n", None, [], "optimiser: unknown key in"),
    ("task file: typo of epochs", "epoch: 2\n", None, [], "epochs and the recipe sections phases, model"),
    ("task file: typo of a field", "clases: c.json\n", None, [], "(did you mean classes? task fields: "),
    ("task file: typo of a section", "optimm: {lr: 1.0e-3}\n", None, [], "(did you mean optim? task fields: "),
    ("task file: section in the task", None, None, [], "task.optim: a recipe section"),
    ("task file: bad optim value", "optim: {lr: -1}\n", None, [], "optim.lr must be positive"),
    ("task file: bad model value", "model: {drop_path_rate: 2}\n", None, [], "model.drop_path_rate"),
    ("task file: norm next to it missing", "norm: stats/mine.stats.json\n", None, [], "task.norm"),
    ("task file: batch above its clips", "", None, ["data.batch_size=4000"], "data.batch_size"),
    ("task null", None, None, ["task=null"], "task: expected a mapping of the task's fields"),
    ("task a number", None, None, ["task=3"], "task: expected a mapping of the task's fields"),
    ("task file: task null", "epochs: 2\n", None, ["task=null"], "task: expected a mapping of the task's fields"),
    ("recipe: task not a mapping", None, "task_scalar.yaml", [], "task_scalar.yaml); the task itself is --task's"),
    ("task file: train null where averaging moves", "metric: mAP\nepochs: 10\n", None, ["train=null"], "train"),
    ("data.balanced (the task's)", None, None, ["data.balanced=true"], "set task.balanced instead"),
    ("lr NaN", None, None, ["optim.lr=.nan"], "optim.lr"),
    ("lr infinite", None, None, ["optim.lr=.inf"], "optim.lr"),
    ("grad_clip NaN", None, None, ["optim.grad_clip=.nan"], "optim.grad_clip"),
    ("weight_decay infinite", None, None, ["optim.weight_decay=.inf"], "optim.weight_decay"),
    ("phase lr NaN", None, None, ["phases=[{{compression: none, epochs: 2, lr: .nan}}]"], "phases.0"),
    ("mixup_alpha NaN", None, None, ["augment.mixup=0.5", "augment.mixup_alpha=.nan"], "augment.mixup_alpha"),
    ("mixup_alpha infinite", None, None, ["augment.mixup_alpha=.inf"], "augment.mixup_alpha"),
    ("freq_stripes huge", None, None, ["augment.freq_stripes=1000000000"], "augment"),
    ("until min_delta NaN", None, None,
     ["phases=[{{compression: none, epochs: 2, until: {{plateau: true, min_delta: .nan}}}}]"], "phases.0"),
]


@pytest.mark.parametrize("case", FINETUNE_CASES, ids=[c[0] for c in FINETUNE_CASES])
def test_fine_tuning_rejects_before_compute(case, broken, synth_corpus, ft_data, tmp_path, tripwire, capsys):
    from finetune.run import main

    name, body, recipe, overrides, key = case
    if name == "task file: section in the task":
        task = tmp_path / "nested.yaml"
        task.write_text(f"task:\n  name: nested\n  classes: {synth_corpus / 'synth_classes.json'}\n"
                        f"  optim: {{lr: 1.0e-3}}\n")
        task = str(task)
    else:
        task = "synth" if body is None else _task_file(tmp_path, synth_corpus, body)
    argv = ["--init", "none", "--task", task, "--data-root", str(ft_data), "--run-dir", str(tmp_path / "run"),
            *sets(*TINY_FT, *(o.format(broken=broken) for o in overrides))]
    if recipe:
        argv += ["--recipe", str(broken / recipe)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_keep_head_without_an_init_is_refused(ft_data, tmp_path, tripwire, capsys):
    """--keep-head with --init none was ignored without a word (there is no classifier to keep)."""
    from finetune.run import main

    assert main(["--init", "none", "--keep-head", "--task", "synth", "--data-root", str(ft_data), "--run-dir",
                 str(tmp_path / "run"), *sets(*TINY_FT)]) == 2
    assert capsys.readouterr().err.startswith("error: --keep-head keeps the classifier of --init a Hugging Face AST")
    assert not (tmp_path / "run").exists()


def test_at_least_the_issue_cases_are_covered():
    assert len(PRETRAIN_CASES) >= 40 and len(FINETUNE_CASES) >= 30


# ------------------------------------------------------------------------------------ numbers (item 1)
@pytest.mark.parametrize("text, value", [("5e-5", 5e-5), ("1e-3", 1e-3), ("1e9", 1e9), ("1.0e9", 1e9),
                                         ("1.0e+9", 1e9), ("-2.5E-4", -2.5e-4), (".5", 0.5), ("1_000.5", 1000.5),
                                         ("10", 10), ("0x10", 16), ("true", True), ("5e", "5e"), ("e5", "e5")])
def test_numbers_parse_as_written(text, value):
    assert parse_yaml(text) == value and type(parse_yaml(text)) is type(value)


def test_numbers_in_recipe_files_and_set_values_alike(tmp_path):
    from pretrain.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"extends: {RECIPE}\nbaseline: null\noptim: {{lr: 5e-5, weight_decay: 1e-7}}\nphases:\n"
                    f"  - {{compression: fshift, factor: 4, steps: 1e2}}\n  - {{compression: none, steps: 1.0e3}}\n")
    assert load_yaml(path)["optim"] == {**load_yaml(RECIPE)["optim"], "lr": 5e-5, "weight_decay": 1e-7}
    recipe = load_recipe(path, ["optim.min_lr=1e-9", "phases.0.lr=3e-4"])
    assert (recipe.optim.lr, recipe.optim.weight_decay, recipe.optim.min_lr) == (5e-5, 1e-7, 1e-9)
    assert [p.steps for p in recipe.phases] == [100, 1000] and recipe.phases[0].lr == 3e-4
    with pytest.raises(RecipeError, match=r"phases.0.steps: expected an integer, got 2.5"):
        load_recipe(path, ["phases.0.steps=2.5"])
    assert apply_overrides({}, ["a.b=1e9"]) == {"a": {"b": 1e9}}


@pytest.mark.parametrize("argv, message", [
    (["prepare", "esc50", "--src", "{tmp}/nowhere", "--out", "{tmp}/out"], "meta/esc50.csv"),
    (["prepare", "custom", "--out", "{tmp}/out"], "give --src"),
    (["prepare", "custom", "--csv", "{tmp}/clips.csv", "--out", "{tmp}/out"], "clips.csv"),
    (["stats", "{tmp}/nowhere.jsonl.gz"], "nowhere.jsonl.gz does not exist"),
    (["shar", "{tmp}/nowhere.jsonl.gz", "--out", "{tmp}/shar"], "nowhere.jsonl.gz does not exist"),
])
def test_corpus_command_errors_are_one_line(tmp_path, capsys, argv, message):
    from common.data.corpora.__main__ import main

    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_recipe_of_the_other_kind_is_named_as_such(tmp_path, capsys):
    """A fine-tuning recipe given to the pretrainer, or a pretraining recipe to fine-tuning, says so and which
    command runs it (instead of 'data.train: at least one training manifest is needed' or 'audio: unknown key')."""
    from finetune.run import main as finetune
    from pretrain.run import main as pretrain

    recipes = Path(__file__).resolve().parents[2] / "recipes"
    for name, why in (("ft_fshift4.yaml", "it names no data to pretrain on"),
                      ("htsat_audioset.yaml", "its augment: section is fine-tuning's")):
        assert pretrain(["--recipe", str(recipes / name), "--run-dir", str(tmp_path / "p"), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {recipes / name} reads as a fine-tuning recipe ({why}); run it with "
                              f"finetune/run.py --task NAME --recipe"), err
    assert finetune(["--task", "synth", "--init", "none", "--recipe", str(recipes / "synth_pretrain.yaml"),
                     "--run-dir", str(tmp_path / "f"), "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {recipes / 'synth_pretrain.yaml'} is a pretraining recipe (its audio: section is pretraining's); run "
        f"it with pretrain/run.py --recipe")
    assert not (tmp_path / "p").exists() and not (tmp_path / "f").exists()


def test_a_bad_value_is_named_with_where_it_was_written(tmp_path, synth_corpus, ft_data, capsys):
    """A fine-tuning value can come from the task file, the --recipe file (or one it extends) or --set: the error
    names the key and that source."""
    from finetune.run import main as finetune
    from pretrain.recipe import load_recipe

    parent = tmp_path / "parent.yaml"
    parent.write_text(f"extends: {RECIPE}\noptim: {{lrr: 1.0e-3}}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\nmodel: {depth: 2}\n")
    with pytest.raises(RecipeError, match=r"^optim.lrr: unknown key .*\(in .*parent.yaml\)$"):
        load_recipe(child)
    with pytest.raises(RecipeError, match=r"^optim.lr must be positive and finite, got -1.0 \(--set optim.lr=-1\)$"):
        load_recipe(RECIPE, ["optim.lr=-1"])
    with pytest.raises(RecipeError, match=r"^model.depth must be >= 1, got 0 \(--set model={depth: 0}\)$"):
        load_recipe(RECIPE, ["model={depth: 0}"])  # a section set whole: the key inside it came from there
    # a phase's factor: named by its key, not by the method written in the file beside it
    with pytest.raises(RecipeError, match=r"^phases.1.factor: compression 'none' takes factor 1, got 2 "
                                          r"\(--set phases.1.factor=2\)$"):
        load_recipe(RECIPE, ["phases.1.factor=2"])
    with pytest.raises(RecipeError, match=r"^phases.0.compression: unknown method 'zip'; .* \(--set "):
        load_recipe(RECIPE, ["phases.0.compression=zip"])
    task = _task_file(tmp_path, synth_corpus, "optim: {lr: -1}\n")
    base = ["--init", "none", "--data-root", str(ft_data), "--run-dir", str(tmp_path / "run"), *sets(*TINY_FT)]
    assert finetune([*base, "--task", task]) == 2
    assert capsys.readouterr().err.strip().endswith(f"optim.lr must be positive and finite, got -1.0 (in {task})")
    ft_recipe = tmp_path / "ft.yaml"
    ft_recipe.write_text("optim: {lr: -2}\n")
    assert finetune([*base, "--task", task, "--recipe", str(ft_recipe)]) == 2  # the recipe file wins the task file
    assert capsys.readouterr().err.strip().endswith(f"got -2.0 (in {ft_recipe})")
    assert finetune([*base, "--task", task, "--recipe", str(ft_recipe), "--set", "optim.lr=-3"]) == 2
    assert capsys.readouterr().err.strip().endswith("got -3.0 (--set optim.lr=-3)")
    assert finetune([*base, "--task", "synth", "--set", "model.drop_path_rate=2"]) == 2
    assert "(--set model.drop_path_rate=2)" in capsys.readouterr().err


def test_a_key_written_twice_is_refused_but_merges_and_other_keys_are_not():
    """A mapping that writes a key twice is an error (PyYAML keeps the last silently); a key that overrides one
    merged in with ``<<:`` (in block or flow style, nested in a list) is written once, and 1 and "1" are two
    keys: those load as ``yaml.safe_load`` loads them."""
    import yaml

    text = ("defaults: &d {lr: 1.0, wd: 0.1}\nphases:\n  - <<: *d\n    lr: 2.0\n  - {<<: *d, lr: 3.0}\n"
            "other:\n  <<: *d\nmixed: {1: a, \"1\": b}\n")
    assert parse_yaml(text) == yaml.safe_load(text)
    for twice in ("a: 1\na: 2\n", "x: {b: 1, b: 2}\n", "- <<: {c: 1}\n  d: 1\n  d: 2\n"):
        with pytest.raises(yaml.YAMLError, match="is written twice in one mapping"):
            parse_yaml(twice)


def test_a_recipe_is_found_by_name_where_the_package_is_installed(tmp_path, monkeypatch, capsys):
    """A wheel carried no recipes and --recipe read paths only: an installed copy could not pretrain, nor run the
    demo. The wheel installs them as share/coarse2fine-ast/recipes; a name (or recipes/NAME.yaml, as the docs write
    it) that is no file here is the package's recipe of that name; a file of that name here wins."""
    import sys

    import common.config.recipe as recipe_module
    from common.config.recipe import bundled_recipes, recipe_file, recipe_files
    from pretrain.recipe import load_recipe

    clone = bundled_recipes()
    assert clone == Path(recipe_module.__file__).resolve().parents[2] / "recipes"  # a clone's own
    site = tmp_path / "site"  # a `pip install --target site` of the wheel: the packages and share/ side by side
    shipped = site / "share" / "coarse2fine-ast" / "recipes"
    shipped.mkdir(parents=True)
    for recipe in clone.glob("*.yaml"):
        (shipped / recipe.name).write_text(recipe.read_text())
    monkeypatch.setattr(recipe_module, "__file__", str(site / "common" / "config" / "recipe.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    assert bundled_recipes() == shipped
    monkeypatch.chdir(tmp_path)
    for name in ("ssast_fshift4", "ssast_fshift4.yaml", "recipes/ssast_fshift4.yaml"):
        assert recipe_file(name) == shipped / "ssast_fshift4.yaml"
    recipe = load_recipe("recipes/ssast_fshift4.yaml")  # its baseline is found beside it
    assert recipe.baseline == str((shipped / "ssast_baseline.yaml").resolve())
    assert load_yaml("ft_fshift4") == load_yaml(clone / "ft_fshift4.yaml")
    assert [f for f, _ in recipe_files("ft_fshift4")] == [str(shipped / "ft_fshift4.yaml")]  # "(in FILE)" of errors
    assert recipe_file("./ssast_fshift4.yaml") == Path("ssast_fshift4.yaml")  # ./: a path of the user's, as given
    # a user's recipe that extends a shipped one, and a user's copy of one whose baseline stays the package's
    (tmp_path / "mine.yaml").write_text("extends: ssast_fshift4.yaml\nphases: [{compression: none, steps: 7}]\n")
    assert load_yaml("mine.yaml")["phases"] == [{"compression": "none", "steps": 7}]
    (tmp_path / "copy.yaml").write_text((shipped / "ssast_fshift4.yaml").read_text())
    assert load_recipe("copy.yaml").baseline == str((shipped / "ssast_baseline.yaml").resolve())
    (tmp_path / "ssast_fshift4.yaml").write_text("data: {}\n")  # the user's own file of that name
    assert recipe_file("ssast_fshift4.yaml") == Path("ssast_fshift4.yaml")
    assert recipe_file("ssast_fshift4") == Path("ssast_fshift4.yaml")  # by name too
    assert recipe_file("elsewhere/ssast_fshift4.yaml") == Path("elsewhere/ssast_fshift4.yaml")  # a path: as given
    with pytest.raises(FileNotFoundError, match=r"^recipe nope does not exist \(the package's recipes, by name: "
                                                r"ft_audioset_fshift4, .*ssast_fshift4, "):
        load_yaml("nope")
