"""The package used as a library (docs/interop.md, "Python API"): what a user passes by hand, in a notebook or
another project, is checked where it enters, and the models come back ready to use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.audio.fbank import NORM_STATS, Fbank, normalize, pad_or_crop
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.exports import save_encoder
from tests.helpers import tiny_classifier_file

AUDIO = {"sample_rate": 16000, "num_mel_bins": 128, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
         "target_frames": 64, "norm": "esc50"}
FULL = {"compression": "none", "factor": 1}
CLIP = 400 + 63 * 160  # samples of a 64-frame clip


def _export(path, phase=FULL, drop_path_rate=0.0):
    """A tiny encoder export of a 64-frame, 128-bin model (a coarse phase holds its own geometry)."""
    torch.manual_seed(0)
    frames = 64 if phase["compression"] == "none" else 64 // phase["factor"]
    cfg = EncoderConfig(embed_dim=32, depth=2, num_heads=2, input_tdim=frames, drop_path_rate=drop_path_rate)
    return save_encoder(ASTEncoder(cfg), path, {"audio": AUDIO, "phase": phase})


# Section 1 of the library review: a stereo file read the usual way ([S, C]) made every sample a clip, int16
# samples shifted the log-mel by ~20, all without a word.
BAD_WAVEFORMS = [
    (lambda: torch.zeros(CLIP, 2), r"look like \[samples, channels\].*w\[:, 0\], or w.mean\(1\)"),
    (lambda: np.zeros((CLIP, 1), np.float32), r"look like \[samples, channels\]"),
    (lambda: torch.zeros(CLIP, dtype=torch.int16), r"dtype torch.int16 .*w / 32768"),
    (lambda: np.zeros(CLIP, np.int16), r"dtype int16 .*w / 32768"),
    (lambda: np.zeros(CLIP, np.uint8), r"dtype uint8 .*scale integer PCM"),
    (lambda: torch.zeros(CLIP, dtype=torch.complex64), r"complex; pass the real signal"),
    (lambda: torch.zeros(2, 2, CLIP), r"expects waveforms \[B, S\] or \[S\], got shape \(2, 2, \d+\)"),
]


@pytest.mark.parametrize("make, says", BAD_WAVEFORMS)
def test_fbank_refuses_channels_last_integer_complex_and_3d_waveforms(make, says):
    with pytest.raises(ValueError, match=f"^Fbank.*{says}"):
        Fbank()(make())


def test_fbank_takes_numpy_and_any_float_dtype_and_short_batches():
    fb = Fbank()
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, (2, CLIP)).astype(np.float32)
    want = fb(torch.from_numpy(wave))
    assert torch.equal(fb(wave), want)  # it was AttributeError: 'numpy.ndarray' object has no attribute 'dim'
    assert torch.allclose(fb(wave.astype(np.float64)), want)
    assert fb(torch.zeros(8, 8)).shape == (8, 1, 128)  # eight clips of eight samples: a batch, however short


def test_embedder_refuses_what_fbank_does_and_a_waveform_longer_than_its_clip(tmp_path):
    from finetune.embedder import load_embedder

    embedder = load_embedder(_export(tmp_path / "e.safetensors"), pool="mean")
    for make, says in BAD_WAVEFORMS:
        with pytest.raises(ValueError, match=f"^Embedder.embed.*{says}"):
            embedder.embed(make())
    with pytest.raises(ValueError, match=rf"{CLIP + 1} samples are longer than the model's clip \({CLIP} samples"):
        embedder.embed(torch.zeros(1, CLIP + 1))
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, (2, CLIP)).astype(np.float32)
    assert np.array_equal(embedder.embed(wave).clip, embedder.embed(torch.from_numpy(wave)).clip)
    assert embedder.embed(wave[:, :1000], [1000, 500]).clip.shape == (2, 32)  # numpy in, a list of lengths


def test_classify_refuses_integer_channels_and_complex_samples_before_loading_anything(tmp_path):
    from common.models.hf_export import classify

    for make, says in BAD_WAVEFORMS:
        with pytest.raises(ValueError, match=f"^classify.*{says}"):
            classify(tmp_path / "no_model", make(), 16000)
    with pytest.raises(ValueError, match=r"^classify takes one waveform \[S\], got shape \(2, \d+\); .*w\[0\]"):
        classify(tmp_path / "no_model", np.zeros((2, CLIP), np.float32), 16000)


def test_predict_scores_refuses_integer_and_channels_last_waveforms(tmp_path):
    from finetune.classifier import load_classifier
    from finetune.inference import predict_logits, predict_scores

    model, meta = load_classifier(tiny_classifier_file(tmp_path, "ce"))
    lengths = torch.tensor([CLIP])
    for call in (predict_scores, predict_logits):
        for make, says in BAD_WAVEFORMS:
            with pytest.raises(ValueError, match=f"^{call.__name__}.*{says}"):
                call(model, meta, make(), lengths)
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, (1, CLIP)).astype(np.float32)
    assert torch.equal(predict_scores(model, meta, wave, lengths),
                       predict_scores(model, meta, torch.from_numpy(wave), lengths))


def test_load_encoder_returns_an_eval_mode_encoder_that_gives_the_same_tokens_twice(tmp_path):
    """A model trained with stochastic depth dropped blocks at random: the docs' snippet gave other tokens on
    every call (1.04 apart)."""
    from common.checkpoint import load_encoder

    encoder = load_encoder(_export(tmp_path / "dp.safetensors", drop_path_rate=0.5))
    assert encoder.cfg.drop_path_rate == 0.5 and not encoder.training
    x = torch.randn(2, 64, 128)
    with torch.no_grad():
        assert torch.equal(encoder.forward_features(x), encoder.forward_features(x))


def test_load_encoder_warns_that_a_coarse_phase_export_takes_that_phases_fbank(tmp_path, caplog):
    """The docs' recipe fed a coarse phase's encoder the first 32 frames of a 10 ms fbank (cosine 0.62 against
    what load_embedder computes): the warning names the phase's compression and what feeds it right."""
    from common.checkpoint import load_encoder

    coarse = _export(tmp_path / "phase1.safetensors", {"index": 1, "of": 2, "compression": "fshift", "factor": 2})
    with caplog.at_level("WARNING", logger="common.models.weights"):
        assert load_encoder(coarse).cfg.input_tdim == 32
    assert "exported at phase 1/2 (fshift x2): its input is that phase's fbank (20 ms frame shift, 32 frames" \
        in caplog.text and "finetune.embedder.load_embedder(path).embed" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="common.models.weights"):
        load_encoder(_export(tmp_path / "model.safetensors"))
    assert caplog.text == ""


