"""Fine-tuning, linear probing and prediction on miniature corpora."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.cli import PLAN_NOT_READY
from common.data.corpora import get_corpus
from common.metrics import accuracy, mean_average_precision
from common.reports.folds import cross_validation_summary
from finetune.run import main as finetune
from finetune.tasks import TASKS, TaskConfig
from tests.helpers import TINY, _synth_root, sets

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ metrics
def test_map_and_accuracy_on_known_inputs():
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.3, 0.2, 0.4], [0.1, 0.6, 0.9]])
    # class 0: ranking .9(+) .8(-) .3(+) .1(-): AP = (1/1 + 2/3) / 2 = 0.8333
    # class 1: ranking .7(+) .6 .2 .1: AP = 1; class 2: ranking .9(-) .4 .2(+) .1: AP = 1/3
    assert mean_average_precision(targets, scores) == pytest.approx((5 / 6 + 1 + 1 / 3) / 3)
    assert accuracy(targets[:3], scores[:3]) == pytest.approx(1 / 3)  # row 0 right; rows 1 (.8 > .7), 2 wrong
    # a class without any positive clip has no AP and is left out
    assert mean_average_precision(targets[:, :2], scores[:, :2]) == pytest.approx((5 / 6 + 1) / 2)
    with pytest.raises(ValueError, match="must both be"):
        accuracy(targets, scores[:, :2])


def test_d_prime_and_the_scores_validation_ranks():
    from common.metrics import compute_metrics, d_prime
    from finetune.classifier import metric_scores

    assert d_prime(0.5) == 0.0 and d_prime(0.9) == pytest.approx(1.812388, abs=1e-6)  # sqrt(2) * Phi^-1(0.9)
    assert d_prime(1.0) == float("inf") and np.isnan(d_prime(float("nan")))
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=float)
    metrics = compute_metrics(targets, np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]]))
    assert metrics["mAUC"] == 1.0 and metrics["dprime"] == float("inf")
    # a cross-entropy model's classes are ranked by their logits, as AST's validation (sigmoids) ranks them,
    # not by softmax shares: clip 1's class 0 logit is the lower, its softmax share the higher
    logits = torch.tensor([[2.0, 1.9], [1.0, -5.0]])
    assert metric_scores(logits)[:, 0].argmax() == 0 and torch.softmax(logits, -1)[:, 0].argmax() == 1


def test_confident_logits_keep_their_order_and_non_finite_scores_are_named():
    """A float32 sigmoid is exactly 1 from a logit of 16.6: two classes of a confident clip tied, and the argmax
    took the lower index (accuracy 0.5 where the softmax's is 1); a saturated negative tied with the positives (AP
    0.667 for 0.833). The scores rank in float64. A NaN output was scikit-learn's bare 'Input contains NaN.'."""
    from common.metrics import compute_metrics
    from finetune.classifier import metric_scores

    logits = torch.tensor([[17.0, 18.0, -5.0], [-3.0, 2.0, 9.0]])
    targets = np.array([[0, 1, 0], [0, 0, 1]], dtype=float)
    assert compute_metrics(targets, metric_scores(logits).numpy())["acc"] == 1.0
    one = metric_scores(torch.tensor([[20.0], [18.0], [17.0], [0.0]])).numpy()
    assert mean_average_precision(np.array([[1], [0], [1], [0]], dtype=float), one) == pytest.approx(5 / 6)
    scores = metric_scores(logits).numpy()
    scores[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"^1 of the 6 scores \(1 of 2 clips\) are not finite \(NaN or infinite\): "
                                         r"the model's outputs went non-finite$"):
        compute_metrics(targets, scores)


def test_a_class_positive_in_every_clip_leaves_the_auc_to_the_others():
    """A class with no negative has no ROC AUC: it is left out of mAUC (and d') as a class without positives is,
    not averaged in as a NaN."""
    from common.metrics import compute_metrics, mean_auc

    targets = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 0], [1, 0, 1]], dtype=float)  # class 0 in every clip
    scores = np.array([[0.5, 0.9, 0.2], [0.5, 0.3, 0.6], [0.5, 0.4, 0.7], [0.5, 0.6, 0.1]])
    # class 1: its positives score 0.9 and 0.4, its negatives 0.3 and 0.6: 3 of 4 pairs ranked right; class 2: 1 of 4
    assert mean_auc(targets, scores) == pytest.approx((0.75 + 0.25) / 2)
    metrics = compute_metrics(targets, scores)
    assert metrics["mAUC"] == pytest.approx(0.5) and metrics["dprime"] == pytest.approx(0.0, abs=1e-12)
    assert mean_auc(targets[:, :1], scores[:, :1]) != mean_auc(targets[:, :1], scores[:, :1])  # none usable: NaN


def test_esc50_folds_and_cross_validation_on_known_inputs():
    task = TaskConfig(**TASKS["esc50"][0], data_root="/d")
    splits = task.fold_splits()
    assert len(splits) == 5
    train, test = splits[2]
    assert test == ["/d/esc50/esc50_fold3.jsonl.gz"] and len(train) == 4 and test[0] not in train

    def evals(values):
        return [{"phase": 0, "epoch": e + 1, "metrics": {"acc": v}} for e, v in enumerate(values)] + [
            {"phase": 0, "weight_averaged": [1, 2], "metrics": {"acc": 1.0}}]  # no epoch: ignored

    folds = [evals([0.5, 0.7, 0.6]), evals([0.6, 0.6, 0.9]), evals([0.4, 0.8, 0.5])]
    summary = cross_validation_summary(folds, "acc")
    assert [round(r["mean"], 4) for r in summary["per_epoch"]] == [0.5, 0.7, 0.6667]
    assert summary["best"]["epoch"] == 2 and summary["best"]["folds"] == [0.7, 0.6, 0.8]
    tie = cross_validation_summary([evals([0.5, 0.75]), evals([0.75, 0.5])], "acc")
    assert tie["best"]["epoch"] == 1  # the earliest of equal means
    assert "left_out" not in summary and "left_out" not in tie
    # a fold that stopped early (stop_when_surpassing): the epochs it lacks are averaged over no fold, and said
    short = cross_validation_summary([evals([0.5, 0.9]), evals([0.6, 0.8]), evals([0.7])], "acc")
    assert short["best"]["epoch"] == 1 and short["left_out"] == [{"phase": 0, "epoch": 2, "folds": [1, 2]}]


def test_paper_tasks_use_the_authors_statistics_and_losses():
    """VoxCeleb / VGGSound as the authors' FlexiAST recipes; Kinetics-Sounds the AudioSet setup (item 5)."""
    from common.audio.fbank import NormStats, resolve_norm_stats
    from finetune.recipe import load_recipe

    recipes = {name: load_recipe(name) for name in ("voxceleb", "vggsound", "kinetics_sounds", "audioset")}
    assert resolve_norm_stats(recipes["voxceleb"].audio().norm) == NormStats(-3.7614744, 4.2011642)
    assert resolve_norm_stats(recipes["vggsound"].audio().norm) == NormStats(-5.0767093, 4.4533687)
    assert {name: r.task.loss for name, r in recipes.items()} == {
        "voxceleb": "ce", "vggsound": "bce", "kinetics_sounds": "bce", "audioset": "bce"}
    for name in ("voxceleb", "vggsound", "kinetics_sounds"):
        assert recipes[name].task.loss.upper() in recipes[name].task.description


