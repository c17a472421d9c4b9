"""finetune/evaluate.py as a command: a model's scores on labelled manifests, computed as its validation did,
with unreadable clips skipped and counted and bad input in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet

from common.config.recipe import RecipeError
from common.data.preflight import check_labels
from common.metrics import compute_metrics
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from finetune.classifier import Classifier, load_classifier, save_classifier
from finetune.evaluate import main
from finetune.inference import clip_for_export, predict_logits
from tests.helpers import PREDICT_AUDIO


@pytest.fixture
def synth_model(tmp_path, synth_corpus):
    """A tiny AST classifier (random weights, a sharp head) on the synth corpus's classes."""
    classes = json.loads((synth_corpus / "synth_classes.json").read_text())["classes"]
    torch.manual_seed(0)
    model = Classifier(ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=64)), len(classes))
    torch.nn.init.normal_(model.head[1].weight, std=1.0)
    return save_classifier(model, tmp_path / "model.safetensors", classes,
                           {"audio": PREDICT_AUDIO, "phase": {"compression": "none", "factor": 1}, "loss": "ce"})


def _by_hand(path, manifest) -> dict:
    """The metrics from each clip read with soundfile, cut from its start or zero-padded to the model's clip, on
    each class's sigmoid."""
    model, meta = load_classifier(path)
    rate, size = clip_for_export(meta)
    classes = meta["classifier"]["classes"]
    scores, targets = [], []
    for cut in CutSet.from_file(manifest):
        wave, sr = sf.read(cut.recording.sources[0].source, dtype="float32")
        assert sr == rate
        clip = np.zeros(size, np.float32)
        clip[:min(size, wave.size)] = wave[:size]
        logits = predict_logits(model, meta, torch.from_numpy(clip)[None], torch.tensor([size]))[0]
        scores.append(torch.sigmoid(logits).numpy())  # AST's validation scores sigmoids, a softmax model's too
        targets.append(np.isin(classes, cut.custom["labels"]).astype(np.float32))
    return compute_metrics(np.stack(targets), np.stack(scores))


