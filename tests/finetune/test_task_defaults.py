"""A task file's defaults follow the closest published recipe (single / multi-label, clip length, the init's
family), its time mask scaled to the clip length, and say which; what the user states wins; the registered
tasks keep their recipes; ``defaults: package`` keeps the bare defaults."""

import re
from pathlib import Path

import pytest
import torch

from common.config.recipe import RecipeError, load_yaml
from common.models.weights import EncoderWeights
from common.phases.init import init_family
from finetune.recipe import load_recipe
from finetune.task_recipes import RECIPES, closest
from finetune.tasks import TASKS

ROOT = Path(__file__).resolve().parents[2]


def task_file(folder: Path, corpus: Path, frames: int = 300, extra: str = "") -> str:
    """A task file over the test corpus's manifests (24 training clips) with a clip length of ``frames``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mine.yaml"
    path.write_text(f"name: mine\ntrain: [{corpus / 'synth_train.jsonl.gz'}]\n"
                    f"valid: [{corpus / 'synth_valid.jsonl.gz'}]\n"
                    f"classes: {corpus / 'synth_classes.json'}\ntarget_frames: {frames}\n{extra}")
    return str(path)


def weights(**meta) -> EncoderWeights:
    return EncoderWeights(None, {}, meta)


@pytest.mark.parametrize("init, arch, family", [
    (None, "ast", "none"),
    (None, "htsat", "htsat"),
    (weights(source="export", objective="ssast"), "ast", "ssast"),  # this package's pretraining export
    (weights(source="official", objective="ssast"), "ast", "ssast"),  # SSAST's pretrained .pth
    (weights(source="official", objective="classification"), "ast", "ast"),  # AST's AudioSet checkpoint
    (weights(source="export", objective="classification"), "ast", "ast"),  # a fine-tuned export
    (weights(source="hf"), "ast", "ast"),
    (weights(source="imagenet"), "ast", "imagenet"),
    (weights(source="official", arch="htsat", objective="classification"), "ast", "htsat"),
])
def test_the_inits_family(init, arch, family):
    assert init_family(init, arch) == family


@pytest.mark.parametrize("multi, frames, family, name", [
    (False, 300, "ssast", "ssast_esc50"),
    (False, 512, "ssast", "ssast_esc50"),
    (False, 128, "ssast", "ssast_speechcommands"),
    (False, 255, "none", "ast_speechcommands"),  # below 2.56 s: closer to 128 frames than to 512
    (False, 256, "none", "ast_esc50"),
    (False, 1024, "imagenet", "ast_esc50"),
    (False, 300, "ast", "ast_esc50_audioset"),  # AST's ESC-50 lr for AudioSet-trained weights
    (False, 100, "ast", "ast_speechcommands"),
    (True, 1024, "ssast", "ssast_audioset20k"),
    (True, 300, "none", "ast_audioset20k"),
    (True, 1024, "imagenet", "ast_audioset20k"),
    (True, 1024, "htsat", "htsat_audioset"),
    (False, 300, "htsat", "htsat_esc50"),
])
def test_the_closest_published_recipe(multi, frames, family, name):
    assert closest(multi, frames, family) == name


def test_a_single_label_task_file_follows_esc50_with_its_time_mask_scaled(tmp_path, synth_corpus):
    notes: list[str] = []
    recipe = load_recipe(task_file(tmp_path, synth_corpus), overrides=["data.batch_size=4"], notes=notes)
    a, o = recipe.augment, recipe.optim
    assert (a.freqm, a.timem, a.mixup, a.noise) == (24, 56, 0.0, False)  # AST's ESC-50: 96 of 512 frames -> 56 of 300
    assert (o.lr, o.schedule, o.decay_start, o.decay_every, o.decay) == (1e-4, "multistep", 5, 1, 0.85)
    assert o.warmup_steps == 0  # AST's ESC-50 recipe does not warm up
    assert [p.epochs for p in recipe.phases] == [25] and recipe.task.loss == "ce"
    assert "defaults: AST ESC-50 recipe (single-label, 512-frame clips, ImageNet init), chosen for a single-label " \
           "task of 300 frames, from scratch, SpecAugment time mask 96 -> 56 for 300 frames" in notes[0]
    assert "25 epochs" in notes[0] and "no warm-up" in notes[0] and "SpecAugment 24 / 56, no mixup" in notes[0]


@pytest.mark.parametrize("frames, timem", [(128, 48), (200, 75), (64, 24)])
def test_short_clips_follow_speechcommands(tmp_path, synth_corpus, frames, timem):
    recipe = load_recipe(task_file(tmp_path, synth_corpus, frames), overrides=["data.batch_size=4"])
    a = recipe.augment
    assert (a.freqm, a.timem, a.mixup, a.noise) == (48, timem, 0.6, True)  # 48 of 128 frames, scaled
    assert recipe.optim.lr == 2.5e-4 and recipe.task.loss == "bce" and recipe.phases[0].epochs == 30


def test_a_multi_label_task_file_follows_audioset20k(tmp_path, synth_corpus):
    notes: list[str] = []
    recipe = load_recipe(task_file(tmp_path, synth_corpus, 1000, "metric: mAP\n"),
                         overrides=["data.batch_size=4"], notes=notes)
    a, o = recipe.augment, recipe.optim
    assert (a.freqm, a.timem, a.mixup) == (48, 188, 0.5)  # 192 of 1024 frames -> 187.5 of 1000
    assert (o.lr, o.decay_start, o.decay_every, o.decay) == (5e-5, 10, 5, 0.5)
    assert o.warmup_steps == 3  # AST warms up: the task file's rule, half of 24 clips / 4 per step
    assert recipe.task.loss == "bce" and recipe.phases[0].epochs == 25 and recipe.train.weight_average_from == 6
    assert "AST AudioSet-20K recipe (multi-label, 1024-frame clips, ImageNet init)" in notes[0]
    assert "warm-up 3 steps (the first half of the first epoch" in notes[0]
    # fewer epochs: weight averaging over the same last share (epochs 6-25 of 25 -> 3-10 of 10)
    notes = []
    short = load_recipe(task_file(tmp_path, synth_corpus, 1000, "metric: mAP\nepochs: 10\n"),
                        overrides=["data.batch_size=4"], notes=notes)
    assert short.phases[0].epochs == 10 and short.train.weight_average_from == 3
    assert "weight averaging from epoch 6 of 25 -> 3 of 10" in notes[0]
    kept = load_recipe(task_file(tmp_path, synth_corpus, 1000, "metric: mAP\nepochs: 10\n"),
                       overrides=["data.batch_size=4", "train.weight_average_from=9"])
    assert kept.train.weight_average_from == 9


@pytest.mark.parametrize("family, name", [("none", "ast_audioset2m"), ("ssast", "ast_audioset2m"),
                                          ("ast", "ast_audioset2m"), ("htsat", "htsat_audioset")])
def test_a_multi_label_task_with_balanced_sampling_is_closest_to_audioset2m(family, name):
    assert closest(True, 1024, family, balanced=True) == name
    assert closest(False, 512, family, balanced=True) == closest(False, 512, family)  # single-label: as before


def test_a_balanced_multi_label_task_file_follows_audioset2m(tmp_path, synth_corpus):
    """AST samples balanced for AudioSet-2M alone: a task file that does is a two-million-clip set, and the 20K
    recipe's 25 epochs would be five times AST's compute there."""
    notes: list[str] = []
    recipe = load_recipe(task_file(tmp_path, synth_corpus, 1024, "metric: mAP\nbalanced: true\n"),
                         overrides=["data.batch_size=4"], notes=notes)
    o = recipe.optim
    assert recipe.phases[0].epochs == 5 and recipe.train.weight_average_from == 1 and recipe.task.balanced
    assert (o.lr, o.schedule, o.decay_start, o.decay_every, o.decay) == (1e-5, "multistep", 2, 1, 0.5)
    assert "AST AudioSet-2M recipe (multi-label, 1024-frame clips, ImageNet init), chosen for a multi-label task of " \
           "1024 frames, balanced sampling, from scratch" in notes[0]
    assert load_recipe("audioset", overrides=["defaults=auto"]).phases[0].epochs == 5  # the registered AudioSet-2M


def test_an_ssast_init_follows_ssasts_recipe(tmp_path, synth_corpus, tiny_cfg):
    from common.models.ast.encoder import ASTEncoder
    from common.models.exports import save_encoder

    init = save_encoder(ASTEncoder(tiny_cfg), tmp_path / "ssast.safetensors", {"objective": "ssast"})
    notes: list[str] = []
    recipe = load_recipe(task_file(tmp_path, synth_corpus), init=str(init), overrides=["data.batch_size=4"],
                         notes=notes)
    a, o = recipe.augment, recipe.optim
    assert (a.freqm, a.timem, a.mixup, a.noise) == (24, 56, 0.0, True)  # SSAST's ESC-50 adds its noise
    assert (o.lr, o.decay_start, o.warmup_steps) == (1e-4, 6, 0) and recipe.phases[0].epochs == 50
    assert "defaults: SSAST ESC-50 recipe (single-label, 512-frame clips, SSAST-pretrained init), chosen for a " \
           "single-label task of 300 frames, SSAST-pretrained init, SpecAugment time mask 96 -> 56" in notes[0]


def test_an_htsat_task_file_follows_htsats_recipe(tmp_path, synth_corpus):
    recipe = load_recipe(task_file(tmp_path, synth_corpus, 300, "model: {arch: htsat}\n"),
                         overrides=["data.batch_size=4"])
    assert recipe.model.arch == "htsat" and recipe.data.pad == "repeat" and recipe.phases[0].epochs == 100
    assert (recipe.optim.optimizer, recipe.optim.lr, recipe.optim.schedule) == ("adamw", 1e-3, "piecewise")
    assert (recipe.augment.timem, recipe.augment.time_stripes, recipe.augment.mixup) == (64, 2, 0.0)  # not scaled


def test_what_the_user_states_wins(tmp_path, synth_corpus):
    extra = "optim: {lr: 3.0e-4}\naugment: {timem: 30}\nloss: bce\nepochs: 4\n"
    over = tmp_path / "over.yaml"
    over.write_text("augment: {mixup: 0.2}\n")
    recipe = load_recipe(task_file(tmp_path, synth_corpus, 300, extra), over,
                         ["data.batch_size=4", "augment.noise=true", "optim.decay=0.9"])
    a, o = recipe.augment, recipe.optim
    assert (a.freqm, a.timem, a.mixup, a.noise) == (24, 30, 0.2, True)  # freqm from the recipe, the rest stated
    assert (o.lr, o.schedule, o.decay_start, o.decay) == (3e-4, "multistep", 5, 0.9)
    assert recipe.task.loss == "bce" and recipe.phases[0].epochs == 4
    # a warm-up given anywhere is kept
    assert load_recipe(task_file(tmp_path, synth_corpus, 1000, "metric: mAP\n"),
                       overrides=["data.batch_size=4", "optim.warmup_steps=7"]).optim.warmup_steps == 7


def test_the_package_defaults_stay_available(tmp_path, synth_corpus):
    notes: list[str] = []
    recipe = load_recipe(task_file(tmp_path, synth_corpus, 300, "defaults: package\n"),
                         overrides=["data.batch_size=4"], notes=notes)
    a, o = recipe.augment, recipe.optim
    assert (a.freqm, a.timem, a.mixup, a.noise) == (0, 0, 0.0, False)
    assert (o.lr, o.schedule, o.warmup_steps) == (1e-4, "plateau", 3) and recipe.phases[0].epochs == 10
    assert notes[0].startswith("task file mine: package defaults (defaults: package): warm-up 3 steps")
    assert "no augmentation" in notes[0]
    via_set = load_recipe(task_file(tmp_path, synth_corpus), overrides=["data.batch_size=4", "defaults=package"])
    assert via_set.augment.timem == 0 and via_set.optim.schedule == "plateau"
    named = load_recipe(task_file(tmp_path, synth_corpus, 300, "defaults: ssast_speechcommands\n"),
                        overrides=["data.batch_size=4"])
    # 48 of 128 frames -> 112.5 of 300
    assert (named.optim.lr, named.augment.timem, named.augment.noise) == (2.5e-4, 112, True)
    mine = task_file(tmp_path, synth_corpus, 300, "defaults: esc\n")
    with pytest.raises(RecipeError, match=rf"defaults: expected auto .* got 'esc' \(in {re.escape(mine)}\)$"):
        load_recipe(mine)  # named with where it was written, as every key is
    nested = tmp_path / "nested.yaml"
    nested.write_text(f"defaults: package\ntask:\n  name: n\n  classes: {synth_corpus / 'synth_classes.json'}\n"
                      f"  train: [{synth_corpus / 'synth_train.jsonl.gz'}]\n"
                      f"  valid: [{synth_corpus / 'synth_valid.jsonl.gz'}]\n")
    assert load_recipe(str(nested), overrides=["data.batch_size=4"]).optim.schedule == "plateau"
    nested.write_text(nested.read_text().replace("defaults: package\n", "") + "  defaults: package\n")
    with pytest.raises(RecipeError, match="task.defaults: not a task field; write defaults: at the top level"):
        load_recipe(str(nested))


def test_registered_tasks_keep_their_recipes(tmp_path):
    esc = load_recipe("esc50", overrides=["task.target_frames=300"])  # no scaling: the task's own recipe
    assert (esc.augment.freqm, esc.augment.timem, esc.augment.noise, esc.phases[0].epochs) == (24, 96, True, 50)
    assert load_recipe("speechcommands").optim.warmup_steps == 1000 and load_recipe("vggsound").optim.lr == 1e-5



def test_a_registered_task_follows_another_published_recipe_when_defaults_names_one(tmp_path):
    """The registered esc50 follows SSAST's recipe whatever the start; AST's official ESC-50 recipe for an AudioSet
    checkpoint (egs/esc50/run_esc.sh: lr 1e-5, 25 epochs, no noise, decay from epoch 5) is a switch away: defaults
    names it, or auto picks the published recipe closest to the init, as for a task file."""
    from common.models.weights import EncoderWeights

    notes: list[str] = []
    ast = load_recipe("esc50", overrides=["defaults=ast_esc50_audioset"], notes=notes)
    assert (ast.optim.lr, ast.phases[0].epochs, ast.augment.noise, ast.optim.decay_start, ast.task.loss) == \
        (1e-5, 25, False, 5, "ce")
    assert ast.data.batch_size == load_recipe("esc50").data.batch_size == 48  # the task's batch (AST's too)
    assert ast.task.folds == load_recipe("esc50").task.folds  # the task itself is the registered one
    assert notes and notes[0].startswith("task esc50: defaults: AST ESC-50")
    assert "What --recipe or --set states wins; --set defaults=package keeps" in notes[0]
    audio = EncoderWeights(None, {}, {"source": "official"})  # an AST AudioSet checkpoint: supervised audio
    assert load_recipe("esc50", overrides=["defaults=auto"], init_weights=audio, init="ast.pth").optim.lr == 1e-5
    ssast = EncoderWeights(None, {}, {"source": "official", "objective": "ssast"})
    own = load_recipe("esc50")
    chosen = load_recipe("esc50", overrides=["defaults=auto"], init_weights=ssast, init="ssast.pth")
    assert (chosen.optim.lr, chosen.phases[0].epochs, chosen.augment.noise) == \
        (own.optim.lr, own.phases[0].epochs, own.augment.noise) == (1e-4, 50, True)
    assert load_recipe("esc50", overrides=["defaults=package"]).optim.schedule == "plateau"
    assert load_recipe("synth", overrides=["defaults=null"]) == load_recipe("synth")  # null: its own, not auto
    assert load_recipe("esc50", overrides=["defaults=ast_esc50_audioset", "optim.lr=2e-5"]).optim.lr == 2e-5
    with pytest.raises(RecipeError, match=r"defaults: expected auto .* got 'ast' \(--set defaults=ast\)$"):
        load_recipe("esc50", overrides=["defaults=ast"])  # --set named, as for every other key
    (tmp_path / "r.yaml").write_text("defaults: bogus\n")
    with pytest.raises(RecipeError, match=rf"got 'bogus' \(in {re.escape(str(tmp_path / 'r.yaml'))}\)$"):
        load_recipe("esc50", recipe_path=tmp_path / "r.yaml")


def _flat(recipe: dict) -> dict:
    return {f"{section}.{k}": v for section, values in recipe.items() if isinstance(values, dict)
            for k, v in values.items()}


@pytest.mark.parametrize("name, task", [("ssast_esc50", "esc50"), ("ssast_speechcommands", "speechcommands"),
                                        ("ssast_audioset20k", "audioset20k"), ("ast_audioset2m", "audioset")])
def test_the_published_recipes_are_those_of_the_registered_tasks(name, task):
    ours, theirs = RECIPES[name].sections, TASKS[task][1]
    assert ours["phases"][0]["epochs"] == theirs["phases"][0]["epochs"]
    mine, registered = _flat(ours), _flat(theirs)
    for key, value in mine.items():
        if key != "optim.warmup_steps" and key in registered:
            assert registered[key] == value, key
    assert RECIPES[name].loss == TASKS[task][0]["loss"]


@pytest.mark.parametrize("name", ["htsat_audioset", "htsat_esc50"])
def test_the_htsat_recipes_are_those_of_the_recipe_files(name):
    ours, theirs = RECIPES[name].sections, load_yaml(ROOT / "recipes" / f"{name}.yaml")
    assert ours["phases"][0]["epochs"] == theirs["phases"][0]["epochs"]
    mine, registered = _flat(ours), _flat(theirs)
    for key, value in registered.items():
        if key.split(".")[0] in ("augment", "optim", "train", "model") or key == "data.pad":
            assert mine.get(key) == value, key


def test_the_plan_says_which_recipe(tmp_path, synth_corpus, capsys):
    from finetune.run import main

    assert main(["--init", "none", "--task", task_file(tmp_path, synth_corpus), "--dry-run",
                 "--set", "data.batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "optimiser adam, lr 0.0001, warm-up 0 steps, multistep schedule" in out
    assert "batch: 8 clips per step = 8 per rank x 1 rank(s) x 1 accumulation" in out  # data.batch_size is global
    assert "task file mine: defaults: AST ESC-50 recipe" in out and "time mask 96 -> 56 for 300 frames" in out
    assert "phase1 (full resolution)               25" in out
    assert out.splitlines()[0] == "task mine"  # a task file without a description: its name alone, no dangling colon


@pytest.mark.slow
def test_a_task_file_trains_with_its_recipe(tmp_path, synth_corpus):
    """A short run logs the followed recipe and records it in the run's recipe."""
    import json

    from common.config.recipe import parse_yaml
    from finetune.run import main

    run_dir = tmp_path / "run"
    assert main(["--init", "none", "--task", task_file(tmp_path, synth_corpus, 64, "epochs: 1\n"),
                 "--run-dir", str(run_dir), "--set", "model.size=custom", "--set", "model.embed_dim=32",
                 "--set", "model.depth=1", "--set", "model.num_heads=2", "--set", "data.batch_size=8",
                 "--set", "data.num_workers=0"]) == 0
    resolved = parse_yaml((run_dir / "recipe.yaml").read_text())
    assert resolved["augment"]["timem"] == 24 and resolved["augment"]["mixup"] == 0.6  # SpeechCommands' 48 of 128
    assert resolved["task"]["loss"] == "bce" and resolved["optim"]["lr"] == 2.5e-4
    assert "defaults: AST SpeechCommands recipe" in (run_dir / "train.log").read_text()
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert len(ledger["evals"]) == 1 and torch.isfinite(torch.tensor(ledger["evals"][0]["metrics"]["acc"]))