def test_unknown_task_lists_the_known_ones(capsys, tmp_path):
    assert finetune(["--init", "none", "--task", "vgg"]) == 2  # bad input, as every check before compute
    err = capsys.readouterr().err
    assert "unknown task 'vgg'" in err and "esc50" in err and "speechcommands" in err
    missing = tmp_path / "synht.yaml"  # a task file, not a recipe
    assert finetune(["--init", "none", "--task", str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --task: task file {missing} does not exist (a registered task")


# ------------------------------------------------------------------- every task on its miniature corpus
def _prepare(name: str, root: Path) -> None:
    from tests import layouts

    src = root / "src" / name
    __import__(f"tests.layouts.{name}")
    getattr(layouts, name).build(src)
    get_corpus(name).prepare(src, root / name)


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_fine_tunes_one_epoch_on_its_miniature_corpus(tmp_path, task, synth_corpus):
    corpus = {"audioset20k": "audioset"}.get(task, task)
    data = tmp_path / "data"
    if corpus == "synth":
        data = _synth_root(tmp_path, synth_corpus)
    else:
        _prepare(corpus, data)
    run_dir = tmp_path / "run"
    spec, defaults = TASKS[task]
    averaged = defaults.get("train", {}).get("weight_average_from") is not None
    assert finetune(["--init", "none", "--task", task, "--data-root", str(data), "--run-dir", str(run_dir),
                     *sets(*TINY, "phases=[{compression: none, epochs: 1}]", "data.batch_size=2",
                           *(["train.weight_average_from=1"] if averaged else []))]) == 0
    fold_dirs = [run_dir / f"fold{k}" for k in range(1, 6)] if spec.get("folds") else [run_dir]
    for d in fold_dirs:
        ledger = json.loads((d / "ledger.json").read_text())
        assert ledger["score"] == spec["metric"] and ledger["evals"][0]["epoch"] == 1
        assert 0.0 <= ledger["evals"][0]["metrics"][spec["metric"]] <= 1.0
    from finetune.classifier import load_classifier
    model, meta = load_classifier(fold_dirs[0])
    classes = json.loads((data / corpus / f"{corpus}_classes.json").read_text())["classes"]
    assert meta["classifier"]["classes"] == classes and meta["audio"]["target_frames"] == spec["target_frames"]
    if spec.get("folds"):
        summary = json.loads((run_dir / "cv_summary.json").read_text())
        assert len(summary["best"]["folds"]) == 5
        from common.reports.runs import load_run  # the report reads the root as the folds' mean
        mean = load_run(run_dir).ledger.evals[0]
        assert mean["metrics"][spec["metric"]] == pytest.approx(summary["best"]["mean"])
    if spec.get("test"):
        tested = json.loads((run_dir / "test_metrics.json").read_text())
        assert "acc" in tested and isinstance(tested["clips"], int)
    if averaged:  # AudioSet: the weight average of the epochs is the model
        assert (run_dir / "export" / "weight_averaged.safetensors").is_file()
        assert json.loads((run_dir / "ledger.json").read_text())["evals"][-1]["weight_averaged"] == [1]


# -------------------------------------------------------------------------------- initialisation
@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synth"
    get_corpus("synth").prepare(None, out, size="small", seed=1)
    return out.parent


@pytest.mark.slow
def test_fine_tuning_a_pretrained_run_beats_chance_clearly(tmp_path, small_synth):
    from pretrain.run import main as pretrain

    pre = tmp_path / "pre"
    assert pretrain(["--recipe", str(ROOT / "recipes" / "synth_pretrain.yaml"), "--run-dir", str(pre),
                     *sets(f"data.train=[{{path: {small_synth / 'synth' / 'synth_pool.jsonl.gz'}}}]",
                           f"data.valid=[{small_synth / 'synth' / 'synth_valid.jsonl.gz'}]", "data.num_workers=0",
                           "phases.0.steps=10", "phases.1.steps=30", "train.eval_every=100", "baseline=null")]) == 0
    ft = tmp_path / "ft"
    assert finetune(["--init", str(pre), "--task", "synth", "--data-root", str(small_synth),
                     "--recipe", str(ROOT / "recipes" / "ft_synth_fshift4.yaml"), "--run-dir", str(ft),
                     *sets("data.num_workers=0", "data.batch_size=16")]) == 0
    ledger = json.loads((ft / "ledger.json").read_text())
    best = max(e["metrics"]["acc"] for e in ledger["evals"])
    assert best > 3 / 12  # chance is 1/12
    assert [p["compression"] for p in ledger["phases"]] == ["fshift", "none"]
    assert json.loads((ft / "test_metrics.json").read_text())["acc"] > 2 / 12


@pytest.mark.slow
def test_fine_tuning_from_an_official_ssast_checkpoint(tmp_path, synth_corpus):
    from common.models.spec import ModelSpec
    from common.models.weights import load_encoder_state
    from common.phases.init import task_encoder, task_encoder_config
    from tests.helpers import ssast_pretrained_state

    sd = ssast_pretrained_state(dim=64, depth=2, tdim=256)  # pretrained on 256 frames: grid 8 x 16
    pth = tmp_path / "SSAST-Tiny-Patch-400.pth"
    torch.save(sd, pth)
    # the task's 128 frames take the centre 8 of the 16 pretrained time columns (cut) ...
    init = load_encoder_state(pth)
    enc = task_encoder(init, task_encoder_config(init, ModelSpec(), 128, 128), pos_mode="cut")
    grid = sd["module.v.pos_embed"][:, 2:].reshape(1, 8, 16, 64)[:, :, 4:12]
    assert torch.equal(enc.pos_embed[:, 2:], grid.reshape(1, 64, 64))
    assert torch.equal(enc.pos_embed[:, :2], sd["module.v.pos_embed"][:, :2])
    # ... and fine-tuning runs from it
    run_dir = tmp_path / "ft"
    data = _synth_root(tmp_path, synth_corpus)
    assert finetune(["--init", str(pth), "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                     *sets("data.num_workers=0", "data.batch_size=4", "head.pool=prefix",
                           "phases=[{compression: none, epochs: 1}]")]) == 0
    from finetune.classifier import load_classifier
    model, meta = load_classifier(run_dir)
    assert model.encoder.cfg.embed_dim == 64 and model.encoder.cfg.grid == (8, 8)
    assert meta["init"] == str(pth)
    assert model.pool == meta["classifier"]["pool"] == "prefix"  # overridden; SSAST's own would be mean


@pytest.mark.slow
def test_pooling_follows_the_init(tmp_path):
    """AST pools (cls + dist) / 2, SSAST the mean of the patch tokens, patch and frame models alike (item 2)."""
    import timm

    from common.models.ast.encoder import ASTEncoder, EncoderConfig
    from common.models.spec import ModelSpec
    from common.models.weights import load_encoder_state
    from common.phases.init import init_pool, resolve_pool, task_encoder_config
    from finetune.classifier import Classifier, save_classifier
    from pretrain.ssast import SSASTConfig, SSASTModel, SSASTObjective
    from tests.helpers import ssast_pretrained_state

    def pool_of(path, **kw):
        init = load_encoder_state(path, **kw)
        return init_pool(init, task_encoder_config(init, ModelSpec(), 128, 128))

    torch.save(ssast_pretrained_state(dim=32, depth=1), tmp_path / "SSAST-Patch.pth")
    torch.save(ssast_pretrained_state(dim=32, depth=1, fshape=128, tshape=2), tmp_path / "SSAST-Frame.pth")
    assert pool_of(tmp_path / "SSAST-Patch.pth") == pool_of(tmp_path / "SSAST-Frame.pth") == "mean"
    ast = {k: v for k, v in ssast_pretrained_state(dim=32, depth=1).items()
           if not k.split(".")[1].startswith(("p_input", "mask_embed", "cpred", "gpred"))}
    ast.update({"module.mlp_head.0.weight": torch.ones(32), "module.mlp_head.1.weight": torch.zeros(527, 32)})
    torch.save(ast, tmp_path / "audioset_16_16.pth")  # an official fine-tuned AST checkpoint
    assert pool_of(tmp_path / "audioset_16_16.pth", fstride=16, tstride=16) == "prefix"
    torch.save(timm.create_model("deit_tiny_distilled_patch16_224").state_dict(), tmp_path / "deit.pth")
    assert pool_of(tmp_path / "deit.pth") == "prefix"  # AST's ImageNet start
    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, num_mel_bins=128, input_tdim=128)
    SSASTObjective(SSASTConfig()).export(SSASTModel(ASTEncoder(cfg), SSASTConfig()), tmp_path / "pre.safetensors",
                                         {})
    assert pool_of(tmp_path / "pre.safetensors") == "mean"  # this package's SSAST pretraining
    for pool in ("mean", "prefix"):
        save_classifier(Classifier(ASTEncoder(cfg), 3, pool), tmp_path / f"{pool}.safetensors", "abc", {})
        assert pool_of(tmp_path / f"{pool}.safetensors") == pool  # a fine-tuned export keeps its own
    assert init_pool(None, cfg) == "prefix"  # from scratch: AST's head
    no_prefix = cfg.replace(num_prefix_tokens=0)
    assert init_pool(None, no_prefix) == "mean" and resolve_pool("mean", None, cfg) == "mean"
    with pytest.raises(ValueError, match="head.pool: 'prefix' pooling needs prefix tokens"):
        resolve_pool("prefix", None, no_prefix)


@pytest.mark.slow
def test_imagenet_deit_weights_start_the_encoder_as_ast(tmp_path):
    import timm

    from common.models.spec import ModelSpec
    from common.models.weights import load_encoder_state
    from common.phases.init import task_encoder, task_encoder_config

    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    torch.save(deit.state_dict(), tmp_path / "deit.pth")
    init = load_encoder_state(tmp_path / "deit.pth")
    assert init[2]["source"] == "imagenet" and init[0].grid == (14, 14) and init[0].num_prefix_tokens == 2
    cfg = task_encoder_config(init, ModelSpec(stride=(10, 10)), 128, 1024)
    assert cfg.grid == (12, 101) and cfg.embed_dim == 192
    enc = task_encoder(init, cfg)
    sd = deit.state_dict()
    assert torch.allclose(enc.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    # AST: frequency rows cut from the centre of the 14 ImageNet rows (14 // 2 - 12 // 2 = 1 -> rows 1..12),
    # time interpolated bilinearly from 14 to 101 columns; cls and dist rows kept
    grid = sd["pos_embed"][:, 2:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)[:, :, 1:13]
    ref = torch.nn.functional.interpolate(grid, size=(12, 101), mode="bilinear", align_corners=False)
    assert torch.allclose(enc.pos_embed[:, 2:], ref.permute(0, 2, 3, 1).reshape(1, 1212, 192), atol=1e-6)
    assert torch.equal(enc.prefix_tokens[:, 0], sd["cls_token"][:, 0])


# ------------------------------------------------------------------------- custom task, probe, predict
@pytest.mark.slow
def test_a_custom_task_file_fine_tunes_and_probes(tmp_path, capsys):
    from finetune.linear_probe import main as probe
    from tests.layouts import write_clip

    for label in ("kick", "snare", "hat"):
        for i in range(4):
            write_clip(tmp_path / "drums" / label / f"{label}{i}.wav", seconds=0.6, seed=hash(label) % 100 + i)
    get_corpus("custom").prepare(tmp_path / "drums", tmp_path / "manifests", name="drums", valid_fraction=0.3)
    (tmp_path / "drums.yaml").write_text(
        "name: drums\ntrain: [manifests/drums_train.jsonl.gz]\nvalid: [manifests/drums_valid.jsonl.gz]\n"
        "classes: manifests/drums_classes.json\ntarget_frames: 64\nnorm: audioset\nmetric: acc\nloss: ce\nepochs: 2\n")
    run_dir = tmp_path / "run"
    assert finetune(["--init", "none", "--task", str(tmp_path / "drums.yaml"), "--run-dir", str(run_dir),
                     *sets(*TINY)]) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert len(ledger["evals"]) == 2 and ledger["phases"][0]["epochs"] == 2
    scores = [ev["metrics"]["acc"] for ev in ledger["evals"]]  # the done line says which model is which
    assert f"done: {run_dir} (model: model.safetensors, the last epoch's weights; best acc {max(scores):.4g} at " \
           f"epoch {scores.index(max(scores)) + 1}: export/best.safetensors; per-epoch metrics: ledger.json)" \
           in capsys.readouterr().out
    from finetune.classifier import load_classifier
    model, meta = load_classifier(run_dir)
    assert meta["classifier"]["classes"] == ["hat", "kick", "snare"]
    assert model.pool == meta["classifier"]["pool"] == "prefix"  # --init none: AST's (cls + dist) / 2
    out = tmp_path / "probe.json"
    assert probe(["--init", str(run_dir), "--task", str(tmp_path / "drums.yaml"), "--cache-dir",
                  str(tmp_path / "cache"), "--workers", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())[0]
    assert result["task"] == "drums" and 0 <= result["value"] <= 1
    assert result["pool"] == "prefix"  # the probe pools as the model it reads
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # train and valid features cached
    stats = tmp_path / "drums.stats.json"  # the statistics corrected: other features, not the cached ones
    stats.write_text(json.dumps({"mean": -2.0, "std": 3.0}))
    task = tmp_path / "drums.yaml"
    task.write_text(task.read_text().replace("norm: audioset", f"norm: {stats}"))
    assert probe(["--init", str(run_dir), "--task", str(task), "--cache-dir", str(tmp_path / "cache"), "--workers",
                  "0", "--out", str(out)]) == 0
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4
    capsys.readouterr()  # a grid of C: chosen by cross-validation on train (the task's valid split is the scored one)
    assert probe(["--init", str(run_dir), "--task", str(task), "--cache-dir", str(tmp_path / "cache"), "--workers",
                  "0", "--out", str(out), "--C", "1", "0.001"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())[0]
    assert result["C"] in (0.001, 1.0) and sorted(result["selection"]) == ["0.001", "1.0"]
    # a few training clips a class: as many folds as the rarest class has (here 2), each fold holding every class
    assert result["chosen_on"] == "2-fold cross-validation on the training split"
    assert "C=chosen from 0.001, 1)" in printed and f"| {result['C']:g}" in printed
    assert "drums: C chosen on 2-fold cross-validation on the training split" in printed
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4  # the same features


def test_logistic_regression_probe_on_known_features():
    from finetune.linear_probe import fit_and_score

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 5
    labels = rng.integers(0, 3, size=90)
    x = centers[labels] + rng.normal(size=(90, 8))
    y = np.eye(3)[labels]
    assert fit_and_score(x[:60], y[:60], x[60:], y[60:], "acc", multilabel=False) == 1.0
    multi = (rng.random((90, 4)) < 0.5).astype(float)
    xm = multi @ rng.normal(size=(4, 8)) * 3 + 0.1 * rng.normal(size=(90, 8))
    assert fit_and_score(xm[:60], multi[:60], xm[60:], multi[60:], "mAP", multilabel=True) > 0.95


def test_a_multi_label_probe_with_one_class_to_learn_scores_that_class():
    """One class with both outcomes in training (the others always or never present): scikit-learn takes its one
    column as a binary target; the probe scores it (a broadcast error before) and the others 0."""
    from finetune.linear_probe import fit_and_score

    rng = np.random.default_rng(0)
    y = np.zeros((40, 3))
    y[:, 0] = rng.random(40) < 0.5
    y[:, 1] = 1
    x = y[:, :1] * 4 + rng.normal(size=(40, 6))
    assert fit_and_score(x[:30], y[:30], x[30:], y[30:], "mAP", multilabel=True) > 0.9
    assert fit_and_score(x[:30], np.ones((30, 3)), x[30:], y[30:], "mAP", multilabel=True) >= 0  # none to learn


def test_a_single_label_probe_whose_training_lacks_a_class_scores_each_class_in_its_own_column():
    """Four separable classes, class 0 absent from the training features: scikit-learn's probabilities are for
    classes 1..3 (``classes_``), and they go to those columns (put in the first three, every prediction was
    one class off and the accuracy 0)."""
    from finetune.linear_probe import fit_and_score

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 4
    labels = rng.integers(1, 4, 120)  # class 0 never occurs
    x = centers[labels] + rng.normal(size=(120, 8))
    y = np.eye(4)[labels]
    assert fit_and_score(x[:80], y[:80], x[80:], y[80:], "acc", multilabel=False) == 1.0


def test_the_esc50_probe_never_trains_on_the_fold_it_scores(tmp_path, monkeypatch):
    """Each fold is scored by a probe trained on the other four only, with one C and with a grid (where C is
    chosen over the training folds, each held out in turn): a spy on every fit's features, each clip's row tagged
    with its fold and place, finds no scored clip among the ones trained on. The features are made up (no
    extraction: fast)."""
    from common.data.manifests import count_clips
    from common.models.ast.encoder import ASTEncoder, EncoderConfig
    from common.models.exports import save_encoder
    from finetune import linear_probe
    from tests.layouts import esc50

    esc50.build(tmp_path / "src", clips_per_fold=4, corrupt=False, missing=False)
    get_corpus("esc50").prepare(tmp_path / "src", tmp_path / "data" / "esc50")
    save_encoder(ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=512)),
                 tmp_path / "e.safetensors")
    folds: dict[str, int] = {}
    rng = np.random.default_rng(0)

    def made_up_features(encoder, arch, manifests, classes, *args, **kw):
        (manifest,) = manifests  # one fold's
        fold = folds.setdefault(str(manifest), len(folds))
        n = count_clips(manifest)
        labels = (np.arange(n) + fold) % len(classes)
        x = np.column_stack([np.full(n, fold), np.arange(n), np.eye(len(classes))[labels] * 3
                             + rng.normal(size=(n, len(classes)))])
        return x, np.eye(len(classes))[labels]

    fits = []
    real = linear_probe.fit_and_score

    def spy(x_tr, y_tr, x_te, y_te, *args, **kw):
        trained, scored = {tuple(r) for r in x_tr[:, :2]}, {tuple(r) for r in x_te[:, :2]}
        fits.append((trained, scored))
        return real(x_tr, y_tr, x_te, y_te, *args, **kw)

    monkeypatch.setattr(linear_probe, "extract_features", made_up_features)
    monkeypatch.setattr(linear_probe, "fit_and_score", spy)
    for C, per_fold in ((1.0, 1), ([0.1, 10.0], 2 * 4 + 1)):
        fits.clear()
        recipe = linear_probe.ProbeRecipe(tasks=["esc50"], data_root=str(tmp_path / "data"), num_workers=0,
                                          cache_dir=str(tmp_path / "cache"), C=C)
        result = linear_probe.probe_task(str(tmp_path / "e.safetensors"), "esc50", recipe, torch.device("cpu"))
        assert len(folds) == 5 and len(result["folds"]) == 5 and len(fits) == 5 * per_fold
        assert all(trained and scored and not trained & scored for trained, scored in fits)
        final = [fits[k * per_fold + per_fold - 1] for k in range(5)]  # each fold's scored fit
        assert [{f for f, _ in scored} for _, scored in final] == [{k} for k in range(5)]
        assert [{f for f, _ in trained} for trained, _ in final] == [set(range(5)) - {k} for k in range(5)]


def test_the_probes_C_is_chosen_without_the_scored_split(monkeypatch):
    """A grid of C: chosen on the validation split, over the other training folds, or by 5-fold cross-validation of
    the training split; the test features are never among what it is chosen on; one C is taken as given."""
    from finetune import linear_probe

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 3
    labels = rng.integers(0, 3, size=150)
    x = centers[labels] + rng.normal(size=(150, 8)) * 2
    y = np.eye(3)[labels]
    test_x = x[120:]
    seen = []
    real = linear_probe.fit_and_score

    def spy(x_tr, y_tr, x_te, y_te, metric, multilabel, C=1.0, seed=0):
        seen.append((len(x_tr), len(x_te), C))
        assert not any(np.array_equal(row, test_x[0]) for row in x_te), "chosen on the test features"
        return real(x_tr, y_tr, x_te, y_te, metric, multilabel, C, seed)

    monkeypatch.setattr(linear_probe, "fit_and_score", spy)
    grid = [1e-4, 1.0]  # 1e-4: every weight near 0, a probe near chance
    c, scores, on = linear_probe.choose_C(grid, x[:90], y[:90], "acc", False, valid=(x[90:120], y[90:120]))
    assert (c, on) == (1.0, "the validation split") and scores[1.0] > scores[1e-4]
    assert sorted(seen) == [(90, 30, 1e-4), (90, 30, 1.0)]
    seen.clear()
    c, scores, on = linear_probe.choose_C(grid, x[:120], y[:120], "acc", False)
    assert (c, on) == (1.0, "5-fold cross-validation on the training split")
    assert sorted(seen) == [(96, 24, 1e-4)] * 5 + [(96, 24, 1.0)] * 5
    seen.clear()
    groups = np.repeat([0, 2, 3, 4], 30)  # fold 1 is the scored one
    c, scores, on = linear_probe.choose_C(grid, x[:120], y[:120], "acc", False, groups=groups)
    assert (c, on) == (1.0, "the other training folds") and sorted(seen) == [(90, 30, 1e-4)] * 4 + [(90, 30, 1.0)] * 4
    seen.clear()
    assert linear_probe.choose_C([0.5], x[:90], y[:90], "acc", False) == (0.5, {}, None) and seen == []
    flat = {0.1: 0.5, 1.0: 0.5}  # equal scores: the stronger regularisation
    monkeypatch.setattr(linear_probe, "fit_and_score", lambda *a, **k: 0.5)
    assert linear_probe.choose_C([1.0, 0.1], x[:90], y[:90], "acc", False, valid=(x[90:], y[90:]))[:2] == (0.1, flat)
    with pytest.raises(ValueError, match="C: a value is listed twice"):
        linear_probe.ProbeRecipe(C=[1.0, 1.0])
    with pytest.raises(ValueError, match="C: the inverse regularisation must be a finite number above 0"):
        linear_probe.ProbeRecipe(C=[1.0, 0.0])


def test_a_probe_removes_the_temporaries_that_probes_killed_while_writing_features_left(tmp_path, synth_corpus,
                                                                                        monkeypatch):
    """A probe killed in the middle of writing its features leaves a temporary as large as them: the next probe with
    that cache removes it once nothing has written it for an hour (a probe writing meanwhile keeps its own)."""
    import os
    import time

    from common.models.ast.encoder import ASTEncoder, EncoderConfig
    from common.models.exports import save_encoder
    from finetune import linear_probe

    encoder = ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=64, fstride=10, tstride=10))
    save_encoder(encoder, tmp_path / "e.safetensors")
    (tmp_path / "t.yaml").write_text(
        f"name: t\ntrain: [{synth_corpus}/synth_train.jsonl.gz]\nvalid: [{synth_corpus}/synth_valid.jsonl.gz]\n"
        f"classes: {synth_corpus}/synth_classes.json\ntarget_frames: 64\nnorm: audioset\nmetric: acc\nloss: ce\n")
    rng = np.random.default_rng(0)
    monkeypatch.setattr(linear_probe, "extract_features", lambda *a, **kw: (  # 24 clips, one of 12 classes each
        rng.standard_normal((24, 4)), np.eye(12, dtype=np.float32)[np.arange(24) % 12]))
    cache = tmp_path / "cache"
    cache.mkdir()
    killed, writing = cache / ".fa1bb6a3d19d2af4.npz.c2f-7f1248e4.tmp", cache / ".0123456789abcdef.npz.c2f-0a1b2c3d.tmp"
    for path in (killed, writing):
        path.write_bytes(b"part of the features")
    os.utime(killed, (time.time() - linear_probe.STALE_SECONDS - 60,) * 2)
    recipe = linear_probe.ProbeRecipe(tasks=[str(tmp_path / "t.yaml")], num_workers=0, cache_dir=str(cache))
    linear_probe.probe_task(str(tmp_path / "e.safetensors"), str(tmp_path / "t.yaml"), recipe, torch.device("cpu"))
    assert not killed.exists() and writing.exists()
    assert len(list(cache.glob("*.npz"))) == 2  # train and test features cached


