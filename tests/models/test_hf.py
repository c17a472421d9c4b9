"""Hugging Face interop: export to transformers' AST classes, exactness against predict.py, import, round trip."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.models.ast.encoder import ASTEncoder
from common.models.hf import HFFormatError, read_hf_directory
from common.models.hf_export import export_hf
from finetune.classifier import Classifier, load_classifier, save_classifier
from tests.helpers import AUDIO, CLASSES, FULL, tiny_cfg, tiny_classifier

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def write_clips(folder: Path) -> list[Path]:
    """A full clip (1.0 s: more than the model's 1.0 s window of 100 frames is cut by both sides alike),
    a short one (zero-padded) and one with silence at the end, as float WAV (no quantisation)."""
    import soundfile as sf

    from tests.helpers import real_looking_signals

    sig = real_looking_signals(3, seconds=1.0, seed=3).numpy()
    sig[2, 9000:] = 0.0
    clips = [sig[0][:16240], sig[1][:9000], sig[2][:16240]]
    paths = []
    for i, clip in enumerate(clips):
        paths.append(folder / f"clip{i}.wav")
        sf.write(paths[-1], clip, 16000, subtype="FLOAT")
    return paths


def predict_json(ckpt, files, capsys) -> list[dict]:
    from finetune.predict import main as predict

    assert predict(["--ckpt", str(ckpt), "--json", *map(str, files)]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------ export + exactness
@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_exported_classifier_scores_equal_predict_through_transformers(tmp_path, capsys, loss):
    import soundfile as sf
    from transformers import ASTFeatureExtractor, ASTForAudioClassification, pipeline

    from common.models.hf_export import main as hf_main

    src = tiny_classifier(tmp_path / "m.safetensors", loss=loss)
    out = tmp_path / "hf"
    assert hf_main(["export", str(src), "--out", str(out)]) == 0
    assert "ASTForAudioClassification with 4 labels" in capsys.readouterr().out
    model, info = ASTForAudioClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    extractor = ASTFeatureExtractor.from_pretrained(out)
    config = model.config
    assert config.id2label == {0: "Alpha", 1: "b", 2: "Gamma", 3: "d"} and config.layer_norm_eps == 1e-6
    assert (config.patch_size, config.frequency_stride, config.time_stride, config.max_length) == (16, 10, 12, 100)
    assert config.problem_type == ("multi_label_classification" if loss == "bce" else "single_label_classification")
    assert (extractor.mean, extractor.std) == (-6.6268077, 5.358466)  # the run's statistics, exactly
    assert (extractor.sampling_rate, extractor.num_mel_bins, extractor.max_length) == (16000, 64, 100)

    files = write_clips(tmp_path)
    ours = predict_json(src, files, capsys)
    waves = [sf.read(f, dtype="float32")[0] for f in files]
    with torch.no_grad():
        logits = model(**extractor(waves, sampling_rate=16000, return_tensors="pt")).logits
    theirs = torch.sigmoid(logits) if loss == "bce" else torch.softmax(logits, dim=-1)
    for entry, row in zip(ours, theirs.numpy()):
        assert len(entry["windows"]) == 1
        mine = np.array([entry["scores"][c] for c in CLASSES])
        assert np.abs(mine - row).max() < 1e-4, (mine, row)
        assert mine.max() - mine.min() > 0.05  # not a flat, trivially equal output
    classify = pipeline("audio-classification", model=str(out), device="cpu")
    for entry, wave in zip(ours, waves):
        top = classify({"raw": wave, "sampling_rate": 16000}, top_k=4)
        assert top[0]["label"] == entry["labels"][0]["name"]
        assert top[0]["score"] == pytest.approx(entry["labels"][0]["score"], abs=1e-4)
    # and the same directory predicts through this package (--ckpt DIR) with the same scores
    again = predict_json(out, files, capsys)
    for a, b in zip(ours, again):
        assert [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
        assert max(abs(a["scores"][c] - b["scores"][c]) for c in CLASSES) < 1e-5


def test_an_export_clears_what_an_interrupted_one_left(tmp_path):
    leftover = tmp_path / "out" / ".export.abc123"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half a file")
    out = export_hf(tiny_classifier(tmp_path / "m.safetensors"), tmp_path / "out")
    assert not leftover.exists() and sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]


def test_an_export_into_a_folder_holding_a_package_model_is_refused(tmp_path):
    """``c2f-hf export RUN --out RUN``: the run's own model.safetensors would be replaced by the HF weights; refused,
    the file untouched. A Hugging Face folder exported before is replaced, as an export again."""
    run = tmp_path / "run"
    run.mkdir()
    model = tiny_classifier(run / "model.safetensors")
    before = model.read_bytes()
    with pytest.raises(HFFormatError, match="holds a model.safetensors that is no Hugging Face model's"):
        export_hf(model, run)
    assert model.read_bytes() == before and not (run / "config.json").exists()
    out = export_hf(model, tmp_path / "hf")
    assert export_hf(model, out) == out


def test_round_trip_export_import_export_is_bit_identical(tmp_path):
    from common.models.exports import save_encoder
    from common.models.weights import load_encoder

    first = export_hf(tiny_classifier(tmp_path / "m.safetensors", loss="bce"), tmp_path / "first")
    model, meta = load_classifier(first)  # import: the HF directory as this package's classifier
    assert meta["classifier"] == {"classes": CLASSES, "pool": "prefix"} and meta["loss"] == "bce"
    assert meta["audio"]["norm"] == "esc50" and meta["class_names"]["a"] == "Alpha"
    save_classifier(model, tmp_path / "back.safetensors", meta["classifier"]["classes"], meta)
    second = export_hf(tmp_path / "back.safetensors", tmp_path / "second")
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # an encoder (a pretraining export) becomes an ASTModel and comes back the same way
    torch.manual_seed(2)
    encoder = ASTEncoder(tiny_cfg())
    save_encoder(encoder, tmp_path / "enc.safetensors", {"audio": AUDIO, "phase": FULL, "objective": "ssast"})
    hf_dir = export_hf(tmp_path / "enc.safetensors", tmp_path / "enc_hf")
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["ASTModel"]
    assert transformers.ASTModel.from_pretrained(hf_dir).config.max_length == 100
    loaded = load_encoder(hf_dir)
    assert loaded.cfg == encoder.cfg
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in encoder.state_dict().items())
    save_encoder(loaded, tmp_path / "enc_back.safetensors", {"audio": AUDIO, "phase": FULL, "objective": "ssast"})
    again = export_hf(tmp_path / "enc_back.safetensors", tmp_path / "enc_hf2")
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        assert (hf_dir / name).read_bytes() == (again / name).read_bytes(), name


@pytest.mark.parametrize("outputs,loss", [(4, "ce"), (527, "bce")])
def test_a_config_without_problem_type_is_multi_label_for_audiosets_classes(tmp_path, outputs, loss):
    """The MIT AST AudioSet checkpoints carry no problem_type: their 527 outputs are scored with sigmoids, as AST
    trained them (softmax scores would change the mAP); another head without one is single-label."""
    torch.manual_seed(0)
    classes = CLASSES if outputs == len(CLASSES) else [f"/m/{i:05d}" for i in range(outputs)]
    src = save_classifier(Classifier(ASTEncoder(tiny_cfg()), outputs, "prefix"), tmp_path / "m.safetensors", classes,
                          {"audio": AUDIO, "phase": FULL, "loss": "bce" if loss == "ce" else "ce"})
    out = export_hf(src, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    del config["problem_type"]
    (out / "config.json").write_text(json.dumps(config))
    assert read_hf_directory(out).loss == loss


@pytest.mark.parametrize("head", [True, False])
def test_an_hf_directory_of_official_ast_weights_is_cut_to_the_grid_as_ast_does(tmp_path, head):
    """MIT's AST checkpoints on the Hugging Face hub are the official AST weights: their positional embedding is
    cut to a smaller grid as AST's fine-tuning code does (``cut``); this package's own HF exports (their config
    carries a ``coarse2fine`` key) are fitted as the recipe's ``transfer.pos_embed`` says, as its exports are."""
    from common.models.exports import save_encoder
    from common.models.weights import load_encoder_state
    from common.phases.init import init_pos_mode

    torch.manual_seed(0)
    if head:
        src = tiny_classifier(tmp_path / "m.safetensors")
    else:
        src = tmp_path / "e.safetensors"
        save_encoder(ASTEncoder(tiny_cfg()), src, {"audio": AUDIO, "phase": FULL, "objective": "ssast"})
    out = export_hf(src, tmp_path / "hf")
    assert init_pos_mode(load_encoder_state(out), "bilinear") == "bilinear"  # this package's export
    config = json.loads((out / "config.json").read_text())
    del config["coarse2fine"]  # as the hub's configs are
    (out / "config.json").write_text(json.dumps(config))
    assert init_pos_mode(load_encoder_state(out), "bilinear") == "cut"
    assert init_pos_mode(load_encoder_state(out), "bilinear", choice="bilinear") == "bilinear"


def test_an_ssast_encoder_through_hugging_face_is_still_an_ssast_init(tmp_path):
    """An SSAST encoder (a pretraining export, or an official SSAST .pth) exported to Hugging Face and taken back as
    --init is the same kind of init: SSAST's recipes, its mean pooling, and an official checkpoint's ``cut``."""
    from common.models.exports import save_encoder
    from common.models.weights import load_encoder_state
    from common.phases.init import init_family, init_pool, init_pos_mode
    from tests.helpers import ssast_pretrained_state

    torch.manual_seed(0)
    pretrained = tmp_path / "e.safetensors"
    save_encoder(ASTEncoder(tiny_cfg()), pretrained, {"audio": AUDIO, "phase": FULL, "objective": "ssast"})
    official = tmp_path / "SSAST-Tiny-Patch-400.pth"
    torch.save(ssast_pretrained_state(), official)
    for src, folder, pos in ((pretrained, "hf", "bilinear"), (official, "hf_official", "cut")):
        before = load_encoder_state(src)
        after = load_encoder_state(export_hf(src, tmp_path / folder, norm="audioset"))
        for init in (before, after):
            assert (init_family(init, "ast"), init_pool(init, init.config), init_pos_mode(init, "bilinear")) == \
                ("ssast", "mean", pos), src
    classifier = load_encoder_state(export_hf(tiny_classifier(tmp_path / "m.safetensors"), tmp_path / "hf_cls"))
    assert init_family(classifier, "ast") == "ast" and init_pos_mode(classifier, "bilinear") == "bilinear"


def test_import_reads_bin_weights_and_transformers5_names(tmp_path):
    """``pytorch_model.bin`` (loaded with weights_only) under the in-memory names of transformers 5
    (``layers.N.attention.q_proj``) gives the same encoder as the saved names."""
    from common.models.weights import load_encoder_state

    first = export_hf(tiny_classifier(tmp_path / "m.safetensors"), tmp_path / "hf")
    reference = read_hf_directory(first)
    hf_model = transformers.ASTForAudioClassification.from_pretrained(first)
    other = tmp_path / "bin"
    other.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (other / name).write_bytes((first / name).read_bytes())
    state = hf_model.state_dict()
    torch.save(state, other / "pytorch_model.bin")
    cfg, enc, meta = load_encoder_state(other)
    assert meta["source"] == "hf" and meta["labels"] == ["Alpha", "b", "Gamma", "d"] and cfg == reference.cfg
    assert all(torch.equal(enc[k], reference.encoder[k]) for k in reference.encoder)
    # a state dict that is not an AST is refused naming the foreign tensors
    torch.save({**state, "extra.weight": torch.zeros(1)}, other / "pytorch_model.bin")
    with pytest.raises(HFFormatError, match="extra.weight"):
        load_encoder_state(other)


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kind, match", [
    ("mean", r"mean-pooled classifier.*--set head\.pool=prefix"),
    ("rect", r"patches are 16x32.*square"),
    ("one_prefix", r"1 prefix token\(s\).*exactly 2"),
    ("fshift", r"phase 1/2 \(fshift x4\).*front end"),
    ("htsat", r"'htsat' model \(HTS-AT"),
    ("no_config", r"has no encoder_config"),
    ("repeat", r"fills a short clip by repeat \(data.pad\), and ASTFeatureExtractor pads with zeros"),
])
def test_models_the_format_cannot_hold_are_refused_by_name(tmp_path, kind, match):
    from common.models.exports import save_weights

    path = tmp_path / "m.safetensors"
    if kind == "mean":
        tiny_classifier(path, pool="mean")
    elif kind == "rect":
        tiny_classifier(path, cfg=tiny_cfg(tshape=32, tstride=32))
    elif kind == "one_prefix":
        tiny_classifier(path, pool="mean", cfg=tiny_cfg(num_prefix_tokens=1))
    elif kind == "fshift":
        tiny_classifier(path, phase={"index": 1, "of": 2, "compression": "fshift", "factor": 4})
    elif kind == "htsat":
        tiny_classifier(path, arch="htsat")
    elif kind == "repeat":
        tiny_classifier(path, clips={"pad": "repeat", "crop": "start", "channels": "first"})
    else:
        save_weights(path, {"w": torch.zeros(2)}, {"arch": "ast", "audio": AUDIO})
    with pytest.raises(HFFormatError, match=match):
        export_hf(path, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_imagenet_weights_and_unknown_statistics_are_refused(tmp_path, capsys):
    import timm

    from common.models.hf_export import main as hf_main
    from tests.helpers import ssast_pretrained_state

    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    torch.save(deit.state_dict(), tmp_path / "deit.pth")
    assert hf_main(["export", str(tmp_path / "deit.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "ImageNet ViT/DeiT weights, not an audio model" in capsys.readouterr().err
    torch.save(ssast_pretrained_state(dim=64, depth=2, tdim=256), tmp_path / "ssast.pth")
    assert hf_main(["export", str(tmp_path / "ssast.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "pass --norm" in capsys.readouterr().err
    assert hf_main(["export", str(tmp_path / "ssast.pth"), "--out", str(tmp_path / "o"), "--norm", "audioset"]) == 0
    assert json.loads((tmp_path / "o" / "preprocessor_config.json").read_text())["mean"] == -4.2677393
    # an official HTS-AT checkpoint is refused as HTS-AT (it reached AST-only attributes: a traceback)
    from tests.helpers import official_state, save_lightning

    save_lightning(official_state(), tmp_path / "HTSAT_AudioSet_Saved_1.ckpt")
    for norm in ([], ["--norm", "audioset"]):
        assert hf_main(["export", str(tmp_path / "HTSAT_AudioSet_Saved_1.ckpt"), "--out", str(tmp_path / "h"),
                        *norm]) == 2
        err = capsys.readouterr().err
        assert "holds a 'htsat' model (HTS-AT, a Swin transformer)" in err and "Traceback" not in err
    # a cross-validation run directory: a model per fold, the command says to name one
    for fold in ("fold1", "fold2"):  # each fold with its ledger, as a run writes it
        (tmp_path / "cv" / fold).mkdir(parents=True)
        (tmp_path / "cv" / fold / "ledger.json").write_text("{}")
    assert hf_main(["export", str(tmp_path / "cv"), "--out", str(tmp_path / "c")]) == 2
    assert f"{tmp_path / 'cv'} is a 2-fold cross-validation run, with a model per fold: name one fold's directory " \
           f"({tmp_path / 'cv' / 'fold1'} ... fold2)" in capsys.readouterr().err


@pytest.mark.slow
def test_without_transformers_common_hf_says_how_to_install(tmp_path, capsys, monkeypatch):
    from common.models.hf_export import main as hf_main

    src = tiny_classifier(tmp_path / "m.safetensors")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert hf_main(["export", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'coarse2fine-ast[hf]'" in capsys.readouterr().err
    # the package imports transformers only inside common.models.hf(_export)'s functions
    code = ("import sys, common.models.hf, common.models.hf_export, common.models.weights, finetune.run, finetune.predict, finetune.linear_probe, "
            "finetune.demo; assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------------------------------ --init DIR
@pytest.mark.slow
def test_fine_tuning_starts_from_an_hf_directory_and_keeps_its_head(tmp_path, synth_corpus, capsys):
    from common.data.corpora.base import read_classes
    from finetune.run import main as finetune
    from tests.helpers import _synth_root, sets

    data = _synth_root(tmp_path, synth_corpus)
    classes, names = read_classes(data / "synth" / "synth_classes.json")
    torch.manual_seed(3)
    cfg = tiny_cfg(num_mel_bins=128, input_tdim=128, fstride=16, tstride=16)
    model = Classifier(ASTEncoder(cfg), len(classes), "prefix")
    save_classifier(model, tmp_path / "m.safetensors", classes,
                    {"audio": {**AUDIO, "num_mel_bins": 128, "target_frames": 128}, "phase": FULL, "loss": "ce",
                     "class_names": names})
    hf_dir = export_hf(tmp_path / "m.safetensors", tmp_path / "hf")
    common = ["--init", str(hf_dir), "--task", "synth", "--data-root", str(data)]
    tiny = ["data.num_workers=0", "data.batch_size=4", "phases=[{compression: none, epochs: 1}]"]
    # the head is kept only with prefix pooling (head.pool: auto follows the HF init: prefix) and equal labels,
    # both checked before compute
    assert finetune([*common, "--keep-head", "--run-dir", str(tmp_path / "x"), *sets(*tiny, "head.pool=mean")]) == 2
    assert "--set head.pool=prefix" in capsys.readouterr().err
    save_classifier(Classifier(ASTEncoder(cfg), 3, "prefix"), tmp_path / "m3.safetensors", ["a", "b", "c"],
                    {"audio": {**AUDIO, "num_mel_bins": 128, "target_frames": 128}, "phase": FULL, "loss": "ce"})
    other = export_hf(tmp_path / "m3.safetensors", tmp_path / "hf3")
    assert finetune(["--init", str(other), *common[2:], "--keep-head", "--run-dir", str(tmp_path / "y"),
                     *sets(*tiny, "head.pool=prefix")]) == 2
    err = capsys.readouterr().err
    assert "12 task classes are not model labels" in err and "3 model labels are not task classes (a, b, c)" in err
    assert not (tmp_path / "y").exists()
    # with a learning rate far below float32's resolution the run ends on the imported weights: encoder and head
    run = tmp_path / "ft"
    assert finetune([*common, "--keep-head", "--run-dir", str(run),
                     *sets(*tiny, "head.pool=prefix", "optim.lr=1.0e-20", "optim.warmup_steps=0",
                           "augment.mixup=0.0")]) == 0
    tuned, meta = load_classifier(run)
    assert meta["kept_head"] and meta["init"] == str(hf_dir) and tuned.encoder.cfg.grid == cfg.grid
    for key, value in model.state_dict().items():
        assert torch.allclose(tuned.state_dict()[key], value, atol=1e-6), key


def test_linear_probe_and_predict_accept_an_hf_directory(tmp_path, capsys):
    from common.models.exports import save_encoder
    from common.models.spec import ModelSpec
    from common.phases.init import load_init, task_encoder, task_encoder_config
    from finetune.linear_probe import _cache_key
    from finetune.predict import main as predict

    hf_dir = export_hf(tiny_classifier(tmp_path / "m.safetensors"), tmp_path / "hf")
    init = load_init(str(hf_dir))
    cfg = task_encoder_config(init, ModelSpec(stride=(10, 12)), 64, 100)
    assert cfg == tiny_cfg()  # geometry mapped: mel bins, strides, frames
    encoder = task_encoder(init, cfg)
    assert torch.equal(encoder.pos_embed, init[1]["pos_embed"])
    assert len(_cache_key(str(hf_dir), [], cfg, None, "mean")) == 16
    # an ASTModel directory has no head: predict says so
    torch.manual_seed(0)
    save_encoder(ASTEncoder(tiny_cfg()), tmp_path / "e.safetensors", {"audio": AUDIO, "phase": FULL})
    enc_dir = export_hf(tmp_path / "e.safetensors", tmp_path / "enc")
    assert predict(["--ckpt", str(enc_dir), str(tmp_path / "x.wav")]) == 2  # bad input: no classifier
    assert "without a classification head" in capsys.readouterr().err


def test_classify_refuses_a_transformers_whose_pipeline_cannot_score_a_multi_label_model(tmp_path, monkeypatch):
    from transformers.pipelines.audio_classification import AudioClassificationPipeline

    from common.models.hf import TransformersMissing
    from common.models.hf_export import classify

    wave = np.zeros(16000, np.float32)
    multi = export_hf(tiny_classifier(tmp_path / "m.safetensors", loss="bce"), tmp_path / "multi")
    single = export_hf(tiny_classifier(tmp_path / "s.safetensors"), tmp_path / "single")
    assert len(classify(multi, wave, 16000, top_k=2)) == 2
    real = AudioClassificationPipeline.postprocess

    def older(self, model_outputs, top_k=5):  # the softmax-only pipelines of older releases
        return real(self, model_outputs, top_k=top_k, function_to_apply="softmax")

    monkeypatch.setattr(AudioClassificationPipeline, "postprocess", older)
    with pytest.raises(TransformersMissing, match="scores every model with a softmax.*pip install -U transformers"):
        classify(multi, wave, 16000)
    assert len(classify(single, wave, 16000, top_k=2)) == 2  # a softmax is right for a single-label model


def test_classify_reads_a_local_folder_only_and_never_reaches_the_hub(tmp_path, monkeypatch):
    """A name that is no folder went to ``transformers.pipeline``, which took it for a Hub repository and looked
    ``huggingface.co`` up (a security review: ``runs/xyz`` would download the ``runs`` account's model): a missing
    folder, or one without ``config.json``, is one error naming it, and no name is looked up."""
    import socket

    from common.models.hf_export import classify

    looked_up = []

    def no_network(*args, **kwargs):
        looked_up.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    wave = np.zeros(16000, np.float32)
    with pytest.raises(FileNotFoundError, match=r"^my-org/ast-esc50 is not a Hugging Face model folder \(does not "
                                                r"exist\); classify reads a local folder"):
        classify("my-org/ast-esc50", wave, 16000)
    (tmp_path / "runs" / "xyz").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"^runs/xyz is not a Hugging Face model folder \(holds no "
                                                r"config.json\)"):
        classify("runs/xyz", wave, 16000)
    assert looked_up == []


BAD_JSON = [  # (file, key, value, what the one-line error says after the file's name)
    ("config.json", "hidden_size", None, "hidden_size must be a positive integer, got null"),
    ("config.json", "hidden_size", 0, "hidden_size must be a positive integer, got 0"),
    ("config.json", "hidden_size", "abc", 'hidden_size must be a positive integer, got "abc"'),
    ("config.json", "num_hidden_layers", [1], "num_hidden_layers must be a positive integer, got [1]"),
    ("config.json", "patch_size", {"a": 1}, 'patch_size must be a positive integer, got {"a": 1}'),
    ("config.json", "qkv_bias", "yes", 'qkv_bias must be true or false, got "yes"'),
    ("config.json", "id2label", ["a"], 'id2label must be a JSON object, got ["a"]'),
    ("config.json", "coarse2fine", ["x"], 'coarse2fine must be a JSON object, got ["x"]'),
    ("preprocessor_config.json", "mean", [1, 2], "mean must be a number, got [1, 2]"),
    ("preprocessor_config.json", "sampling_rate", None, "sampling_rate must be a positive integer, got null"),
    ("preprocessor_config.json", "std", -1, "invalid normalisation statistics"),
]


@pytest.mark.parametrize("name, key, value, says", BAD_JSON, ids=[f"{k}={v}" for _, k, v, _ in BAD_JSON])
def test_a_config_value_of_the_wrong_type_is_one_error_naming_file_and_key(tmp_path, capsys, name, key, value, says):
    """config.json / preprocessor_config.json values of the wrong type are refused naming the file and the key, in
    one line: not a TypeError, ZeroDivisionError or AttributeError traceback from predict or --init."""
    from finetune.predict import main as predict
    from tests.helpers import _write, one_error

    out = export_hf(tiny_classifier(tmp_path / "m.safetensors"), tmp_path / "hf")
    data = json.loads((out / name).read_text())
    (out / name).write_text(json.dumps({**data, key: value}))
    with pytest.raises(HFFormatError) as err:
        read_hf_directory(out)
    assert str(err.value).startswith(f"{out / name}: {says}")
    assert predict(["--ckpt", str(out), str(_write(tmp_path / "a.wav", 0.5))]) == 2
    assert one_error(capsys.readouterr().err).startswith(f"error: {out / name}: {says}")


@pytest.mark.parametrize("shard", ["../../x.safetensors", "/etc/passwd", "sub/model.safetensors", "..", "", 3, None])
def test_a_sharded_index_names_only_files_in_its_directory(tmp_path, shard):
    """A sharded index's weight_map names files beside it: a path elsewhere ("../../x"), an absolute one, a
    folder or a value that is no file name is refused naming the index and the entry, before anything is read."""
    out = export_hf(tiny_classifier(tmp_path / "m.safetensors"), tmp_path / "hf")
    (out / "model.safetensors").rename(out / "model-00001-of-00001.safetensors")
    index = out / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "model-00001-of-00001.safetensors"}}))
    assert read_hf_directory(out).cfg == tiny_cfg()  # a shard beside the index is read
    outside = tmp_path / "x.safetensors"  # what "../../x" would reach from a nested folder; here the real file
    (out / "model-00001-of-00001.safetensors").rename(outside)
    index.write_text(json.dumps({"weight_map": {"a.weight": shard}}))
    with pytest.raises(HFFormatError, match=rf"^{index}: weight_map\[\"a\.weight\"\] is .*, not the name of a "
                                            rf"file in {out}$"):
        read_hf_directory(out)


def test_an_export_whose_weights_do_not_fit_publishes_nothing_and_config_json_comes_last(tmp_path, monkeypatch,
                                                                                         capsys):
    """c2f-hf export refuses weights its own reader would refuse (a tensor of another shape) instead of reporting
    success; a directory that does not read back is not published; and config.json, which makes a folder a model,
    is removed first and published last: a kill in between leaves no config.json beside other weights."""
    import os

    from safetensors.torch import load_file, safe_open, save_file

    import common.models.hf_export as hf_export
    from tests.helpers import one_error

    src = tiny_classifier(tmp_path / "m.safetensors")
    out = export_hf(src, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.safetensors"
    with safe_open(str(src), framework="pt") as handle:
        meta = handle.metadata()
    save_file({**load_file(str(src)), "encoder.blocks.0.norm1.weight": torch.ones(5)}, str(bad), metadata=meta)
    assert hf_export.main(["export", str(bad), "--out", str(out)]) == 2
    assert one_error(capsys.readouterr().err) == (
        f"error: cannot export {bad}: the weights do not fit the model its config describes: wrong shapes "
        f"blocks.0.norm1.weight (5,) (the model's (32,))")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export untouched
    # a directory that does not read back (whatever the reason) is not published
    monkeypatch.setattr(hf_export, "read_hf_directory", lambda path: (_ for _ in ()).throw(HFFormatError("odd")))
    with pytest.raises(HFFormatError, match=r"does not read back \(odd\); nothing was published"):
        export_hf(tiny_classifier(tmp_path / "other.safetensors", loss="bce"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    # publishing: the weights, the preprocessor, config.json last; killed after the weights, no config.json is left
    moved, real_replace = [], os.replace

    def replace(a, b):
        moved.append(Path(b).name)
        if len(moved) == 2:
            raise KeyboardInterrupt  # the kill
        real_replace(a, b)

    other = tiny_classifier(tmp_path / "other.safetensors", cfg=tiny_cfg(depth=1))
    monkeypatch.setattr(hf_export.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export_hf(other, out)
    assert moved == ["model.safetensors", "preprocessor_config.json"]
    assert not (out / "config.json").exists() and (out / "model.safetensors").read_bytes() != before[
        "model.safetensors"]
    monkeypatch.undo()
    assert export_hf(other, out) == out
    assert read_hf_directory(out).cfg.depth == 1