def test_another_schedule_stated_drops_the_recipes_table(tmp_path, synth_corpus):
    """HTS-AT's recipe brings a piecewise table; a recipe that states another schedule does not inherit it."""
    over = tmp_path / "over.yaml"
    over.write_text("optim: {schedule: multistep, decay_start: 3}\n")
    recipe = load_recipe(task_file(tmp_path, synth_corpus, 300, "model: {arch: htsat}\n"), over,
                         ["data.batch_size=4"])
    assert (recipe.optim.schedule, recipe.optim.decay_start, tuple(recipe.optim.piecewise)) == ("multistep", 3, ())
    stated = load_recipe(task_file(tmp_path, synth_corpus, 300, "model: {arch: htsat}\n"),
                         overrides=["data.batch_size=4", "optim.schedule=piecewise"])
    assert stated.optim.piecewise  # the same schedule stated: the recipe's table stays



def test_a_runs_resolved_recipe_yaml_loads_again_as_its_recipe(tmp_path):
    """RUN/recipe.yaml is the whole resolved recipe (data.balanced: false among its defaults): given back as
    --recipe it plans the same run; only a data.balanced: true is refused (the task says how it is sampled)."""
    from common.config.recipe import RecipeError, dump_yaml

    for task in ("esc50", "audioset"):
        recipe = load_recipe(task)
        dump_yaml(recipe, tmp_path / f"{task}.yaml")
        assert load_recipe(task, tmp_path / f"{task}.yaml") == recipe
    with pytest.raises(RecipeError, match="data.balanced: a fine-tuning run samples as its task says"):
        load_recipe("esc50", overrides=["data.balanced=true"])