@pytest.mark.slow
def test_probe_task_esc50_is_the_mean_over_folds(tmp_path, monkeypatch):
    from common.models.ast.encoder import ASTEncoder, EncoderConfig
    from common.models.exports import save_encoder
    from finetune import linear_probe
    from tests.layouts import esc50

    esc50.build(tmp_path / "src", corrupt=False, missing=False)
    get_corpus("esc50").prepare(tmp_path / "src", tmp_path / "data" / "esc50")
    encoder = ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=512, fstride=10, tstride=10))
    save_encoder(encoder, tmp_path / "e.safetensors")
    seen, strides = [], set()
    real, extract = linear_probe.fit_and_score, linear_probe.extract_features

    def spy(*args, **kw):
        value = real(*args, **kw)
        seen.append(value)
        return value

    def extraction(encoder, *args, **kw):
        strides.add((encoder.cfg.fstride, encoder.cfg.tstride))
        return extract(encoder, *args, **kw)

    monkeypatch.setattr(linear_probe, "fit_and_score", spy)
    monkeypatch.setattr(linear_probe, "extract_features", extraction)
    recipe = linear_probe.ProbeRecipe(tasks=["esc50"], data_root=str(tmp_path / "data"), num_workers=0,
                                      cache_dir=str(tmp_path / "cache"))
    result = linear_probe.probe_task(str(tmp_path / "e.safetensors"), "esc50", recipe, torch.device("cpu"))
    assert len(seen) == 5 and result["folds"] == seen and result["value"] == pytest.approx(np.mean(seen))
    assert strides == {(10, 10)}  # the frozen encoder's features as it was trained (overlapping), as embed's
    # the features are cached, one complete file per fold and nothing half-written; a second probe reads them
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".npz"] * 5

    def no_extraction(*args, **kw):
        raise AssertionError("the cached features were computed again")

    monkeypatch.setattr(linear_probe, "extract_features", no_extraction)
    again = linear_probe.probe_task(str(tmp_path / "e.safetensors"), "esc50", recipe, torch.device("cpu"))
    assert again["folds"] == result["folds"] and again["C"] == [1.0] * 5 and "chosen_on" not in again
    # a grid: each fold's C chosen over the other four folds (scored one by one), the fold scored with it
    seen.clear()
    grid = linear_probe.ProbeRecipe(tasks=["esc50"], data_root=str(tmp_path / "data"), num_workers=0,
                                    cache_dir=str(tmp_path / "cache"), C=[10.0, 0.01])
    chosen = linear_probe.probe_task(str(tmp_path / "e.safetensors"), "esc50", grid, torch.device("cpu"))
    assert chosen["chosen_on"] == "the other training folds" and len(chosen["C"]) == 5
    assert all(sorted(s) == [0.01, 10.0] for s in chosen["selection"])
    assert len(seen) == 5 * (2 * 4 + 1)  # per fold: 2 values x 4 held-out folds, then the fold itself
    assert chosen["folds"] == [seen[k * 9 + 8] for k in range(5)]


