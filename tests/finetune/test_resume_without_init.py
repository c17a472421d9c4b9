"""A fine-tuning run resumes from its checkpoints when its ``--init`` file has gone since it started: what the
run took from the init besides the weights (pooling, positional rule, the model's shape, a task file's
defaults) comes from ``RUN/init.json``; a model that would start from the init still needs the file."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.data.corpora import get_corpus
from finetune.run import main as finetune
from tests.helpers import _synth_root, sets, ssast_pretrained_state

pytestmark = pytest.mark.slow  # every test here trains

RUN = ["data.num_workers=0", "data.batch_size=4", "optim.warmup_steps=0", "train.log_every=100",
       "train.deterministic=true"]


@pytest.fixture
def official_init(tmp_path) -> Path:
    """An official SSAST checkpoint: its pooling (patch mean), positional rule (cut) and model all come from it."""
    path = tmp_path / "scratch" / "SSAST-Tiny-Patch-400.pth"
    path.parent.mkdir()
    torch.save(ssast_pretrained_state(dim=32, depth=2, tdim=256), path)
    return path


def test_a_run_resumes_when_its_init_has_gone_and_trains_the_uninterrupted_weights(tmp_path, synth_corpus,
                                                                                    official_init, caplog):
    data = _synth_root(tmp_path, synth_corpus)

    def command(run_dir: Path, *extra: str) -> list[str]:
        return ["--init", str(official_init), "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                *sets(*RUN, "phases=[{compression: none, epochs: 2}]"), *extra]

    assert finetune(command(tmp_path / "straight")) == 0
    assert finetune(command(tmp_path / "resumed", "--stop-after-steps", "2")) == 0
    record = json.loads((tmp_path / "resumed" / "init.json").read_text())
    assert (record["init"], record["arch"], record["meta"]["objective"]) == (str(official_init), "ast", "ssast")
    official_init.rename(tmp_path / "moved.pth")  # the scratch disk was cleaned

    with caplog.at_level(logging.WARNING):
        assert finetune(command(tmp_path / "resumed")) == 0
    assert any(f"--init {official_init} does not exist" in r.getMessage() for r in caplog.records)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ledger = json.loads((tmp_path / "resumed" / "ledger.json").read_text())
    assert [e["epoch"] for e in ledger["evals"]] == [1, 2]

    # a new run starts from the init: it needs the file, and says which
    assert finetune(command(tmp_path / "new")) == 2
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_a_registered_task_following_the_inits_recipe_resumes_when_its_init_has_gone(tmp_path, synth_corpus,
                                                                                      official_init, capsys):
    """`--set defaults=auto` makes a registered task's defaults follow the init's family, as a task file's: the
    family is read from RUN/init.json when the file has gone, and the run resumes to its end."""
    data = _synth_root(tmp_path, synth_corpus)
    run_dir = tmp_path / "run"
    command = ["--init", str(official_init), "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
               *sets(*RUN, "defaults=auto", "phases=[{compression: none, epochs: 2}]")]
    assert finetune([*command, "--stop-after-steps", "1"]) == 0
    official_init.unlink()
    assert finetune(command) == 0, capsys.readouterr().err
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [e["epoch"] for e in ledger["evals"]] == [1, 2]


def test_a_fold_that_would_start_from_a_gone_init_stops_naming_it(tmp_path, official_init, capsys):
    """A task file (its defaults follow the init's family, read from the record): the first fold resumes and
    finishes; the second, which starts from the init's weights, stops with one line naming the file."""
    from tests.layouts import write_clip

    for label in ("kick", "snare"):
        for i in range(3):
            write_clip(tmp_path / "drums" / label / f"{label}{i}.wav", seconds=0.6, seed=hash(label) % 100 + i)
    get_corpus("custom").prepare(tmp_path / "drums", tmp_path / "manifests", name="drums", valid_fraction=0.5)
    task = tmp_path / "drums.yaml"
    task.write_text("name: drums\nfolds: [manifests/drums_train.jsonl.gz, manifests/drums_valid.jsonl.gz]\n"
                    "classes: manifests/drums_classes.json\ntarget_frames: 64\nnorm: audioset\nmetric: acc\n"
                    "loss: ce\nepochs: 2\n")
    run_dir = tmp_path / "run"
    command = ["--init", str(official_init), "--task", str(task), "--run-dir", str(run_dir),
               *sets(*RUN, "data.batch_size=2")]
    assert finetune([*command, "--stop-after-steps", "1"]) == 0
    official_init.unlink()
    capsys.readouterr()
    assert finetune(command) == 2
    err = capsys.readouterr().err
    assert f"{official_init} does not exist" in err and "fold2" in err and "starts a model from it" in err
    assert (run_dir / "fold1" / "model.safetensors").is_file() and not (run_dir / "fold2" / "checkpoints").exists()


def test_a_checkpoint_from_before_balanced_sampling_reached_held_sets_says_so_when_resumed(tmp_path, synth_corpus,
                                                                                           caplog):
    """A balanced run checkpointed before balanced sampling reached sets held in memory or indexed trained on plain
    shuffles so far: its resume says that from here the epochs are balanced, and records it in ledger.json."""
    data = _synth_root(tmp_path, synth_corpus)
    command = ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(tmp_path / "run"),
               *sets(*RUN, "model.size=custom", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                     "task.balanced=true", "phases=[{compression: none, epochs: 2}]")]
    assert finetune([*command, "--stop-after-steps", "1"]) == 0
    for saved in (tmp_path / "run" / "checkpoints").glob("phase*/trainer_state.json"):
        state = json.loads(saved.read_text())
        assert state["sampler"] == "balanced"
        del state["sampler"]  # as written before the record
        saved.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        assert finetune(command) == 0
    assert any("written before balanced sampling reached" in r.getMessage() for r in caplog.records)
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert [list(i["changes"]) for i in ledger["interventions"]] == [["data.balanced"]]
