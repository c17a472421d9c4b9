"""Input that used to pass without a word: each is refused (exit code and a message naming the value) or, where
it may be intended, warned about."""

import gzip
import json
import logging

import pytest

from common.cli import PLAN_NOT_READY
from common.data.corpora.__main__ import main as corpora
from finetune.run import main as finetune
from pretrain.run import main as pretrain
from tests.layouts import write_clip


@pytest.fixture
def clips(tmp_path):
    """Six short clips in tmp_path/clips."""
    for i in range(6):
        write_clip(tmp_path / "clips" / f"c{i}.wav", seconds=0.3, seed=i)
    return tmp_path


def _task_file(folder, name="mine", frames=32, norm="audioset", classes=None) -> str:
    task = folder / "task.yaml"
    task.write_text(f"name: {name}\ntrain: [out/{name}_train.jsonl.gz]\nvalid: [out/{name}_valid.jsonl.gz]\n"
                    f"classes: {classes or f'out/{name}_classes.json'}\ntarget_frames: {frames}\nnorm: {norm}\n"
                    f"metric: acc\nloss: ce\nepochs: 1\n")
    return str(task)


TINY = ["--set", "model.size=custom", "--set", "model.embed_dim=32", "--set", "model.depth=1",
        "--set", "model.num_heads=2", "--set", "data.batch_size=2", "--set", "data.num_workers=0"]