def test_fbank_short_input_lengths_and_settings_are_what_its_docstring_says():
    fb = Fbank()
    for samples in (0, 100, 399):  # shorter than one window: one frame of zeros (T = num_frames(S), at least 1)
        feats = fb(torch.randn(2, samples))
        assert feats.shape == (2, 1, 128) and torch.all(feats == 0)
    wave = torch.randn(2, CLIP)
    assert torch.equal(fb(wave, [CLIP, 8000]), fb(wave, torch.tensor([CLIP, 8000])))  # a list: AttributeError
    assert torch.equal(fb(wave, np.array([CLIP, 8000])), fb(wave, torch.tensor([CLIP, 8000])))
    for bad, named in (([CLIP + 1, 8000], rf"\[{CLIP + 1}\] \(clips \[0\]\)"),
                       ([0, -3], r"\[0, -3\] \(clips \[0, 1\]\)")):
        with pytest.raises(ValueError, match=rf"^Fbank: lengths .* 1\.\.{CLIP} .*got {named}"):
            fb(wave, bad)
    with pytest.raises(ValueError, match=r"^Fbank: lengths must have shape \[2\] \(one per clip\), got \(3,\)"):
        fb(wave, [1, 2, 3])
    for shift in (0, 0.01, -10):
        with pytest.raises(ValueError, match=f"^Fbank: frame_shift_ms={shift} .* at least one sample"):
            Fbank(frame_shift_ms=shift)  # 0 was a ZeroDivisionError
    with pytest.raises(ValueError, match="target_frames must be positive, got -5"):
        pad_or_crop(torch.zeros(1, 10, 4), -5)  # it cut to T - 5


