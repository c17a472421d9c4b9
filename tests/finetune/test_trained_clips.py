"""embed and the linear probe read clips as the model was trained (its export's ``clips`` record: ``pad``, ``crop``),
as predict and evaluate do."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.exports import save_encoder
from finetune.embed import embed_files
from finetune.embed_store import read_clips, read_index
from finetune.embedder import load_embedder

AUDIO = {"sample_rate": 16000, "num_mel_bins": 128, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
         "target_frames": 64, "norm": "audioset"}
CLIP = 400 + 63 * 160  # samples in a window of 64 frames


def _export(path, clips: dict, target_frames: int = 64):
    torch.manual_seed(0)
    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=target_frames)
    return save_encoder(ASTEncoder(cfg), path, {"audio": {**AUDIO, "target_frames": target_frames},
                                                "phase": {"compression": "none", "factor": 1}, "clips": clips})


def test_embed_repeats_a_short_clip_of_a_model_trained_with_pad_repeat(tmp_path):
    rng = np.random.default_rng(0)
    short = (0.1 * rng.standard_normal(CLIP // 3)).astype(np.float32)
    files = {"short": short, "repeated": np.tile(short, 4)[:CLIP],
             "zeros": np.concatenate([short, np.zeros(CLIP - short.size, np.float32)])}
    for name, wave in files.items():
        sf.write(tmp_path / f"{name}.wav", wave, 16000, subtype="FLOAT")
    inputs = [tmp_path / f"{name}.wav" for name in files]
    for pad in ("repeat", "zeros"):
        init = _export(tmp_path / f"{pad}.safetensors", {"pad": pad, "crop": "start", "channels": "first"})
        assert load_embedder(init).pad == pad
        embed_files(init, inputs, tmp_path / pad, workers=0)
        rows, clips = read_index(tmp_path / pad), read_clips(tmp_path / pad)
        assert rows[0]["end"] == pytest.approx(CLIP // 3 / 16000, abs=1e-6)  # where the file's audio ends
        short, repeated, zeros = clips  # (AST's fbank centres a clip on the mean of its own samples: a short clip
        # is not its file zero-padded, so for pad zeros only its difference from the repeated file is checked)
        assert np.allclose(short, repeated, atol=1e-6) == (pad == "repeat")
        assert not np.allclose(short, zeros, atol=1e-3)


def test_the_probes_features_fill_and_cut_clips_as_the_model_was_validated(tmp_path, synth_corpus, monkeypatch):
    """synth's clips (0.8-2 s) against its 1.295 s clip: the short ones are repeated, the long ones cut at the
    centre, as the export records; the features are the embedder's of the clips so filled and cut."""
    from lhotse import CutSet

    from common.data.decode import load_clip
    from finetune import linear_probe

    data = tmp_path / "data"
    (data / "synth").mkdir(parents=True)
    for f in synth_corpus.glob("synth_*.json*"):
        (data / "synth" / f.name).symlink_to(f)
    init = _export(tmp_path / "e.safetensors", {"pad": "repeat", "crop": "center", "channels": "first"}, 128)
    seen = []
    real = linear_probe.fit_and_score
    monkeypatch.setattr(linear_probe, "fit_and_score", lambda x_tr, y_tr, x_te, *rest, **kw:
                        seen.append((x_tr, x_te)) or real(x_tr, y_tr, x_te, *rest, **kw))
    recipe = linear_probe.ProbeRecipe(tasks=["synth"], pool="mean", data_root=str(data), num_workers=0,
                                      cache_dir=str(tmp_path / "cache"))
    linear_probe.probe_task(str(init), "synth", recipe, torch.device("cpu"))
    (x_train, _), = seen
    embedder = load_embedder(init, pool="mean")
    clip = embedder.clip_samples
    waves = []
    for cut in CutSet.from_file(data / "synth" / "synth_train.jsonl.gz"):
        wave = load_clip(cut, 16000)
        start = max(0, (wave.size - clip) // 2)
        waves.append(np.tile(wave, -(-clip // wave.size))[:clip] if wave.size < clip else wave[start:start + clip])
    sizes = [load_clip(c, 16000).size for c in CutSet.from_file(data / "synth" / "synth_train.jsonl.gz")]
    assert min(sizes) < clip < max(sizes)  # both kinds are there
    expected = embedder.embed(np.stack(waves)).clip
    assert np.allclose(x_train, expected, atol=1e-5)


def test_an_official_esc50_checkpoint_hears_a_short_clip_repeated_as_its_training_did(tmp_path, capsys):
    """The official ESC-50 preparation concatenates each 5 s clip with itself to 10 s (``ESC_Dataset``): a 50-class
    official checkpoint (ESC-50's head, softmax) scores, embeds and exports a 5 s clip as that clip twice; an
    AudioSet head keeps zero padding."""
    from common.models.weights import load_encoder_state
    from finetune.classifier import load_classifier
    from finetune.inference import clip_handling
    from finetune.predict import main as predict
    from tests.helpers import official_state, save_lightning

    rng = np.random.default_rng(0)
    five = (0.1 * rng.standard_normal(32000 * 5)).astype(np.float32)
    sf.write(tmp_path / "five.wav", five, 32000, subtype="FLOAT")
    sf.write(tmp_path / "twice.wav", np.tile(five, 2), 32000, subtype="FLOAT")
    for classes, pad in ((50, "repeat"), (527, "zeros")):
        ckpt = tmp_path / f"HTSAT_{classes}.ckpt"
        save_lightning(official_state(classes=classes), ckpt)
        for meta in (load_classifier(ckpt)[1], load_encoder_state(ckpt).meta):  # predict / evaluate / ONNX, embed
            assert clip_handling(meta) == {"pad": pad, "crop": "start", "channels": "mean"}
        assert load_embedder(ckpt).pad == pad
        if pad == "zeros":
            continue  # (predict's zero padding of a short clip: tests/finetune/test_htsat_training.py)
        assert predict(["--ckpt", str(ckpt), "--json", str(tmp_path / "five.wav"), str(tmp_path / "twice.wav")]) == 0
        five_scores, twice_scores = (np.array(list(r["scores"].values()))
                                     for r in json.loads(capsys.readouterr().out))
        assert np.allclose(five_scores, twice_scores, atol=1e-5)


def test_an_empty_waveform_for_a_model_trained_with_pad_repeat_embeds_as_silence(tmp_path):
    """Nothing to repeat: an empty waveform given to a model that repeats short clips is silence, as zero padding
    makes it (it divided by its length: ZeroDivisionError)."""
    embedder = load_embedder(_export(tmp_path / "repeat.safetensors", {"pad": "repeat", "crop": "start"}))
    empty, silence = embedder.embed(torch.zeros(1, 0)), embedder.embed(torch.zeros(1, CLIP))
    assert torch.allclose(torch.as_tensor(empty.clip), torch.as_tensor(silence.clip), atol=1e-5)
