"""A fine-tuning run records which weights its ``--init`` held (size and SHA-256 of the file(s) read, in
``RUN/init.json`` and each run's ledger): a fold that would start from a file rewritten since the run started is
refused, instead of a cross-validation that averages folds started from two inits; a run whose every model resumes
from its checkpoints goes on with what it recorded."""

import gzip
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config.recipe import RecipeError
from common.data.corpora import get_corpus
from common.phases.init import INIT_RECORD, check_init_digest, init_digest, load_init, record_init
from finetune.run import main as finetune
from tests.helpers import _synth_root, one_error, sets, ssast_pretrained_state

RUN = ["data.num_workers=0", "data.batch_size=2", "optim.warmup_steps=0", "train.log_every=100",
       "train.deterministic=true"]


def _official(path: Path, scale: float = 1.0) -> Path:
    """A tiny official SSAST checkpoint; another ``scale`` gives other weights of the same shape."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v * scale if v.is_floating_point() else v
                for k, v in ssast_pretrained_state(dim=32, depth=2, tdim=256).items()}, path)
    return path


def test_the_digest_is_of_the_files_the_init_reads(tmp_path):
    file = tmp_path / "a.safetensors"
    file.write_bytes(b"weights")
    digest = init_digest(str(file))
    assert digest == {"files": [str(file)], "size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}
    run = tmp_path / "run"  # a run directory: its final export
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    assert init_digest(str(run))["sha256"] == digest["sha256"]
    assert init_digest("none") is None
    hf = tmp_path / "hf"  # a Hugging Face directory: its config and the weights it reads, not the other files
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "p2.bin", "b": "p1.bin"}}))
    for name in ("p1.bin", "p2.bin", "README.md"):
        (hf / name).write_text(name)
    first = init_digest(str(hf))
    assert [Path(f).name for f in first["files"]] == ["config.json", "pytorch_model.bin.index.json", "p1.bin",
                                                      "p2.bin"]
    (hf / "README.md").write_text("other")
    assert init_digest(str(hf)) == first
    (hf / "p2.bin").write_text("other")
    assert init_digest(str(hf))["sha256"] != first["sha256"]


def test_a_changed_init_is_refused_where_a_model_would_start_from_it(tmp_path, caplog):
    init_path = _official(tmp_path / "init.pth")
    init = load_init(str(init_path))
    digest = init_digest(str(init_path))
    record_init(tmp_path, str(init_path), init, digest)
    assert json.loads((tmp_path / INIT_RECORD).read_text())["weights"] == digest
    folds = [tmp_path / "fold2", tmp_path / "fold3"]
    assert check_init_digest(tmp_path, str(init_path), init, digest, folds) is init  # the same weights

    _official(init_path, scale=0.5)
    changed = init_digest(str(init_path))
    with pytest.raises(RecipeError) as err:
        check_init_digest(tmp_path, str(init_path), init, changed, folds)
    message = str(err.value)
    assert "\n" not in message and str(init_path) in message and "fold2, fold3" in message
    assert digest["sha256"][:12] in message and changed["sha256"][:12] in message and "--restart" in message

    with caplog.at_level(logging.WARNING):  # every model resumes: the record, as when the file has gone
        kept = check_init_digest(tmp_path, str(init_path), init, changed, [])
    assert kept.meta["recorded"] == str(tmp_path / INIT_RECORD) and kept.state == {}
    assert any("resumes from its checkpoints with what it recorded" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # another rank of the launch: the same decision, said by rank 0
        assert check_init_digest(tmp_path, str(init_path), init, changed, [], say=False).meta["recorded"]
    assert caplog.records == []

    # a record written before the digest was: accepted, as it always was; another --init's record: not compared
    record = json.loads((tmp_path / INIT_RECORD).read_text())
    del record["weights"]
    (tmp_path / INIT_RECORD).write_text(json.dumps(record))
    assert check_init_digest(tmp_path, str(init_path), init, changed, folds) is init
    record_init(tmp_path, "other.pth", init, digest)
    assert check_init_digest(tmp_path, str(init_path), init, changed, folds) is init


def _three_folds(tmp_path: Path) -> Path:
    """A task file of 3 folds, one kick and one snare each."""
    from tests.layouts import write_clip

    for label in ("kick", "snare"):
        for i in range(3):
            write_clip(tmp_path / "drums" / label / f"{label}{i}.wav", seconds=0.6, seed=hash(label) % 100 + i)
    manifests = tmp_path / "manifests"
    get_corpus("custom").prepare(tmp_path / "drums", manifests, name="drums", valid_fraction=0.5)
    cuts = sorted((line for split in ("train", "valid")
                   for line in gzip.open(manifests / f"drums_{split}.jsonl.gz", "rt").read().splitlines()),
                  key=lambda line: json.loads(line)["id"])
    for k in range(3):  # kick0 snare0, kick1 snare1, kick2 snare2
        with gzip.open(manifests / f"fold{k + 1}.jsonl.gz", "wt") as out:
            out.write(f"{cuts[k]}\n{cuts[k + 3]}\n")
    task = tmp_path / "drums.yaml"
    task.write_text("name: drums\nfolds: [manifests/fold1.jsonl.gz, manifests/fold2.jsonl.gz, "
                    "manifests/fold3.jsonl.gz]\nclasses: manifests/drums_classes.json\ntarget_frames: 64\n"
                    "norm: audioset\nmetric: acc\nloss: ce\nepochs: 1\n")
    return task


@pytest.mark.slow
def test_a_fold_that_would_start_from_a_rewritten_init_is_refused(tmp_path, capsys):
    """3 folds, the first stopped after a step; the init rewritten with other weights of the same shape: the next
    command is refused in one line before anything trains; with the file restored, the run goes on, and every
    fold's ledger names the weights it started from."""
    task = _three_folds(tmp_path)
    init = _official(tmp_path / "scratch" / "init.pth")
    original = init.read_bytes()
    run_dir = tmp_path / "run"
    command = ["--init", str(init), "--task", str(task), "--run-dir", str(run_dir), *sets(*RUN)]
    assert finetune([*command, "--stop-after-steps", "1"]) == 0
    assert (run_dir / "fold1" / "checkpoints").is_dir() and not (run_dir / "fold2").exists()
    recorded = json.loads((run_dir / INIT_RECORD).read_text())["weights"]
    assert recorded["sha256"] == hashlib.sha256(original).hexdigest() and recorded["size"] == len(original)

    _official(init, scale=0.5)  # the export was written again
    capsys.readouterr()
    assert finetune(command) == 2
    line = one_error(capsys.readouterr().err)
    assert str(init) in line and "fold2, fold3" in line and recorded["sha256"][:12] in line
    assert not (run_dir / "fold2").exists() and not (run_dir / "fold1" / "model.safetensors").exists()

    init.write_bytes(original)  # restored: the run goes on
    assert finetune(command) == 0, capsys.readouterr().err
    assert (run_dir / "cv_summary.json").is_file()
    for k in (1, 2, 3):
        ledger = json.loads((run_dir / f"fold{k}" / "ledger.json").read_text())
        assert (ledger["init"]["source"], ledger["init"]["sha256"]) == (str(init), recorded["sha256"]), k


@pytest.mark.slow
def test_a_run_resumed_from_its_checkpoints_goes_on_with_a_rewritten_init(tmp_path, synth_corpus, caplog):
    """One run: its model comes from its checkpoints, whatever the file holds now; it resumes with what it recorded
    of its init and trains the weights of an uninterrupted run from the original."""
    data = _synth_root(tmp_path, synth_corpus)
    init = _official(tmp_path / "scratch" / "init.pth")

    def command(run_dir: Path, *extra: str) -> list[str]:
        return ["--init", str(init), "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                *sets(*RUN, "data.batch_size=4", "phases=[{compression: none, epochs: 2}]"), *extra]

    assert finetune(command(tmp_path / "straight")) == 0
    assert finetune(command(tmp_path / "resumed", "--stop-after-steps", "2")) == 0
    _official(init, scale=0.5)
    with caplog.at_level(logging.WARNING):
        assert finetune(command(tmp_path / "resumed")) == 0
    assert any("is not the file" in r.getMessage() and "resumes from its checkpoints" in r.getMessage()
               for r in caplog.records)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