def test_the_scores_are_the_clips_scored_one_by_one(synth_model, synth_corpus, capsys):
    manifest = synth_corpus / "synth_test.jsonl.gz"
    assert main(["--ckpt", str(synth_model), str(manifest), "--json", "--workers", "0", "--batch-size", "5"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = _by_hand(synth_model, manifest)
    assert got["clips"] == 12 and got["bad_clips"] == 0 and got["manifests"] == [str(manifest)]
    assert '"clips": 12,' in json.dumps(got) and '"bad_clips": 0' in json.dumps(got)  # counts, not 12.0
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-5)
    assert main(["--ckpt", str(synth_model), str(manifest), "--workers", "0"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"{synth_model} on {manifest}: acc={expected['acc']:.4f} mAP={expected['mAP']:.4f} " \
                   f"mAUC={expected['mAUC']:.4f} (12 clips)"
    run_dir = synth_model.parent / "run"  # a run directory: named by the model file it scores
    run_dir.mkdir()
    shutil.copy(synth_model, run_dir / "model.safetensors")
    assert main(["--ckpt", str(run_dir), str(manifest), "--workers", "0"]) == 0
    assert capsys.readouterr().out.startswith(f"{run_dir / 'model.safetensors'} on {manifest}: acc=")


def test_json_output_is_json_when_a_metric_is_undefined(synth_model, synth_corpus, tmp_path, capsys):
    """One clip: no class has both positives and negatives, so the mAUC (and its d') is undefined: null in the
    output, which JSON readers other than Python's accept (NaN is not JSON)."""
    cuts = CutSet.from_file(synth_corpus / "synth_test.jsonl.gz").to_eager()
    one = tmp_path / "one.jsonl.gz"
    cuts.subset(first=1).to_file(one)
    assert main(["--ckpt", str(synth_model), str(one), "--json", "--workers", "0"]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    got = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert got["clips"] == 1 and got["mAUC"] is None and got["acc"] in (0.0, 1.0)


def test_unreadable_clips_are_skipped_and_counted_and_bad_input_is_one_line(synth_model, synth_corpus, tmp_path,
                                                                            capsys):
    cuts = CutSet.from_file(synth_corpus / "synth_test.jsonl.gz").to_eager()
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"fLaC not audio")
    first = cuts[0]
    first.recording.sources[0].source = str(broken)
    damaged = tmp_path / "damaged.jsonl.gz"
    CutSet.from_cuts([first, *list(cuts)[1:]]).to_file(damaged)
    assert main(["--ckpt", str(synth_model), str(damaged), "--json", "--workers", "0"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["clips"] == 11 and json.loads(captured.out)["bad_clips"] == 1
    assert "error: 1 clips could not be read and were skipped" in captured.err
    assert main(["--ckpt", str(synth_model), str(tmp_path / "nowhere.jsonl.gz")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no manifest at {tmp_path / 'nowhere.jsonl.gz'}"
    other = tmp_path / "other.jsonl.gz"  # a label the model does not know, named with its clip
    unknown = list(cuts)[1]
    unknown.custom["labels"] = ["thunder"]
    CutSet.from_cuts([unknown]).to_file(other)
    for workers in ("0", "2"):  # named in one line before any decoding (a worker's error carried its traceback)
        assert main(["--ckpt", str(synth_model), str(other), "--workers", workers]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {other}: 1 clip(s) of {other} have labels that are not in the class list of the " \
                      f"model (e.g. clip {unknown.id}: 'thunder'); prepare the manifest and its class list together"
    unlabeled = tmp_path / "unlabeled.jsonl.gz"  # the pool split: audio without labels
    CutSet.from_cuts([unknown.with_custom("labels", [])]).to_file(unlabeled)
    assert main(["--ckpt", str(synth_model), str(unlabeled)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {unlabeled}: {unlabeled} is a manifest of unlabeled audio (none of its 1 clip(s) " \
                          f"has a label: the pool split, for pretraining); give a labelled split (train, valid, test)"
    with pytest.raises(RecipeError, match="is a manifest of unlabeled audio"):  # a multi-label task's split too
        check_labels(unlabeled, "task.train.0", ["thunder"], single_label=False)
    partly = tmp_path / "partly.jsonl.gz"  # some clips without a label: named, with the first of them
    CutSet.from_cuts([unknown.with_custom("labels", []), list(cuts)[2]]).to_file(partly)
    assert main(["--ckpt", str(synth_model), str(partly)]) == 2
    err = capsys.readouterr().err
    assert "1 clip(s) of " in err and "have no label" in err


@pytest.mark.parametrize("meta,refused", [({"loss": "bce", "metric": "acc"}, True),  # VGGSound's, SpeechCommands'
                                          ({"loss": "bce", "metric": "mAP"}, False),  # AudioSet's: several labels
                                          ({"loss": "bce"}, False)])  # no metric recorded: the loss decides
def test_a_bce_model_scored_by_accuracy_takes_one_label_per_clip(tmp_path, synth_corpus, capsys, meta, refused):
    """Accuracy counts a clip without a label as class 0 and one with two as either: a model trained with BCE for
    accuracy refuses such clips in one line, as its fine-tuning did (it scored them without a word)."""
    classes = json.loads((synth_corpus / "synth_classes.json").read_text())["classes"]
    torch.manual_seed(0)
    model = save_classifier(Classifier(ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=64)),
                                       len(classes)), tmp_path / "bce.safetensors", classes,
                            {"audio": PREDICT_AUDIO, "phase": {"compression": "none", "factor": 1}, **meta})
    cuts = list(CutSet.from_file(synth_corpus / "synth_test.jsonl.gz"))
    two = tmp_path / "two.jsonl.gz"
    CutSet.from_cuts([cuts[0].with_custom("labels", classes[:2]), *cuts[1:]]).to_file(two)
    assert main(["--ckpt", str(model), str(two), "--workers", "0"]) == (2 if refused else 0)
    err = capsys.readouterr().err
    assert (f"1 clip(s) of {two} have several labels (e.g. clip {cuts[0].id}" in err) == refused, err