def test_embedder_and_predict_read_the_lengths_they_are_given(tmp_path):
    from finetune.classifier import load_classifier
    from finetune.embedder import load_embedder
    from finetune.inference import predict_scores

    embedder = load_embedder(_export(tmp_path / "e.safetensors"), pool="mean")
    model, meta = load_classifier(tiny_classifier_file(tmp_path, "ce"))
    wave = torch.randn(2, CLIP)
    for call, where in ((lambda lengths: embedder.embed(wave, lengths), "Embedder.embed"),
                        (lambda lengths: predict_scores(model, meta, wave, lengths), "predict_logits")):
        with pytest.raises(ValueError, match=rf"^{where}: lengths .*got \[{CLIP + 1}\] \(clips \[1\]\)"):
            call(torch.tensor([CLIP, CLIP + 1]))  # a tensor too: these entries read their results anyway
        call([CLIP, 8000])
    # no lengths: every clip whole (was numpy's TypeError about an object array)
    assert torch.equal(predict_scores(model, meta, wave), predict_scores(model, meta, wave, [CLIP, CLIP]))


def test_adapt_encoder_keeps_the_encoders_mode_and_the_callers_random_state():
    """adapt_encoder returned a train-mode encoder for an eval-mode one (with stochastic depth, two forwards
    differed), and drew the new encoder's discarded initialisation from the global generator."""
    from common.models.ast.resize import adapt_encoder

    cfg = EncoderConfig(embed_dim=32, depth=2, num_heads=2, input_tdim=64, drop_path_rate=0.5)
    encoder = ASTEncoder(cfg).eval()
    torch.manual_seed(0)
    coarse = adapt_encoder(encoder, cfg.replace(input_tdim=16))
    drawn = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(4)) and not coarse.training
    x = torch.randn(2, 16, cfg.num_mel_bins)
    with torch.no_grad():
        assert torch.equal(coarse.forward_features(x), coarse.forward_features(x))
    assert adapt_encoder(encoder.train(), cfg.replace(input_tdim=16)).training


def test_normalize_takes_a_statistics_name_or_mapping_and_the_frontend_exports_them():
    import common.frontend as frontend

    x = torch.randn(1, 4, 2)
    want = normalize(x, NORM_STATS["esc50"])
    assert torch.equal(normalize(x, "esc50"), want)  # it was AttributeError: 'str' object has no attribute 'mean'
    stats = {"mean": NORM_STATS["esc50"].mean, "std": NORM_STATS["esc50"].std}
    assert torch.equal(frontend.normalize(x, stats), want)
    assert frontend.resolve_norm_stats(stats) == frontend.NormStats(stats["mean"], stats["std"])
    with pytest.raises(ValueError, match="unknown normalisation statistics 'nope'"):
        normalize(x, "nope")