def test_predict_windows_and_top_k(tmp_path, capsys):
    import soundfile as sf

    from common.data.audio_file import windows
    from common.models.ast.encoder import ASTEncoder, EncoderConfig
    from finetune.classifier import Classifier, save_classifier
    from finetune.predict import main as predict

    assert windows(100, 150, 50) == [0]
    assert windows(400, 150, 100) == [0, 100, 200, 250]  # the last window ends with the file
    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=64)
    model = Classifier(ASTEncoder(cfg), 3)
    save_classifier(model, tmp_path / "m.safetensors", ["a", "b", "c"],
                    {"audio": {"sample_rate": 16000, "num_mel_bins": 128, "frame_shift_ms": 10.0,
                               "frame_length_ms": 25.0, "target_frames": 64, "norm": "audioset"},
                     "phase": {"compression": "none", "factor": 1}, "loss": "ce", "class_names": {"a": "Alpha"}})
    long = 0.1 * np.random.default_rng(0).standard_normal(44100 * 3).astype(np.float32)
    sf.write(tmp_path / "long.wav", long, 44100)
    assert predict(["--ckpt", str(tmp_path / "m.safetensors"), str(tmp_path / "long.wav"), "--top-k", "2",
                    "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    labels = out[0]["labels"]
    assert len(labels) == 2 and labels[0]["score"] >= labels[1]["score"]
    assert all(0 <= item["score"] <= 1 for item in labels) and {"Alpha", "b", "c"} >= {x["name"] for x in labels}
    assert predict(["--ckpt", str(tmp_path / "m.safetensors"), str(tmp_path / "missing.wav")]) == 1
    assert "missing.wav: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tuning_recipes_in_the_repo_are_valid(capsys):
    from finetune.recipe import load_recipe

    for path in sorted((ROOT / "recipes").glob("ft_*.yaml")):
        task = "audioset" if "audioset" in path.name else "synth" if "synth" in path.name else "vggsound"
        recipe = load_recipe(task, path)
        assert recipe.description and len(recipe.phases) >= 2, path
    # no prepared data: the plan is printed (a registered task knows its class count) with the missing files
    assert finetune(["--init", "none", "--task", "vggsound", "--recipe", str(ROOT / "recipes" / "ft_fshift421.yaml"),
                     "--dry-run", "--data-root", str(ROOT / "tests")]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "fshift x4" in out and "files a run needs and does not find" in out and "vggsound_classes.json" in out
    # the header says the task (its own defaults described) and the recipe over them
    recipe = load_recipe("vggsound", ROOT / "recipes" / "ft_fshift421.yaml")
    assert out.splitlines()[1] == (f"recipe {ROOT / 'recipes' / 'ft_fshift421.yaml'}, over the task's defaults: "
                                   f"{recipe.description}")
    assert finetune(["--init", "none", "--task", "vggsound", "--recipe", str(ROOT / "recipes" / "ft_fshift421.yaml"),
                     "--data-root", str(ROOT / "tests")]) == 2  # a real run stops before compute, naming the file
    assert "vggsound_classes.json" in capsys.readouterr().err
    assert finetune(["--list-tasks"]) == 0 and "esc50" in capsys.readouterr().out
    with pytest.raises(ValueError, match="weight_average_from: epoch 6 is after"):
        load_recipe("audioset20k", None, ["phases=[{compression: none, epochs: 2}]"])


def test_a_dry_run_lists_a_run_dir_the_run_would_refuse(tmp_path, capsys):
    """--dry-run lists what a run would miss; a --run-dir that is a file (or lies under one) is among it, as the
    run refuses it; nothing is created."""
    from pretrain.run import main as pretrain

    afile = tmp_path / "afile"
    afile.write_text("")
    for run_dir, what in ((afile, "is a file, not a directory"),
                          (afile / "run", f"is not a directory ({afile} on its way is a file)")):
        assert pretrain(["--recipe", str(ROOT / "recipes" / "synth_pretrain.yaml"), "--run-dir", str(run_dir),
                         "--dry-run"]) == PLAN_NOT_READY
        assert f"--run-dir {run_dir} {what}" in capsys.readouterr().out
        assert finetune(["--init", "none", "--task", "synth", "--run-dir", str(run_dir), "--dry-run",
                         "--data-root", str(tmp_path)]) == PLAN_NOT_READY
        assert f"--run-dir {run_dir} {what}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_fine_tuning_plans_name_a_schedule_that_gets_coarser_but_not_a_derived_one(tmp_path, capsys):
    reverse = "phases=[{compression: none, factor: 1, epochs: 1}, {compression: avgpool, factor: 2, epochs: 1}]"
    assert finetune(["--init", "none", "--task", "synth", "--dry-run", "--data-root", str(tmp_path),
                     "--set", reverse]) == PLAN_NOT_READY
    assert "warning: phases.1 (phase2 (avgpool x2)) is coarser than phases.0" in capsys.readouterr().out
    assert finetune(["--init", "none", "--task", "synth", "--dry-run", "--data-root", str(tmp_path),
                     "--coarse", "patch:4", "--set", "coarse.patch_transfer=bilinear"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "patch x4" in out and "coarser than" not in out and "changes nothing" not in out


def test_every_registered_task_plans_before_its_data_exist(tmp_path, capsys):
    """--dry-run plans a registered task before its corpus is prepared, Kinetics-Sounds too, whose classes are the
    user's list (its head planned at a stated size); what a run would miss is listed."""
    for name in TASKS:
        if name == "synth":
            continue
        code = finetune(["--init", "none", "--task", name, "--dry-run", "--data-root", str(tmp_path)])
        assert code == PLAN_NOT_READY, name
        out = capsys.readouterr().out
        assert "files a run needs and does not find" in out and "task.classes: class list" in out, name
        assert ("planned with a head of 32" in out) is (name == "kinetics_sounds"), name


def test_a_plan_says_when_mixup_cannot_mix(tmp_path, capsys):
    """Mixup takes a clip's partner from its own micro-batch: AudioSet's batch of 12 on 12 ranks (one clip per rank)
    mixes nothing, and the plan says so; on 6 ranks (two clips each) it mixes, and the plan is quiet."""
    for ranks, said in ((12, True), (6, False)):
        assert finetune(["--init", "none", "--task", "audioset", "--dry-run", "--world-size", str(ranks),
                         "--data-root", str(tmp_path)]) == PLAN_NOT_READY
        out = capsys.readouterr().out
        assert ("warning: augment.mixup: phase1 (full resolution) has one clip per micro-batch on 12 rank(s)" in out) \
            is said, out


@pytest.mark.slow
def test_the_demo_writes_its_reports_and_plots(tmp_path):
    """(Into a folder whose name YAML would cut: its manifests' paths were --set unquoted.)"""
    from finetune.demo import run

    results = run(tmp_path / "demo #1, x", quick=True)
    for path in results["reports"] + results["plots"] + [results["summary"]]:
        assert Path(path).is_file() and Path(path).stat().st_size > 0
    assert Path(results["plots"][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Baseline |" in Path(results["reports"][1]).read_text()
    assert "coarse to fine, Fshift 4→1" in Path(results["summary"]).read_text()
    assert set(results["probes"]) == {"baseline", "c2f"}
    hf = results["hf"]  # a prefix-pooled fine-tune of the c2f encoder, exported and run through transformers
    assert (Path(hf["dir"]) / "config.json").is_file() and (Path(hf["dir"]) / "preprocessor_config.json").is_file()
    assert len(hf["top"]) == 3 and hf["top"][0]["score"] >= hf["top"][1]["score"]
    names = json.loads((tmp_path / "demo #1, x" / "data" / "synth" / "synth_classes.json").read_text())["names"]
    assert {t["label"] for t in hf["top"]} <= set(names.values())


@pytest.mark.slow
def test_three_phase_fine_tuning_with_patch_and_pooling(tmp_path, synth_corpus):
    run_dir = tmp_path / "three"
    phases = ("phases=[{compression: patch, factor: 4, patch_transfer: bilinear, epochs: 1}, "
              "{compression: avgpool, factor: 2, epochs: 1}, {compression: none, epochs: 1}]")
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(_synth_root(tmp_path, synth_corpus)),
                     "--run-dir", str(run_dir), *sets(*TINY, phases, "augment.mixup=0.5")]) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [(p["compression"], p["factor"]) for p in ledger["phases"]] == [("patch", 4), ("avgpool", 2), ("none", 1)]
    assert [e["phase"] for e in ledger["evals"]] == [0, 1, 2]
    fps = [p["flops_per_sample"] for p in ledger["phases"]]
    assert fps[0] < fps[1] < fps[2]
    from common.reports.runs import run_label
    from common.training.ledger import Ledger
    assert run_label(Ledger.read(run_dir)) == "Patch BL/Avg Pool 4→2→1"


@pytest.mark.slow
def test_keeping_the_weights_to_average_is_no_training_time(tmp_path, synth_corpus, monkeypatch):
    """The final phase's epochs kept for the weight average are written to disk at each epoch's end, as a
    checkpoint is: the phase's wall time, which the reported time saving divides, leaves the writes out; and
    the ledger on disk says why each phase ended as soon as it ends."""
    import time

    from common.training.weight_average import WeightAverage

    keep = WeightAverage.keep
    monkeypatch.setattr(WeightAverage, "keep", lambda self, *a: (time.sleep(3.0), keep(self, *a))[1])
    run_dir, data = tmp_path / "run", _synth_root(tmp_path, synth_corpus)
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(data),
                     "--run-dir", str(run_dir), *sets(*TINY, "phases=[{compression: none, epochs: 2}]",
                                                      "train.weight_average_from=1")]) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["evals"][-1]["weight_averaged"] == [1, 2]
    assert ledger["phases"][0]["wall_seconds"] < 3.0, ledger["phases"][0]["wall_seconds"]
    written = []  # each phase's end, seen through the ledger file as written then
    from common.training.record import RunRecord

    end_phase = RunRecord.end_phase

    def spy(self, model, index, decision):
        end_phase(self, model, index, decision)
        written.append(json.loads((self.run_dir / "ledger.json").read_text())["phases"][index].get("ended_by"))

    monkeypatch.setattr(RunRecord, "end_phase", spy)
    monkeypatch.setattr(WeightAverage, "keep", keep)
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(data),
                     "--run-dir", str(tmp_path / "two"), *sets(*TINY, "phases=[{compression: fshift, factor: 4, "
                                                                      "epochs: 1}, {compression: none, epochs: 1}]")]) == 0
    assert written == ["length", "length"]


def test_a_cosine_schedule_decays_over_an_epoch_based_phase(tmp_path, synth_corpus, monkeypatch):
    """``optim.schedule: cosine`` in fine-tuning (epoch-based phases) decays each phase from its peak to ``min_lr``
    over its planned epochs' optimiser steps, and restarts at a phase change (the LR stayed at its peak before)."""
    from common.training.optim import LRSchedule

    rates: list[tuple[int | None, float]] = []
    step = LRSchedule.step

    def spy(self, *args, **kwargs):
        step(self, *args, **kwargs)
        rates.append((self.total_steps, self.lr()))

    monkeypatch.setattr(LRSchedule, "step", spy)
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(_synth_root(tmp_path, synth_corpus)),
                     "--run-dir", str(tmp_path / "run"),
                     *sets(*TINY, "phases=[{compression: fshift, factor: 4, epochs: 1}, {compression: none, epochs: 2}]",
                           "optim.schedule=cosine", "optim.min_lr=1e-6", "optim.lr=1e-3")]) == 0
    first = [lr for total, lr in rates if total == rates[0][0]]
    second = [lr for total, lr in rates[len(first):]]
    assert rates[0][0] == len(first) and rates[-1][0] == len(second) == 2 * len(first), rates
    for lrs in (first, second):  # down to min_lr at the phase's last step, falling all the way
        assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(1e-6), lrs
    assert second[0] > first[-1] * 10  # the phase change restarts the schedule


