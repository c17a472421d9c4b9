import pytest
import torch
import torchaudio

from common.audio.compression import Compression
from common.audio.fbank import NORM_STATS, Fbank, NormStats, normalize, pad_or_crop, resolve_norm_stats
from common.audio.pipeline import AudioConfig, FeaturePipeline


def reference_fbank(wave: torch.Tensor, shift_ms: float) -> torch.Tensor:
    return torchaudio.compliance.kaldi.fbank(
        (wave - wave.mean()).unsqueeze(0), htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=shift_ms)


@pytest.mark.slow
@pytest.mark.parametrize("shift_ms", [10, 20, 30, 40])
def test_fbank_matches_torchaudio_kaldi(signals, shift_ms):
    feats = Fbank(frame_shift_ms=shift_ms)(signals)
    for i in range(signals.shape[0]):
        ref = reference_fbank(signals[i], shift_ms)
        assert feats[i].shape == ref.shape
        assert (feats[i] - ref).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_fbank_lengths_equal_unpadded_clip_then_zero_padding(signals):
    fb = Fbank()
    lengths = torch.tensor([32000, 20000, 9000])
    padded = signals.clone()
    for i, n in enumerate(lengths):
        padded[i, n:] = 0.5  # garbage past the end must not leak in
    feats = fb(padded, lengths)
    for i, n in enumerate(lengths.tolist()):
        ref = reference_fbank(signals[i, :n], 10)
        assert (feats[i, : ref.shape[0]] - ref).abs().max() <= 1e-3
        assert torch.all(feats[i, ref.shape[0]:] == 0)
        assert fb.num_frames(n) == ref.shape[0]


@pytest.mark.parametrize("method,factor", [("avgpool", 2), ("maxpool", 3), ("patch", 2)])
def test_pooling_and_patch_phases_take_the_full_resolution_fbank(method, factor):
    """A full-length clip in a pooling phase is the full-resolution features pooled (Eq. 2), and in a patch phase
    those features themselves (Eq. 3): every frame is audio, none is the padding a longer frame shift would
    leave at the end."""
    audio = AudioConfig(num_mel_bins=32, target_frames=96)
    waves = torch.randn(2, audio.clip_samples)
    comp = Compression(method, factor)
    full = FeaturePipeline(audio)(waves)
    feats = FeaturePipeline(audio, comp)(waves)
    assert feats.shape == (2, comp.model_frames(96), 32)
    assert torch.allclose(feats, comp.pool(full), atol=1e-5)
    tail = feats[:, -(feats.shape[1] // 4):]
    assert (tail.std(dim=(1, 2)) > 0.1).all()  # audio, not a constant (padded) tail


def test_fbank_shape_and_frame_arithmetic():
    fb = Fbank(frame_shift_ms=40)
    assert fb.frame_shift == 640 and fb.frame_length == 400
    assert fb.num_frames(160000) == 1 + (160000 - 400) // 640
    assert fb.samples_for_frames(256) == 400 + 255 * 640
    assert fb.num_frames(fb.samples_for_frames(256)) == 256
    assert fb(torch.zeros(2, 100)).shape == (2, 1, 128)  # shorter than a window: one (zero) frame, padded
    with pytest.raises(ValueError, match="waveforms"):
        fb(torch.zeros(1, 2, 3))


def test_normalisation_and_named_stats(tmp_path):
    x = torch.full((1, 4, 2), NORM_STATS["audioset"].mean)
    assert torch.allclose(normalize(x, NORM_STATS["audioset"]), torch.zeros_like(x))
    stats = NormStats(1.0, 2.0)
    assert normalize(torch.tensor([5.0]), stats).item() == pytest.approx(1.0)  # (5 - 1) / (2 * 2)
    assert resolve_norm_stats("esc50") == NORM_STATS["esc50"]
    path = tmp_path / "stats.json"
    path.write_text('{"mean": -5.0, "std": 3.0}')
    assert resolve_norm_stats(str(path)) == NormStats(-5.0, 3.0)
    with pytest.raises(ValueError, match="unknown normalisation statistics 'nope'"):
        resolve_norm_stats("nope")
    with pytest.raises(FileNotFoundError, match="common.data.corpora stats"):
        resolve_norm_stats(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="invalid"):
        NormStats(0.0, 0.0)
    # a file that is not statistics is named, whatever is wrong with it (each was an AttributeError or TypeError)
    for text, why in (("[1, 2]", "a JSON list, not a mapping"), ('{"mean": 1}', "need 'mean' and 'std'"),
                      ('{"mean": "x", "std": 2}', "must be numbers, got mean='x'"), ('{"mean": ', "Expecting value"),
                      ('{"mean": [1], "std": 2}', "must be numbers")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"normalisation statistics file {path}: .*{why}"):
            resolve_norm_stats(str(path))


def test_pad_or_crop():
    x = torch.arange(10.0).reshape(1, 5, 2)
    assert torch.equal(pad_or_crop(x, 3), x[:, :3])
    padded = pad_or_crop(x, 7)
    assert padded.shape == (1, 7, 2) and torch.equal(padded[:, :5], x) and torch.all(padded[:, 5:] == 0)
    assert pad_or_crop(x, 5) is x