def test_errors_name_their_subject_rank_export_folder_and_file(tmp_path):
    """A wrong rank said "resize the encoder", RUN/export said "it holds no exports", and predict_file's error
    named no file."""
    from common.checkpoint import load_encoder
    from common.data.audio_file import AudioReadError
    from finetune.classifier import load_classifier
    from finetune.predict import predict_file

    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    encoder = load_encoder(_export(export / "phase1.safetensors"))
    _export(export / "best.safetensors")
    x = torch.zeros(1, 64, 128)
    with pytest.raises(ValueError, match=r"\(3 dims\), got 2 dims \(64, 128\): add the batch axis, x\[None\]"):
        encoder.forward_features(x[0])
    with pytest.raises(ValueError, match=r"got 4 dims \(1, 1, 64, 128\): drop the channel axis, x\[:, 0\]"):
        encoder.forward_features(x[:, None])
    with pytest.raises(FileNotFoundError, match=rf"{export} is a folder of 2 models \(best.safetensors, "
                                                rf"phase1.safetensors\), not one: name one file, e.g. "
                                                rf"{export / 'best.safetensors'} \(the best validation's\)"):
        load_encoder(export)
    model, meta = load_classifier(tiny_classifier_file(tmp_path, "ce"))
    missing = tmp_path / "missing.wav"
    with pytest.raises(AudioReadError, match=f"^{missing}: no such file$") as caught:
        predict_file(model, meta, missing)
    assert (caught.value.path, caught.value.reason) == (str(missing), "no such file")
    # a device other than the model's moved the batch only (a device mismatch deep in the front end)
    with pytest.raises(ValueError, match=r"^predict_file: device meta, but the model is on cpu: move it first "
                                         r"\(model.to\('meta'\)\)$"):
        predict_file(model, meta, missing, device="meta")


def test_loading_a_model_leaves_the_global_rng_as_it_was(tmp_path):
    """Each model's random start (overwritten by its weights) drew from the global generator: a seeded notebook
    drew other numbers after loading a model."""
    from common.checkpoint import load_encoder
    from finetune.classifier import load_classifier
    from finetune.embedder import load_embedder

    export, classifier = _export(tmp_path / "e.safetensors"), tiny_classifier_file(tmp_path, "ce")
    for load in (lambda: load_encoder(export), lambda: load_classifier(classifier), lambda: load_embedder(export)):
        torch.manual_seed(0)
        load()
        drawn = torch.rand(4)
        torch.manual_seed(0)
        assert torch.equal(drawn, torch.rand(4))


def test_load_encoder_names_the_keywords_an_official_file_takes(tmp_path):
    """``stride=10`` was a raw TypeError from the converter; an export ignored the keywords without a word."""
    from common.checkpoint import load_encoder
    from tests.helpers import ssast_pretrained_state

    torch.save(ssast_pretrained_state(dim=32, depth=1), tmp_path / "SSAST-Patch.pth")
    with pytest.raises(ValueError, match=r"unknown keyword stride; an official SSAST / AST file takes input_fdim, "
                                         r"fstride, tstride, input_tdim \(a patch stride of 10: fstride=10, "):
        load_encoder(tmp_path / "SSAST-Patch.pth", stride=10)
    assert load_encoder(tmp_path / "SSAST-Patch.pth", fstride=16, tstride=16).cfg.grid == (8, 16)
    with pytest.raises(ValueError, match=r"stores its own input geometry \(export weights\): input_tdim are for "
                                         r"official SSAST / AST .pth files; .*adapt_encoder"):
        load_encoder(_export(tmp_path / "e.safetensors"), input_tdim=1024)


def test_the_public_functions_a_user_reads_say_what_they_do_and_take():
    import inspect

    from common.audio import fbank
    from common.audio.compression import Compression
    from common.models.ast.arch import Classifier
    from common.models.hf_export import classify
    from finetune.classifier import ClassifierObjective
    from finetune.embed_store import EmbedSummary
    from finetune.embedder import Embedder
    from finetune.predict import predict_file

    documented = [ASTEncoder.forward, ASTEncoder.num_prefix_tokens, EncoderConfig.replace, EncoderConfig.to_dict,
                  EncoderConfig.num_patches, Classifier.forward, Compression.describe, Compression.is_full_resolution,
                  Embedder.clip_seconds, EmbedSummary.to_dict, ClassifierObjective.train_step,
                  ClassifierObjective.evaluate, ClassifierObjective.criterion]
    assert [f for f in documented if not inspect.getdoc(f)] == []
    annotated = {fbank.num_frames: ("return",), Fbank.num_frames: ("num_samples", "return"),
                 predict_file: ("model",), classify: ("waveform",), Embedder.from_arch.__func__: ("arch",)}
    assert {f.__qualname__: [n for n in names if n not in f.__annotations__] for f, names in annotated.items()} \
        == {f.__qualname__: [] for f in annotated}
