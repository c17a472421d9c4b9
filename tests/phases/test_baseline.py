"""The baseline a run compares with (``common.phases.baseline``), on hand-written ledgers: the best per-epoch score
(never the weight average), and a baseline refused for each reason it is not comparable, or accepted and
recorded."""

import json
import re
from pathlib import Path

import pytest

from common.phases.baseline import differences, precheck, recorded_target, reference, stop_target

VALID = {"train": {}, "valid": {"/d/valid.jsonl.gz": {"sha256": "ab" * 32, "bytes": 10}}}
SETTINGS = {"eval_batches": None, "eval_batch_size": 8, "ranks": 1, "eval_crop": "start", "pad": "zeros"}
# per epoch 0.4, 0.62, 0.5; the weight average of epochs 2 and 3 scores 0.7, higher than any epoch
EVALS = [{"phase": 0, "epoch": 1, "phase_step": 3, "metrics": {"acc": 0.4}},
         {"phase": 0, "epoch": 2, "phase_step": 6, "metrics": {"acc": 0.62}},
         {"phase": 0, "epoch": 3, "phase_step": 9, "metrics": {"acc": 0.5}},
         {"phase": 0, "phase_step": 9, "weight_averaged": [2, 3], "metrics": {"acc": 0.7}}]


def baseline(root: Path, name: str = "base", finished: bool = True, **ledger) -> Path:
    """A finished baseline run directory, comparable with a run validated on ``VALID`` with ``SETTINGS``;
    ``ledger`` replaces top-level fields of its ledger."""
    run_dir = root / name
    run_dir.mkdir()
    data = {"score": "acc", "phases": [{"epochs": 3, "ended_by": "length"}], "evals": EVALS, "data": VALID,
            "evaluation": SETTINGS, **ledger}
    (run_dir / "ledger.json").write_text(json.dumps(data))
    if finished:
        (run_dir / "model.safetensors").write_bytes(b"weights")
    return run_dir


def target(run_dir, score="acc", valid=VALID, settings=SETTINGS, accept=False) -> dict:
    return stop_target(run_dir, score, valid, settings, accept)


def test_the_target_is_the_best_epoch_and_the_average_is_kept_apart(tmp_path):
    run_dir = baseline(tmp_path)
    assert target(run_dir) == {"run": str(run_dir), "score": "acc", "best": 0.62, "at": {"phase": 0, "epoch": 2},
                               "averaged": 0.7}
    assert reference(EVALS, "acc").score == 0.62 and reference(EVALS[3:], "acc") is None
    steps = [{"phase": 0, "phase_step": 100 * k, "metrics": {"acc": v}} for k, v in enumerate([0.2, 0.3, 0.3], 1)]
    assert reference(steps, "acc").where() == {"phase": 0, "step": 200}  # iteration-based: the first of equal maxima
    only_average = baseline(tmp_path, "avg", evals=EVALS[3:])
    with pytest.raises(ValueError, match="holds no per-epoch evaluation of 'acc' \\(only its weight average"):
        target(only_average)


