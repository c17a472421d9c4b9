"""HTS-AT through the package: fine-tuning coarse to fine on the built-in corpus, its exports, the linear probe,
prediction, official checkpoints as --init and --ckpt, and the recipes."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from common.cli import PLAN_NOT_READY
from finetune.run import main as finetune
from tests.helpers import TINY_HTSAT, _synth_root, official_state, save_lightning, sets

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_two_phase_htsat_fine_tune_runs_end_to_end(tmp_path, synth_corpus, capsys, monkeypatch):
    import time

    from common.models.exports import read_weights
    from common.training.loop import Trainer
    from common.training.record import RunRecord
    from finetune.classifier import load_classifier

    averaging, evaluate, average_into = [], Trainer._evaluate, RunRecord.average_into

    def timed(self, *args, **kwargs):
        if averaging:
            time.sleep(1.0)  # the weight average's evaluation: a second
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_evaluate", timed)
    monkeypatch.setattr(RunRecord, "average_into", lambda *a, **k: (averaging.append(1), average_into(*a, **k))[1])
    data = _synth_root(tmp_path, synth_corpus)
    run_dir = tmp_path / "run"
    argv = ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
            "--recipe", str(ROOT / "recipes" / "htsat_audioset.yaml"),
            *sets(*TINY_HTSAT, "phases=[{compression: fshift, factor: 4, epochs: 1}, {compression: none, epochs: 2}]",
                  "train.weight_average_top=2")]
    assert finetune(argv) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    p1, p2 = ledger["phases"]
    assert (p1["compression"], p1["factor"], p2["compression"]) == ("fshift", 4, "none")
    assert p1["tokens_per_sample"] == 64 and p2["tokens_per_sample"] == 256  # 32 x 32 and 64 x 64 images
    assert p1["flops_per_sample"] / p2["flops_per_sample"] == pytest.approx(0.25, abs=0.01)
    assert [e["phase"] for e in ledger["evals"] if "epoch" in e] == [0, 1, 1]
    assert ledger["evals"][-1]["weight_averaged"] == [1, 2]  # the top 2 of the final phase's 2 epochs
    assert p2["eval_seconds"] >= 1.0  # the average's evaluation (1 s here) is device time too
    _, meta = read_weights(run_dir / "model.safetensors")
    assert meta["arch"] == "htsat" and meta["classifier"]["pool"] == "tscam"
    assert meta["clips"]["channels"] == "mean"  # data.channels: auto, the official packing's mixdown
    model, meta = load_classifier(run_dir)
    assert type(model).__name__ == "HTSATClassifier" and model.encoder.geom.image == (64, 64)
    coarse, _ = load_classifier(run_dir / "export" / "phase1.safetensors")
    assert coarse.encoder.geom.image == (32, 32)  # the coarse phase's export keeps its geometry
    # prediction and the linear probe take the run as they take an AST one
    from finetune.predict import main as predict

    clip = next((synth_corpus / "synth_audio").rglob("*.flac"))
    capsys.readouterr()
    assert predict(["--ckpt", str(run_dir), "--json", str(clip)]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert result["file"] == str(clip) and len(result["scores"]) == 12
    from finetune.linear_probe import main as probe

    assert probe(["--init", str(run_dir), "--task", "synth", "--data-root", str(data), "--workers", "0",
                  "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "probe.json")]) == 0
    assert 0.0 <= json.loads((tmp_path / "probe.json").read_text())[0]["value"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_a_resumed_run_with_stochastic_depth_trains_the_uninterrupted_weights(tmp_path, synth_corpus, workers):
    """HTS-AT's stochastic depth (``drop_path_rate`` 0.1, the official default) draws from the global torch RNG,
    which a checkpoint saves: nothing else may draw from it (a data loader starting its iteration did), or a
    run stopped mid-phase and resumed drops other paths than an uninterrupted one."""
    from safetensors.torch import load_file

    data = _synth_root(tmp_path, synth_corpus)
    tiny = [s.replace("drop_path_rate: 0.0", "drop_path_rate: 0.1") for s in TINY_HTSAT]

    def argv(run_dir):
        return ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
                "--recipe", str(ROOT / "recipes" / "htsat_audioset.yaml"),
                *sets(*tiny, f"data.num_workers={workers}", "train.deterministic=true",
                      "phases=[{compression: fshift, factor: 4, epochs: 1}, {compression: none, epochs: 2}]")]

    assert finetune(argv(tmp_path / "straight")) == 0
    for stop in (1, 2):  # mid-phase, then in the next phase
        assert finetune([*argv(tmp_path / "resumed"), "--stop-after-steps", str(stop)]) == 0
    assert finetune(argv(tmp_path / "resumed")) == 0
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_hts_at_cannot_do_what_it_cannot_and_says_so(tmp_path, synth_corpus, capsys):
    data = _synth_root(tmp_path, synth_corpus)
    base = ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(tmp_path / "r"),
            "--recipe", str(ROOT / "recipes" / "htsat_audioset.yaml")]
    assert finetune([*base, *sets(*TINY_HTSAT, "phases=[{compression: fshift, factor: 3, epochs: 1}, "
                                               "{compression: none, epochs: 1}]")]) == 2
    assert "phases.0: compression fshift x3" in capsys.readouterr().err
    assert finetune([*base, *sets(*TINY_HTSAT, "model.patch=[8, 8]")]) == 2
    assert "model.patch: an AST-family setting" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    from pretrain.recipe import load_recipe

    with pytest.raises(ValueError, match="model.arch: SSAST masked-patch pretraining is defined for ViT"):
        load_recipe(ROOT / "recipes" / "synth_pretrain.yaml", ["model.arch=htsat", "model.size=base",
                                                              "model.embed_dim=null", "model.depth=null",
                                                              "model.num_heads=null"])


def test_an_ast_init_on_an_htsat_recipe_is_told_the_setting_that_plans(tmp_path, capsys):
    """The other way round: an AST-family export with HTS-AT's recipe is refused, and the --set the refusal offers
    is the init's architecture (it offered the recipe's own, the value already set), with which the run plans."""
    from tests.helpers import tiny_classifier_file

    base = ["--init", str(tiny_classifier_file(tmp_path, "ce")), "--task", "esc50", "--data-root", str(tmp_path),
            "--recipe", str(ROOT / "recipes" / "htsat_esc50.yaml"), "--dry-run"]
    assert finetune(base) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("the recipe trains htsat; leave out the HTS-AT recipe or --set model.arch=ast"), err
    assert finetune([*base, "--set", "model.arch=ast"]) == PLAN_NOT_READY  # ESC-50's files are not here


def test_an_htsat_init_on_an_ast_recipe_is_pointed_at_htsats_recipe(tmp_path, capsys):
    """An HTS-AT checkpoint on a registered task, whose own recipe is the AST family's: the refusal points at HTS-AT's
    published recipe (--set defaults=auto), which plans; --set model.arch=htsat alone is refused before the run where
    the task's recipe has SSAST's fbank noise (it stopped at step 1), and warned about where it has not (the
    optimiser, schedule and SpecAugment stay AST's)."""
    init = tmp_path / "HTSAT_AudioSet.ckpt"
    save_lightning(official_state(), init)
    base = ["--init", str(init), "--dry-run", "--data-root", str(tmp_path)]
    assert finetune([*base, "--task", "esc50"]) == 2
    err = capsys.readouterr().err
    assert "--init holds an HTS-AT model but the recipe trains the AST family; use HTS-AT's official recipe, its " \
           "batch included: --recipe recipes/htsat_<task>.yaml" in err and "defaults=auto" not in err
    recipe = str(ROOT / "recipes" / "htsat_esc50.yaml")
    assert finetune([*base, "--task", "esc50", "--recipe", recipe]) == PLAN_NOT_READY  # ESC-50's files are not here
    plan = capsys.readouterr().out
    assert "64 clips" in plan  # the official ESC-50 batch
    assert "official ESC-50 recipe" in plan  # the line after the task's names the recipe used
    # HTS-AT's recipe at the task's batch
    assert finetune([*base, "--task", "esc50", "--set", "defaults=auto"]) == PLAN_NOT_READY
    assert "HTS-AT ESC-50 recipe" in capsys.readouterr().out
    assert finetune([*base, "--task", "esc50", "--set", "model.arch=htsat"]) == 2
    assert "error: augment.noise: SSAST's fbank noise belongs to the AST family" in capsys.readouterr().err
    assert finetune([*base, "--task", "vggsound", "--set", "model.arch=htsat"]) == PLAN_NOT_READY
    assert "warning: model.arch: htsat trains with task vggsound's own recipe, the AST family's (adam, lr 1e-05" \
        in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("classes", [527, 50, 5])
def test_an_official_checkpoint_classifies_with_predict(tmp_path, capsys, classes):
    from common.models.htsat import HTSAT, HTSATFrontEnd, audioset_labels, load_official_checkpoint
    from finetune.predict import main as predict

    save_lightning(official_state(classes=classes), tmp_path / "HTSAT_AudioSet.ckpt")
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(32000 * 3)).astype(np.float32)
    sf.write(tmp_path / "clip.wav", wave, 32000)
    assert predict(["--ckpt", str(tmp_path / "HTSAT_AudioSet.ckpt"), "--json", "--top-k", "3",
                    str(tmp_path / "clip.wav")]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    labels = result["labels"]
    names = [item["name"] for item in labels]
    if classes == 527:
        assert set(names) <= {name for _, name in audioset_labels()}
    else:
        assert all(name.startswith("class_") for name in names)
    # the scores are the official model's sigmoid(clipwise) on the zero-padded 10 s clip (clip_bce), a softmax
    # for ESC-50's 50 classes (its official models are trained with clip_ce, on each clip repeated to 10 s)
    cfg, state = load_official_checkpoint(tmp_path / "HTSAT_AudioSet.ckpt")
    model = HTSAT(cfg).eval()
    model.load_state_dict(state)
    heard = np.tile(wave, 4)[:cfg.clip_samples] if classes == 50 else wave
    with torch.no_grad():
        x = HTSATFrontEnd(cfg)(torch.from_numpy(heard)[None])
        logits = model(x)["clipwise_output"]
        expected = (torch.softmax(logits, -1) if classes == 50 else torch.sigmoid(logits))[0]
    top = torch.topk(expected, 3)
    assert [item["score"] for item in labels] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.slow
def test_an_official_checkpoint_starts_a_fine_tune_on_other_classes(tmp_path):
    from common.audio.compression import Compression
    from common.models.arch import architecture_for
    from common.models.weights import load_encoder_state

    save_lightning(official_state(), tmp_path / "HTSAT_AudioSet.ckpt")
    init = load_encoder_state(tmp_path / "HTSAT_AudioSet.ckpt")
    assert init.arch == "htsat" and init.meta["objective"] == "classification" and len(init.meta["classes"]) == 5
    arch = architecture_for(init.config.replace(num_classes=3))
    geometry = arch.geometry(Compression("fshift", 4))  # straight into a coarse phase: 128 x 128, window 4
    model = arch.build_classifier(geometry, 3, arch.resolve_pool("auto", init))
    arch.load_weights(model.encoder, init, geometry, "bilinear", "pi")
    own = model.encoder.state_dict()
    kept = [k for k in init.state if not k.startswith("tscam_conv.") and "relative_position_bias_table" not in k]
    assert all(torch.equal(own[k], init.state[k]) for k in kept)  # every size-independent weight as it was
    assert own["tscam_conv.weight"].shape[0] == 3  # the 5-class head was not loaded into the 3-class model
    same = arch.build_classifier(arch.geometry(Compression()), 5, "tscam")  # a head of the init's size: afresh too
    fresh = same.encoder.state_dict()["tscam_conv.weight"].clone()
    arch.load_weights(same.encoder, init, arch.geometry(Compression()), "bilinear", "pi")
    assert torch.equal(same.encoder.state_dict()["tscam_conv.weight"], fresh)  # as the official code pops it
    assert not torch.equal(fresh, init.state["tscam_conv.weight"])
    changed = [k for k in init.state if "relative_position_bias_table" in k and own[k].shape != init.state[k].shape]
    assert changed and all(k.startswith("swin.layers.3.") for k in changed)  # only stage 4 changes at x4
    # the trainer's route into a compressed first phase: the official file's mode is a plain fit (HTS-AT has no
    # positional embedding to cut at full resolution first; that route loaded the 5-class head strictly and failed)
    from common.phases.config import PhaseConfig, TransferConfig
    from common.phases.init import init_pos_mode
    from common.phases.transition import initial_model
    from finetune.classifier import AugmentConfig, ClassifierObjective

    mode = init_pos_mode(init, "bilinear", compressed=True)
    objective = ClassifierObjective(["a", "b", "c"], "acc", "ce", AugmentConfig())
    first = initial_model(arch, objective, geometry, PhaseConfig(compression="fshift", factor=4, epochs=1), 0, init,
                          mode, TransferConfig())
    assert mode == "cut" and first.encoder.state_dict()["tscam_conv.weight"].shape[0] == 3
    assert all(torch.equal(first.encoder.state_dict()[k], own[k]) for k in kept)


def test_the_htsat_recipes_load_and_plan(capsys):
    from finetune.recipe import load_recipe

    for name, task in (("htsat_audioset", "audioset"), ("htsat_vggsound", "vggsound"), ("htsat_esc50", "esc50")):
        recipe = load_recipe(task, ROOT / "recipes" / f"{name}.yaml")
        assert recipe.model.arch == "htsat" and recipe.optim.schedule == "piecewise", name
    esc = load_recipe("esc50", ROOT / "recipes" / "htsat_esc50.yaml")
    assert esc.data.pad == "repeat" and esc.augment.mixup == 0.0
    audioset = load_recipe("audioset", ROOT / "recipes" / "htsat_audioset.yaml")
    assert (audioset.augment.mixup_on, audioset.augment.mixup_alpha, audioset.train.weight_average_top) == \
        ("spectrogram", 0.5, 15)


@pytest.mark.slow
def test_the_audioset_pair_plans_the_papers_saving(capsys):
    """Table 6: Fshift 4->1 saves 21.13 % of HTS-AT's training FLOPs on AudioSet-2M; per clip 35.9 GFLOPs at full
    resolution and 9.0 at C = 4 (reference count). The plan needs no data."""
    import re

    assert finetune(["--init", "none", "--task", "audioset", "--recipe",
                     str(ROOT / "recipes" / "ft_htsat_audioset_fshift4.yaml"), "--dry-run"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "derived from htsat_audioset" in out
    # phase, epochs, global batch, per rank, grid, tokens, GFLOPs per clip
    rows = re.findall(r"^phase\d \((.+?)\)\s+(\d+)\s+128\s+128\s+(\d+x\d+)\s+(\d+)\s+([\d.]+)", out, re.M)
    assert [(r[0], int(r[1]), r[2], int(r[3])) for r in rows] == [("fshift x4", 7, "32x32", 1024),
                                                                 ("full resolution", 18, "64x64", 4096)]
    assert float(rows[0][4]) == pytest.approx(9.0, abs=0.1) and float(rows[1][4]) == pytest.approx(35.9, abs=0.1)
    saving = float(re.search(r"saving ([\d.]+)%", out).group(1))
    assert saving == pytest.approx(21.13, abs=0.5)


@pytest.mark.slow
def test_the_vggsound_pair_plans_the_same_saving(capsys):
    """Table 6 has one FLOPs saving, 21.13 %, for AudioSet and VGGSound: VGGSound's 50 epochs with the AudioSet
    recipe's 0.28 share are 14 + 36 and plan 21.0 % (the default 25 % would plan 19.5 %)."""
    import re

    assert finetune(["--init", "none", "--task", "vggsound", "--recipe",
                     str(ROOT / "recipes" / "ft_htsat_vggsound_fshift4.yaml"), "--dry-run"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    rows = re.findall(r"^phase\d \((.+?)\)\s+(\d+)\s", out, re.M)
    assert [(name, int(epochs)) for name, epochs in rows] == [("fshift x4", 14), ("full resolution", 36)]
    assert float(re.search(r"saving ([\d.]+)%", out).group(1)) == pytest.approx(21.13, abs=0.5)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_on_several_ranks_every_rank_ends_with_rank_0s_batchnorm_statistics(tmp_path, synth_corpus, world):
    """HTS-AT's bn0 follows each rank's own clips; DeepSpeed synchronises no buffers (DDP, which the official
    trainer used, broadcasts them): after every step each rank takes rank 0's, so validation, checkpoints and
    exports describe one model."""
    from tests.ranks import launch_cases

    data = _synth_root(tmp_path, synth_corpus)
    argv = ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(tmp_path / "run"),
            "--recipe", str(ROOT / "recipes" / "htsat_audioset.yaml"),
            *sets(*TINY_HTSAT, f"data.batch_size={2 * world}", "train.deterministic=true",
                  "phases=[{compression: fshift, factor: 4, epochs: 1}, {compression: none, epochs: 1}]")]
    ranks = launch_cases(world, [("htsat", "finetune", argv)], tmp_path / "job", timeout=240)["htsat"]
    assert all(r["code"] == 0 for r in ranks)
    assert len({r["buffers"] for r in ranks}) == 1, [r["buffers"] for r in ranks]
    from common.models.exports import read_weights

    weights, _ = read_weights(tmp_path / "run" / "model.safetensors")
    stats = [v for k, v in weights.items() if "bn0.running" in k]
    assert stats and all(torch.isfinite(v).all() for v in stats)


def test_a_dry_run_refuses_model_sizes_the_init_fixes_as_the_run_would(tmp_path, synth_corpus, capsys):
    """model.htsat sizes that differ from an official checkpoint's are refused by --dry-run, and by the run before
    it writes anything into its directory (the weights' load refused them only after init.json, run.lock and
    train.log were written)."""
    from tests.helpers import one_error

    init = tmp_path / "HTSAT_AudioSet.ckpt"
    save_lightning(official_state(), init)
    run_dir = tmp_path / "run"
    base = ["--init", str(init), "--task", "synth", "--recipe", str(ROOT / "recipes" / "htsat_esc50.yaml"),
            "--data-root", str(_synth_root(tmp_path, synth_corpus)), "--run-dir", str(run_dir),
            "--set", "data.batch_size=4", "--set", "model.htsat.depths=[1, 1, 1, 1]"]
    for argv in ([*base, "--dry-run"], base):
        assert finetune(argv) == 2
        assert one_error(capsys.readouterr().err) == (
            f"error: model.htsat: --init {init} holds HTS-AT weights, whose config the model keeps; the recipe "
            f"changes depths [2, 2, 2, 2] -> [1, 1, 1, 1]: leave these keys out, or start from scratch (--init none)")
        assert not run_dir.exists()
    assert finetune([*base[:-2], "--dry-run"]) == 0  # the file's own sizes plan