@pytest.mark.slow
def test_stop_after_steps_counts_the_steps_of_every_fold(tmp_path, synth_corpus, caplog, capsys):
    """``--stop-after-steps N`` is N optimiser steps of the command, across the folds of a cross-validation (each
    fold got the whole budget, so a 5-fold run took up to 5 N steps); the command run again goes on."""
    import logging

    data = _synth_root(tmp_path, synth_corpus)
    folds = "task.folds=[synth/synth_train.jsonl.gz, synth/synth_valid.jsonl.gz, synth/synth_test.jsonl.gz]"
    command = ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(tmp_path / "cv"),
               *sets(*TINY, "phases=[{compression: none, epochs: 1}]", folds, "task.train=[]", "task.valid=[]",
                     "task.test=[]")]

    def steps() -> list[int]:  # each fold's steps, as its newest checkpoint holds them
        out = []
        for k in (1, 2, 3):
            latest = tmp_path / "cv" / f"fold{k}" / "checkpoints" / "LATEST"
            state = latest.parent / latest.read_text().strip() / "trainer_state.json" if latest.is_file() else None
            out.append(json.loads(state.read_text())["state"]["total_steps"] if state else 0)
        return out

    with caplog.at_level(logging.INFO):
        assert finetune([*command, "--stop-after-steps", "8"]) == 0
    per_fold = steps()
    assert per_fold == [6, 2, 0], per_fold  # fold 1 whole (6 steps), 2 of fold 2, none of fold 3
    assert not (tmp_path / "cv" / "cv_summary.json").exists()
    assert any("stopped after 2 steps as asked" in r.getMessage() for r in caplog.records)  # the fold's trainer
    # and the command's count, which --stop-after-steps means
    assert any(r.getMessage() == "--stop-after-steps 8: this command took 8 steps over folds 1-2 (2 in fold 2)"
               for r in caplog.records)
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert finetune(command) == 0  # resumed: fold 2 from its checkpoint, then fold 3, then the summary
    # an epoch-based checkpoint is named by the epochs done, and the line says both
    assert any("at step 2, 0 epoch(s) done (checkpoint phase01-epoch0000)" in r.getMessage()
               for r in caplog.records)
    assert f"done: {tmp_path / 'cv'} (cross-validation: cv_summary.json; each fold in fold1..fold3:" \
        in capsys.readouterr().out  # the files there (the root holds no model.safetensors)
    assert (tmp_path / "cv" / "cv_summary.json").is_file() and steps() == [6, 9, 9]  # each fold to its end