def test_a_csv_row_without_a_label_is_warned_about_and_a_single_label_task_refuses_it(clips, caplog, capsys):
    rows = ["clips/c0.wav,dog,train", "clips/c1.wav,,train", "clips/c2.wav,cat,train", "clips/c3.wav,cat,train",
            "clips/c4.wav,dog,valid", "clips/c5.wav,cat,valid"]
    (clips / "list.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        assert corpora(["prepare", "custom", "--csv", str(clips / "list.csv"), "--out", str(clips / "out"),
                        "--name", "mine"]) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "1 of 6 rows have no label (line 3: clips/c1.wav)" in warning and "single-label task" in warning
    capsys.readouterr()
    assert finetune(["--init", "none", "--task", _task_file(clips), "--run-dir", str(clips / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: task.train.0: 1 clip(s) of ") and "have no label (e.g. clips-c1)" in err
    assert "single-label task" in err and not (clips / "run").exists()


def test_a_clip_with_several_labels_is_refused_by_a_single_label_task(clips, capsys):
    """A multi-label CSV (``dog;cat``) under a task file that trains with cross-entropy: each of a clip's labels
    counted as a whole target (a loss twice AST's); now one line names the clip and its labels, before the run."""
    rows = ["clips/c0.wav,dog,train", "clips/c1.wav,dog;cat,train", "clips/c4.wav,dog,valid", "clips/c5.wav,cat,valid"]
    (clips / "list.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    assert corpora(["prepare", "custom", "--csv", str(clips / "list.csv"), "--out", str(clips / "out"),
                    "--name", "mine"]) == 0
    capsys.readouterr()
    assert finetune(["--init", "none", "--task", _task_file(clips), "--run-dir", str(clips / "run"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: task.train.0: 1 clip(s) of ") and "(e.g. clip clips-c1: 'dog', 'cat')" in err
    assert "task.loss: bce, task.metric: map" in err and len(err.splitlines()) == 1 and not (clips / "run").exists()


def test_a_label_outside_the_class_list_is_refused_before_any_compute(clips, capsys):
    """A manifest and a class list from different preparations: the run stopped with a worker's traceback when
    the clip's batch was drawn; now one line names the key, the clip and the label, before the run starts."""
    rows = ["clips/c0.wav,dog,train", "clips/c1.wav,cat,train", "clips/c4.wav,dog,valid", "clips/c5.wav,cat,valid"]
    (clips / "list.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    assert corpora(["prepare", "custom", "--csv", str(clips / "list.csv"), "--out", str(clips / "out"),
                    "--name", "mine"]) == 0
    (clips / "other.json").write_text(json.dumps({"classes": ["cat", "bird"]}))
    capsys.readouterr()
    assert finetune(["--init", "none", "--task", _task_file(clips, classes="other.json"), "--run-dir",
                     str(clips / "run"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: task.train.0: 1 clip(s) of ") and "labels that are not in the class list" in err
    assert "(e.g. clip clips-c0: 'dog')" in err and len(err.splitlines()) == 1 and not (clips / "run").exists()


def test_a_csv_with_only_a_header_is_refused(tmp_path, capsys):
    (tmp_path / "list.csv").write_text("path,label,split\n")
    assert corpora(["prepare", "custom", "--csv", str(tmp_path / "list.csv"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'list.csv'}: no rows under its header path,label,split: nothing to prepare\n"
    assert not (tmp_path / "out").exists()


def test_a_preparation_that_writes_no_clip_fails(tmp_path, capsys):
    (tmp_path / "list.csv").write_text("path,label\ngone.wav,dog\n")
    assert corpora(["prepare", "custom", "--csv", str(tmp_path / "list.csv"), "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "custom: 0 clips (none), 1 classes; 1 missing on disk" in captured.out
    assert captured.err.startswith("error: no clip was written; ") and "custom_prepare.json" in captured.err


@pytest.mark.parametrize("split, guess", [("training", "train"), ("validation", "valid"), ("Test", "test"),
                                          ("holdout", None)])
def test_a_mistyped_split_name_is_refused(clips, capsys, split, guess):
    (clips / "list.csv").write_text(f"path,label,split\nclips/c0.wav,dog,train\nclips/c1.wav,cat,{split}\n")
    assert corpora(["prepare", "custom", "--csv", str(clips / "list.csv"), "--out", str(clips / "out")]) == 2
    err = capsys.readouterr().err
    assert f"list.csv, line 3: split {split!r} is not one of train, valid, test, foldN" in err
    assert (f"did you mean {guess!r}?" in err) if guess else "did you mean" not in err
    assert not list(clips.glob("out/*.jsonl.gz"))


def test_a_split_folder_with_a_mistyped_name_is_refused(tmp_path, capsys):
    write_clip(tmp_path / "tree" / "training" / "dog" / "a.wav", seconds=0.3)  # no train/: it would be a class
    assert corpora(["prepare", "custom", "--src", str(tmp_path / "tree"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "training: named like a split, but split folders are train, valid, test (rename it 'train')" in err
    write_clip(tmp_path / "tree" / "train" / "dog" / "b.wav", seconds=0.3)  # beside train/: it would be ignored
    assert corpora(["prepare", "custom", "--src", str(tmp_path / "tree"), "--out", str(tmp_path / "out")]) == 2
    assert "it would be ignored" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["fshift:-4", "fshift:4,-2", "fshift:4-"])
def test_a_negative_or_broken_coarse_factor_is_refused(value, capsys):
    from tests.helpers import ROOT

    assert pretrain(["--recipe", str(ROOT / "recipes" / "ssast_baseline.yaml"), "--coarse", value, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --coarse {value!r}: C must be a factor or factors like 4 or 4,2")
    assert f"got {value.split(':')[1]!r}" in err


@pytest.mark.parametrize("entry, args", [(pretrain, ["--recipe", "recipes/synth_pretrain.yaml"]),
                                         (finetune, ["--init", "none", "--task", "synth"])])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_stop_after_steps_must_be_a_positive_count(entry, args, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        entry([*args, "--stop-after-steps", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --stop-after-steps: a whole number of optimiser steps >= 1, got {value!r}" in err


# every option that takes a whole number (common.system.prog.whole_number): module, the command's other arguments
# (nothing they name is read: the option is refused first), the option, its least value, how the bound is said
WHOLE_NUMBER_OPTIONS = [
    ("pretrain.run", ["--recipe", "recipes/synth_pretrain.yaml", "--dry-run"], "--world-size", 1, "of ranks >= 1"),
    ("finetune.run", ["--init", "none", "--task", "synth", "--dry-run"], "--world-size", 1, "of ranks >= 1"),
    ("finetune.predict", ["--ckpt", "m", "a.wav"], "--top-k", 1, "of labels >= 1"),
    ("finetune.evaluate", ["--ckpt", "m", "x.jsonl.gz"], "--batch-size", 1, "of clips >= 1"),
    ("finetune.evaluate", ["--ckpt", "m", "x.jsonl.gz"], "--workers", 0, ">= 0 (0: decode in this process)"),
    ("finetune.embed", ["--init", "m", "--inputs", "a.wav", "--out", "o"], "--batch-size", 1, "of windows >= 1"),
    ("finetune.embed", ["--init", "m", "--inputs", "a.wav", "--out", "o"], "--shard-size", 1, "of windows >= 1"),
    ("finetune.embed", ["--init", "m", "--inputs", "a.wav", "--out", "o"], "--workers", 0,
     ">= 0 (0: decode in this thread)"),
    ("finetune.linear_probe", ["--init", "m", "--task", "synth"], "--workers", 0, ">= 0 (0: decode in this process)"),
    ("finetune.onnx_export", ["m", "--out", "m.onnx"], "--opset", 18,
     ">= 18, the lowest opset the exporter writes these graphs at"),
    ("common.reports.report", ["--baseline", "b", "--runs", "r"], "--stop-epoch", 1, ">= 1 (epochs count from 1)"),
    ("common.data.corpora.__main__", ["prepare", "synth", "--out", "o"], "--seed", 0, ">= 0"),
    ("common.data.corpora.__main__", ["stats", "m.jsonl.gz"], "--workers", 0, ">= 0 (0: decode in this process)"),
    ("common.data.corpora.__main__", ["prepare", "custom", "--csv", "l.csv", "--out", "o"], "--seed", 0, ">= 0"),
]


@pytest.mark.parametrize("module, args, option, least, said", WHOLE_NUMBER_OPTIONS,
                         ids=[f"{m}{o}" for m, _, o, _, _ in WHOLE_NUMBER_OPTIONS])
def test_an_option_taking_a_whole_number_refuses_anything_else_in_one_line(module, args, option, least, said,
                                                                            capsys):
    """A number below the option's bound, a negative one, text and a fraction: exit status 2 and one error line
    naming the option, the bound and what was typed (0 ranks, labels or clips passed without a word, or failed
    later with another message or a traceback)."""
    import importlib

    main = importlib.import_module(module).main
    for value in dict.fromkeys([str(least - 1), "-1", "x", "1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, option, value])
        assert exit_info.value.code == 2, value
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].endswith(f": error: argument {option}: a whole number {said}, got "
                                                       f"{value!r}"), errors


@pytest.mark.parametrize("module", ["common.models.flops", "common.models.htsat.__main__"])
def test_compression_factors_are_whole_numbers_from_2(module, capsys):
    """The FLOPs tables' --factors: 'x' or '4,' ended in int()'s traceback, 0 in Compression's, 1 repeated the
    full-resolution row under every method."""
    import importlib

    main = importlib.import_module(module).main
    for value in ("1", "0", "-2", "x", "4,1.5", "4,"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--factors", value])
        assert exit_info.value.code == 2, value
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].endswith(f": error: argument --factors: comma-separated whole numbers "
                                                       f">= 2 (1, full resolution, is the 'none' row), got {value!r}")


def test_a_very_short_clip_is_scored_with_a_warning(tmp_path, model_file, capsys):
    from finetune.predict import main as predict
    from tests.helpers import _write

    model = model_file("ce")
    short, normal = _write(tmp_path / "short.wav", 0.05), _write(tmp_path / "normal.wav", 0.6)
    assert predict(["--ckpt", str(model), str(short), str(normal), "--json"]) == 0
    captured = capsys.readouterr()
    entries = {e["file"]: e for e in json.loads(captured.out)}
    warning = ("0.05 s of audio, shorter than 0.0655 s (a tenth of the model's 0.655 s clip): the model sees mostly "
               "zero padding and the scores are unreliable")
    assert entries[str(short)]["warning"] == warning and "warning" not in entries[str(normal)]
    assert captured.err == f"warning: {short}: {warning}\n"
    assert predict(["--ckpt", str(model), str(short)]) == 0
    assert "(0.05 s, 1 window; too short: unreliable scores)" in capsys.readouterr().out
    from finetune.predict import short_warning  # a model that fills a short clip by repeating it says so

    assert short_warning(800, 10480, 16000, repeat=True).endswith(
        "the model sees the file repeated more than ten times and the scores are unreliable")


def test_statistics_of_another_clip_length_are_warned_about(clips, capsys):
    from common.data.corpora.stats import compute_stats

    (clips / "list.csv").write_text("path,label,split\n" + "".join(
        f"clips/c{i}.wav,{'dog' if i % 2 else 'cat'},{'valid' if i > 3 else 'train'}\n" for i in range(6)))
    assert corpora(["prepare", "custom", "--csv", str(clips / "list.csv"), "--out", str(clips / "out"),
                    "--name", "mine"]) == 0
    compute_stats(clips / "out" / "mine_train.jsonl.gz", target_frames=1024, workers=0)  # stats' default length
    task = _task_file(clips, frames=512, norm="out/mine_train.stats.json")
    capsys.readouterr()
    assert finetune(["--init", "none", "--task", task, "--dry-run", *TINY]) == 0
    out = capsys.readouterr().out
    stats = clips / "out" / "mine_train.stats.json"
    assert (f"warning: task.norm: {stats} was computed at 1024 frames per clip, this run cuts / pads clips to 512"
            in out)
    assert f"recompute them with `python -m common.data.corpora stats {clips / 'out' / 'mine_train.jsonl.gz'} " \
           f"--target-frames 512`" in out
    # a model that normalises its input itself (HTS-AT's BatchNorm) does not read the statistics: nothing to warn of
    assert finetune(["--init", "none", "--task", task, "--dry-run", "--set", "model={arch: htsat}",
                     "--set", "data.batch_size=2"]) == 0
    assert "task.norm" not in capsys.readouterr().out
    compute_stats(clips / "out" / "mine_train.jsonl.gz", target_frames=512, workers=0)
    assert finetune(["--init", "none", "--task", task, "--dry-run", *TINY]) == 0
    assert "warning" not in capsys.readouterr().out


def test_pretraining_statistics_of_another_clip_length_are_warned_about(tmp_path, capsys):
    from tests.helpers import ROOT

    stats = tmp_path / "pool.stats.json"
    stats.write_text(json.dumps({"mean": -4.2, "std": 4.5, "clips": 10, "target_frames": 1024, "num_mel_bins": 128,
                                 "manifest": "data/synth/synth_pool.jsonl.gz"}))
    assert pretrain(["--recipe", str(ROOT / "recipes" / "synth_pretrain.yaml"), "--set", f"audio.norm={stats}",
                     "--dry-run"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert (f"warning: audio.norm: {stats} was computed at 1024 frames per clip, this run cuts / pads clips to 128; "
            in out) and "`python -m common.data.corpora stats data/synth/synth_pool.jsonl.gz --target-frames 128`" in out


@pytest.mark.parametrize("content, message", [
    ('["dog", "cat"]', "holds a JSON list, not a class list; a class list is an object {\"classes\": [class ids"),
    ("dog\ncat\n", "is not a JSON class list (Expecting value: line 1 column 1 (char 0)); a class list is"),
])
def test_a_class_list_that_is_not_one_says_what_it_is(tmp_path, capsys, content, message):
    (tmp_path / "classes.json").write_text(content)
    for split in ("train", "valid"):
        (tmp_path / "out").mkdir(exist_ok=True)
        with gzip.open(tmp_path / "out" / f"mine_{split}.jsonl.gz", "wt") as handle:
            handle.writelines(json.dumps({"id": i, "custom": {"labels": ["dog"]}}) + "\n" for i in "ab")
    task = _task_file(tmp_path, classes="classes.json")
    assert finetune(["--init", "none", "--task", task, *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: task.classes: {tmp_path / 'classes.json'} ") and message in err


def test_a_gzip_of_lines_that_are_not_json_says_so(tmp_path, capsys):
    manifest = tmp_path / "out" / "mine_train.jsonl.gz"
    manifest.parent.mkdir()
    with gzip.open(manifest, "wt") as handle:
        handle.write("clips/c0.wav,dog\nclips/c1.wav,cat\n")
    expected = (f"manifest {manifest}: line 1 is not JSON (b'clips/c0.wav,dog'); a Lhotse manifest holds one JSON "
                f"cut per line")
    assert corpora(["stats", str(manifest)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {expected}")
    (tmp_path / "out" / "mine_classes.json").write_text('{"classes": ["dog", "cat"]}')
    assert finetune(["--init", "none", "--task", _task_file(tmp_path), "--dry-run", *TINY]) == PLAN_NOT_READY
    assert f"  task.train.0: {expected}" in capsys.readouterr().out
    (tmp_path / "plain.jsonl.gz").write_text("not gzip\n")
    assert corpora(["stats", str(tmp_path / "plain.jsonl.gz")]) == 2
    assert capsys.readouterr().err == (f"error: manifest {tmp_path / 'plain.jsonl.gz'}: cannot be read as gzip "
                                       f"(Not a gzipped file (b'no'))\n")