def test_a_missing_or_broken_ledger_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.stop_when_surpassing: no ledger at .*missing"):
        target(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ledger.json").write_text("{")
    with pytest.raises(ValueError, match="broken/ledger.json is not valid JSON"):
        target(tmp_path / "broken")


@pytest.mark.parametrize("change,message", [
    ({"finished": False}, "not finished: no model.safetensors in .*base"),
    ({"finished": False, "phases": [{"epochs": 2, "steps": 6}]},
     "not finished: .*; phase 1 of its ledger has not ended \\(2 epochs, 6 steps\\)"),
    ({"score": "mAP"}, "metric mAP \\(baseline\\) vs acc \\(this run\\)"),
    ({"data": {"train": {}, "valid": {"/other/valid.jsonl.gz": {"sha256": "cd" * 32, "bytes": 10}}}},
     "other validation manifests: the baseline's \\(/other/valid.jsonl.gz sha256 cdcdcdcdcdcd\\) are not this "
     "run's \\(/d/valid.jsonl.gz sha256 abababababab\\)"),
    ({"data": None}, "its ledger does not record its validation manifests"),
    ({"evaluation": {**SETTINGS, "eval_batches": 2}}, "train.eval_batches 2 \\(baseline\\) vs None \\(this run\\)"),
    ({"evaluation": {**SETTINGS, "eval_crop": "center"}}, "data.eval_crop center \\(baseline\\) vs start"),
    ({"evaluation": {**SETTINGS, "pad": "repeat"}}, "data.pad repeat \\(baseline\\) vs zeros"),
    ({"evaluation": None}, "its ledger does not record its evaluation settings"),
])
def test_a_baseline_that_is_not_comparable_is_refused_naming_why_or_accepted_and_recorded(tmp_path, change, message):
    finished = change.pop("finished", True)
    run_dir = baseline(tmp_path, finished=finished, **change)
    with pytest.raises(ValueError, match=f"train.stop_when_surpassing: the baseline .*base is not comparable with this "
                                         f"run: .*{message}.*train.accept_baseline_differences=true"):
        target(run_dir)
    accepted = target(run_dir, accept=True)  # (another metric: its evaluations of this run's metric are compared)
    assert accepted["best"] == 0.62 and len(accepted["accepted_differences"]) == 1
    assert re.search(message, accepted["accepted_differences"][0])  # what was accepted, for the ledger


def test_partial_validation_rounds_must_score_the_same_clips():
    partial = {**SETTINGS, "eval_batches": 2}
    assert differences({"score": "acc", "data": VALID, "evaluation": partial}, "acc", VALID, partial) == []
    more_ranks = {**partial, "ranks": 2}
    assert differences({"score": "acc", "data": VALID, "evaluation": partial}, "acc", VALID, more_ranks) == [
        "validation clips per batch (data.eval_batch_size x ranks) 8 (baseline) vs 16 (this run), with "
        "train.eval_batches 2: other clips are scored"]
    # the whole set: the batches and ranks that score it do not matter
    assert differences({"score": "acc", "data": VALID, "evaluation": SETTINGS}, "acc", VALID,
                       {**SETTINGS, "ranks": 4, "eval_batch_size": 3}) == []
    # not strict (the report): only what both ledgers record is compared
    assert differences({"score": "acc"}, "acc", VALID, SETTINGS, strict=False) == []


def test_ssast_scores_compare_only_at_the_same_masking():
    """SSAST's masked-patch accuracy is an argmax over the masked patches: a run masking fewer (an easier task,
    chance 1/256 against 1/400) would "surpass" its baseline on another scale; such baselines are refused."""
    from common.data.config import DataConfig
    from common.models.ast.encoder import EncoderConfig
    from common.phases.baseline import evaluation_settings
    from common.training.spec import TrainConfig
    from finetune.classifier import AugmentConfig, ClassifierObjective
    from pretrain.ssast import SSASTConfig, SSASTObjective

    grid = EncoderConfig(embed_dim=32, depth=1, num_heads=2, num_mel_bins=128, input_tdim=1024)  # 8 x 64 patches

    def settings(**ssast):
        score = SSASTObjective(SSASTConfig(**ssast)).score_settings(grid)
        return evaluation_settings(TrainConfig(), DataConfig(), 8, 1, score)

    base = settings()
    assert base["score"] == {"masked": 400, "patches": 512, "masking": "auto", "cluster": [3, 5],
                             "nce_softmax": "targets"}
    assert differences({"score": "acc", "data": VALID, "evaluation": base}, "acc", VALID, settings()) == []
    assert differences({"score": "acc", "data": VALID, "evaluation": base}, "acc", VALID, settings(mask_ratio=0.5)) \
        == []  # trained with another mask, validated with 400 of 512 (the official validatemask)
    assert differences({"score": "acc", "data": VALID, "evaluation": base}, "acc", VALID,
                       settings(mask_ratio=0.5, eval_mask_ratio=None)) == [
        "the score's scale: masked 400 (baseline) vs 256 (this run)"]
    assert differences({"score": "acc", "data": VALID, "evaluation": base}, "acc", VALID,
                       settings(masking="uniform")) == ["the score's scale: masking auto (baseline) vs uniform (this run)"]
    assert differences({"score": "acc", "data": VALID, "evaluation": base}, "acc", VALID,
                       settings(nce_softmax="predictions")) == [
        "the score's scale: nce_softmax targets (baseline) vs predictions (this run)"]
    assert differences({"score": "acc", "data": VALID, "evaluation": SETTINGS}, "acc", VALID, base) == []  # older
    older = {**base, "score": {k: v for k, v in base["score"].items() if k != "nce_softmax"}}  # before the key
    assert differences({"score": "acc", "data": VALID, "evaluation": older}, "acc", VALID,
                       settings(nce_softmax="predictions")) == []
    assert ClassifierObjective(["a", "b"], "acc", "ce", AugmentConfig()).score_settings(grid) == {}  # a classifier's scores need nothing more


def test_a_run_that_resumes_with_its_target_needs_no_baseline(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "phase2-epoch1").mkdir(parents=True)
    (run_dir / "ledger.json").write_text(json.dumps({"stop_when_surpassing": {"run": "gone", "best": 0.5}}))
    assert recorded_target(run_dir) == {"run": "gone", "best": 0.5}
    precheck(str(tmp_path / "gone"), "acc", run_dir, [], SETTINGS)  # resumes: the baseline is not read
    with pytest.raises(FileNotFoundError, match="no ledger at .*gone"):
        precheck(str(tmp_path / "gone"), "acc", run_dir, [], SETTINGS, restart=True)
    with pytest.raises(FileNotFoundError, match="no ledger at .*gone"):
        precheck(str(tmp_path / "gone"), "acc", tmp_path / "fresh", [], SETTINGS)
    assert recorded_target(tmp_path / "fresh") is None


def test_several_validation_manifests_are_named_each_with_its_own_hash():
    from common.phases.baseline import differences

    def side(pairs):
        return {"train": {}, "valid": {path: {"sha256": sha * 32, "bytes": 10} for path, sha in pairs}}

    base = {"score": "acc", "data": side([("/d/a.jsonl.gz", "ff"), ("/d/b.jsonl.gz", "00")])}
    said = differences(base, "acc", side([("/d/a.jsonl.gz", "ff"), ("/d/b.jsonl.gz", "11")]), None)
    assert said == ["other validation manifests: the baseline's (/d/a.jsonl.gz sha256 ffffffffffff; /d/b.jsonl.gz "
                    "sha256 000000000000) are not this run's (/d/a.jsonl.gz sha256 ffffffffffff; /d/b.jsonl.gz sha256 "
                    "111111111111)"]