def test_model_settings_an_init_replaces_are_said_and_heads_a_file_does_not_store_are_the_recipes(tmp_path, capsys):
    """Fine-tuning trains --init's encoder: a model size or patch the command writes is a caution naming where it was
    written (it was dropped without a word, and RUN/recipe.yaml showed a model never trained); the attention heads
    an official file does not store are the recipe's, as continued pretraining takes them."""
    from common.models.spec import ModelSpec
    from common.models.weights import load_encoder_state
    from common.phases.init import task_encoder_config
    from tests.helpers import ssast_pretrained_state

    init = tmp_path / "SSAST-Tiny-Patch-400.pth"
    torch.save(ssast_pretrained_state(dim=32, depth=2), init)
    base = ["--init", str(init), "--task", "esc50", "--dry-run", "--data-root", str(tmp_path)]
    assert finetune([*base, "--set", "model.embed_dim=64", "--set", "model.patch=[16,8]"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "warning: model.embed_dim: 64 (--set model.embed_dim=64); model.patch: [16, 8] (--set model.patch=[16,8]): " \
           "not used, the encoder is --init's (32 wide, 2 blocks, " in out
    assert finetune(base) == PLAN_NOT_READY and "not used, the encoder is --init's" not in capsys.readouterr().out
    weights = load_encoder_state(str(init))
    assert task_encoder_config(weights, ModelSpec(), 128, 512).num_heads == weights.config.num_heads
    assert task_encoder_config(weights, ModelSpec(num_heads=4), 128, 512).num_heads == 4


def test_a_step_larger_than_the_training_set_is_refused_in_the_plan(tmp_path, synth_corpus, capsys):
    """A registered task's batch above its training set's clips: one line naming the key and both counts, in the
    plan as before a run (the run stopped at its first epoch, 'the manifest gives no batch of ...'); a phase's own
    batch is named as such."""
    data = _synth_root(tmp_path, synth_corpus)
    base = ["--init", "none", "--task", "synth", "--data-root", str(data), "--dry-run"]
    assert finetune([*base, "--set", "data.batch_size=1000"]) == 2
    assert capsys.readouterr().err.strip() == ("error: data.batch_size: a step takes 1000 clips, but the training "
                                               "set of synth has 24; set a smaller data.batch_size")
    assert finetune([*base, *sets("phases=[{compression: fshift, factor: 4, epochs: 1, batch_size: 48}, "
                                  "{compression: none, epochs: 1}]")]) == 2
    assert "error: phases.0.batch_size: a step takes 48 clips" in capsys.readouterr().err
    assert finetune([*base, "--set", "data.batch_size=24"]) == 0
    assert "left out of every epoch" not in capsys.readouterr().out
    # a step that leaves more than a tenth of the set out of each epoch (its last, partial step) is warned about
    assert finetune([*base, "--set", "data.batch_size=10"]) == 0
    assert ("warning: data.batch_size: a step takes 10 clips of the 24 in the training set of synth: 4 (17%) are "
            "left out of every epoch (other clips each epoch: the shuffle's last); data.batch_size=8 would leave out "
            "0") in capsys.readouterr().out
    # the batch suggested splits over the ranks planned (a multiple of 4 here)
    assert finetune([*base, "--world-size", "4", "--set", "data.batch_size=20"]) == 0
    assert "4 (17%) are left out of every epoch (other clips each epoch: the shuffle's last); data.batch_size=12 " \
           "would leave out 0" in capsys.readouterr().out


@pytest.mark.slow
def test_an_epoch_based_run_of_an_earlier_version_resumes_from_its_step_named_checkpoints(tmp_path, synth_corpus):
    """Earlier versions named an epoch-based phase's checkpoints phaseNN-stepNNNNNNNNN (counting epochs). Such a
    run resumes (mid-phase; at a phase end whose end work was cut short, which records its close into the old
    folder), names its new checkpoints by epochs, and trains the weights of an uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    from common.training.checkpoints import LATEST

    data = _synth_root(tmp_path, synth_corpus)

    def argv(run_dir):
        return ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                *sets(*TINY, "train.deterministic=true",
                      "phases=[{compression: fshift, factor: 4, epochs: 2}, {compression: none, epochs: 1}]")]

    def as_earlier_version(ckdir):  # the earlier name of every checkpoint; the state as written before its close
        for folder in [p for p in ckdir.iterdir() if p.name.startswith("phase")]:
            phase, epochs = folder.name.split("-epoch")
            state_file = folder / "trainer_state.json"
            state = json.loads(state_file.read_text())
            if state["state"].pop("phase_closed", False):
                state["state"]["pending_eval"] = True
            state_file.write_text(json.dumps(state))
            folder.rename(ckdir / f"{phase}-step{int(epochs):09d}")
        (ckdir / LATEST).write_text((ckdir / LATEST).read_text().replace("-epoch", "-step00000"))

    assert finetune(argv(tmp_path / "straight")) == 0
    per_epoch = json.loads((tmp_path / "straight" / "ledger.json").read_text())["phases"][1]["steps"]  # 1 epoch
    ckdir = tmp_path / "resumed" / "checkpoints"
    assert finetune([*argv(tmp_path / "resumed"), "--stop-after-steps", str(per_epoch + 1)]) == 0
    assert (ckdir / LATEST).read_text() == "phase01-epoch0001"  # within the second epoch: one done
    as_earlier_version(ckdir)
    assert finetune([*argv(tmp_path / "resumed"), "--stop-after-steps", str(per_epoch)]) == 0  # into phase 2
    assert (ckdir / LATEST).read_text() == "phase02-epoch0000"
    shutil.rmtree(ckdir / "phase02-epoch0000")  # stopped in phase 1's end work, as an earlier version left it
    (ckdir / LATEST).write_text("phase01-epoch0002")
    as_earlier_version(ckdir)
    assert sorted(p.name for p in ckdir.iterdir() if p.name.startswith("phase")) == ["phase01-step000000002"]
    assert finetune(argv(tmp_path / "resumed")) == 0
    assert json.loads((ckdir / "phase01-step000000002" / "trainer_state.json").read_text())["state"]["phase_closed"]
    assert (ckdir / LATEST).read_text() == "phase02-epoch0001"
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.slow
def test_an_epoch_based_run_checkpoints_every_save_every_steps_within_its_epochs(tmp_path, synth_corpus,
                                                                                monkeypatch, capsys):
    """``train.save_every`` applies within an epoch-based phase's epochs too (an AudioSet-2M epoch is many hours):
    a run killed mid-epoch resumes from its last such checkpoint, not the epoch's start, and trains the
    uninterrupted weights."""
    from safetensors.torch import load_file

    from common.training.checkpoints import RunCheckpoints
    from finetune.classifier import ClassifierObjective

    data = _synth_root(tmp_path, synth_corpus)

    def argv(run_dir):
        return ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                *sets(*TINY, "train.deterministic=true", "train.save_every=4", "phases=[{compression: none, epochs: 2}]")]

    saved, save = [], RunCheckpoints.save
    monkeypatch.setattr(RunCheckpoints, "save", lambda self, engine, tag, state, rng: (
        saved.append((tag, state["state"]["step"])), save(self, engine, tag, state, rng))[1])
    assert finetune(argv(tmp_path / "straight")) == 0
    per_epoch = json.loads((tmp_path / "straight" / "ledger.json").read_text())["phases"][0]["steps"] // 2
    assert per_epoch == 6, per_epoch
    # steps 4 and 8 within the epochs; the first epoch's end (its last step, 6); the second's is the phase's end
    assert saved == [("phase01-epoch0000", 4), ("phase01-epoch0001", 6), ("phase01-epoch0001", 8),
                     ("phase01-epoch0002", 12)], saved
    saved.clear()
    train_step, calls = ClassifierObjective.train_step, {"n": 0}

    def killed(self, *args, **kwargs):  # the process dies in step 11 (no checkpoint of its own, as SIGKILL)
        calls["n"] += 1
        if calls["n"] == 11:
            raise SystemExit(137)
        return train_step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ClassifierObjective, "train_step", killed)
        with pytest.raises(SystemExit):
            finetune(argv(tmp_path / "resumed"))
    assert saved[-1] == ("phase01-epoch0001", 8)
    assert finetune([*argv(tmp_path / "resumed"), "--dry-run"]) == 0  # the plan says what the command does
    assert f"{tmp_path / 'resumed'} holds a run; this command resumes it from checkpoint phase01-epoch0001" in \
        capsys.readouterr().out
    assert finetune(argv(tmp_path / "resumed")) == 0
    assert "resuming phase1 (full resolution) at step 8, 1 epoch(s) done (checkpoint phase01-epoch0001)" in \
        (tmp_path / "resumed" / "train.log").read_text()
    capsys.readouterr()
    assert finetune([*argv(tmp_path / "resumed"), "--dry-run"]) == 0
    assert f"{tmp_path / 'resumed'} holds a finished run; this command has nothing left to train" in \
        capsys.readouterr().out
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_fine_tuning_run_whose_checkpoints_were_deleted_is_not_trained_again(tmp_path, synth_corpus, capsys):
    """RUN/checkpoints deleted to free disk: a finished fine-tuning run is complete (the command and its plan agree,
    nothing is replaced); an unfinished one is refused in one line naming --restart (it used to train again from
    step 0 without a word)."""
    import shutil

    data = _synth_root(tmp_path, synth_corpus)

    def argv(run_dir, *extra):
        return ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                *sets(*TINY, "phases=[{compression: none, epochs: 2}]"), *extra]

    def files(run_dir):
        return {p: p.read_bytes() for p in sorted(run_dir.rglob("*"))
                if p.is_file() and (p.suffix == ".safetensors" or p.name == "ledger.json")}

    finished, unfinished = tmp_path / "finished", tmp_path / "unfinished"
    assert finetune(argv(finished)) == 0
    per_epoch = json.loads((finished / "ledger.json").read_text())["phases"][0]["steps"] // 2
    shutil.rmtree(finished / "checkpoints")
    before = files(finished)
    capsys.readouterr()
    assert finetune(argv(finished, "--dry-run")) == 0
    assert f"{finished} holds a finished run; this command has nothing left to train" in capsys.readouterr().out
    assert finetune(argv(finished)) == 0
    assert files(finished) == before
    assert "holds no checkpoint (deleted?), but its run is finished" in (finished / "train.log").read_text()

    assert finetune(argv(unfinished, "--stop-after-steps", str(per_epoch + 1))) == 0
    shutil.rmtree(unfinished / "checkpoints")
    before = files(unfinished)
    capsys.readouterr()
    assert finetune(argv(unfinished)) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"{unfinished} holds a run that trained (ledger.json" in err[0] and "--restart" in err[0]
    assert files(unfinished) == before
    assert finetune(argv(unfinished, "--dry-run")) == PLAN_NOT_READY
    assert f"{unfinished} holds a run whose checkpoints are gone; this command refuses it" in capsys.readouterr().out
    assert finetune(argv(unfinished, "--restart")) == 0 and (unfinished / "model.safetensors").is_file()


def test_choosing_C_on_a_small_or_skewed_training_split_does_not_fail_where_one_C_works():
    """Cross-validation folds keep every class where they can (stratified), a part that trains on one class alone
    scores nothing instead of failing, and a single clip is refused in one line."""
    from finetune.linear_probe import choose_C, fit_and_score

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4))
    y = np.eye(3)[[0, 0, 1, 1, 2, 2]]
    assert 0 <= fit_and_score(x[:3], y[:3], x[3:], y[3:], "acc", False) <= 1
    c, scores, on = choose_C([0.1, 1.0], x[:3], y[:3], "acc", False)  # classes 0, 0, 1: a part of one class
    assert c in (0.1, 1.0) and on == "3-fold cross-validation on the training split"
    c, scores, on = choose_C([0.1, 1.0], x, y, "acc", False)  # two clips a class: two stratified folds
    assert on == "2-fold cross-validation on the training split" and not any(np.isnan(list(scores.values())))
    with pytest.raises(ValueError, match="1 training clip: too few to choose C by cross-validation; give one C"):
        choose_C([0.1, 1.0], x[:1], y[:1], "acc", False)


@pytest.mark.slow
def test_a_finished_run_run_again_keeps_its_test_score(tmp_path, synth_corpus, caplog):
    """The same command over a finished run trains nothing and does not score the test split again (rewriting
    test_metrics.json, under a later version's metrics perhaps): it says the file holds the model's score. A model
    written after the file (or a file that names another model) is scored again."""
    import logging
    import os

    run_dir, root = tmp_path / "ft", _synth_root(tmp_path, synth_corpus)
    argv = ["--init", "none", "--task", "synth", "--data-root", str(root), "--run-dir", str(run_dir),
            *sets(*TINY, "phases=[{compression: none, epochs: 1}]")]
    assert finetune(argv) == 0
    test = run_dir / "test_metrics.json"
    first, written = test.read_text(), test.stat().st_mtime_ns
    assert json.loads(first)["manifests"] == [str(root / "synth" / "synth_test.jsonl.gz")]
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert finetune(argv) == 0
    assert test.read_text() == first and test.stat().st_mtime_ns == written
    assert any("test split: best.safetensors was scored on it before (test_metrics.json; delete it to score it "
               "again)" in r.getMessage() for r in caplog.records)
    model = run_dir / "export" / "best.safetensors"
    later = written + 5 * 10**9
    os.utime(model, ns=(later, later))  # the model changed since it was scored
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert finetune(argv) == 0
    assert test.stat().st_mtime_ns != written and not any("scored on it before" in r.getMessage()
                                                          for r in caplog.records)


def _tested_rank(root: str, scored: bool, dist) -> dict:
    """One rank of test_on_several_ranks_rank_0_decides_whether_the_test_split_is_scored_again: rank 0's run
    directory holds the model and (``scored``) its test scores; the others' see neither, as a stale network file
    system might. Scoring is recorded, not run."""
    import time
    from types import SimpleNamespace

    import finetune.evaluate
    from finetune import run as finetune_run

    run_dir = Path(root) / f"rank{dist.rank}"
    (run_dir / "export").mkdir(parents=True)
    manifest = str(Path(root) / "test.jsonl.gz")
    if dist.is_main:
        (run_dir / "export" / "best.safetensors").write_bytes(b"weights")
        time.sleep(0.01)
        if scored:
            model = run_dir / "export" / "best.safetensors"
            (run_dir / "test_metrics.json").write_text(json.dumps({"model": str(model), "acc": 0.5,
                                                                   "manifests": [manifest]}))
    calls = []
    finetune.evaluate.evaluate_export = lambda *args, **kwargs: calls.append(args[0]) or {"acc": 0.25, "clips": 1,
                                                                                          "bad_clips": 0}
    task = SimpleNamespace(test=["test.jsonl.gz"], path=lambda p: str(Path(root) / p))
    recipe = SimpleNamespace(task=task, data=SimpleNamespace(eval_batch_size=4, num_workers=0))
    finetune_run._test(run_dir, recipe, ["a"], dist, None)
    return {"scored": len(calls)}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scored", [True, False])
def test_on_several_ranks_rank_0_decides_whether_the_test_split_is_scored_again(tmp_path, world, scored):
    """Every rank scores its share of the test split or none does: rank 0 reads test_metrics.json and every rank
    follows it (a rank deciding from its own view would wait for ever in the scoring's collectives)."""
    import functools

    from tests.ranks import spawn_ranks

    results = spawn_ranks(functools.partial(_tested_rank, str(tmp_path / "runs"), scored), world, tmp_path)
    assert [r["scored"] for r in results] == [0 if scored else 1] * world
