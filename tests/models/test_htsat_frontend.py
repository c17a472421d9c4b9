"""HTS-AT front end: log-mel against an independent float64 computation, padding, SpecAugment stripes."""

import numpy as np
import pytest
import torch

from common.audio.compression import Compression
from common.models.htsat import HTSAT, HTSATConfig, HTSATFrontEnd, SpecAugmentStripes, fold, geometry, mel_filterbank
from tests.helpers import real_looking_signals, slaney_mel_numpy

CFG = HTSATConfig(clip_samples=64000, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=3)


def logmel_numpy(wave: np.ndarray, cfg: HTSATConfig, hop: int) -> np.ndarray:
    """Reflect-padded frames x periodic Hann -> rfft power -> slaney mel -> dB, all float64."""
    n_fft = cfg.n_fft
    wave = np.pad(wave.astype(np.float64), (0, cfg.clip_samples - len(wave)))
    padded = np.pad(wave, n_fft // 2, mode="reflect")
    frames = 1 + (len(padded) - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    power = np.abs(np.fft.rfft(padded[idx] * window, axis=1)) ** 2
    mel = power @ slaney_mel_numpy(cfg.sample_rate, n_fft, cfg.mel_bins, cfg.fmin, cfg.fmax)
    return 10 * np.log10(np.maximum(mel, 1e-10))


def test_mel_filterbank_is_the_slaney_formula():
    ours = mel_filterbank(HTSATConfig()).double().numpy()
    assert ours.shape == (513, 64)
    np.testing.assert_allclose(ours, slaney_mel_numpy(32000, 1024, 64, 50.0, 14000.0), atol=1e-7)


@pytest.mark.parametrize("method, frames", [("none", 201), ("fshift", 51)])
def test_logmel_matches_an_independent_computation(method, frames):
    geom = geometry(CFG, Compression(method, 4 if method == "fshift" else 1))
    wave = real_looking_signals(batch=2, seconds=1.5, sr=32000)  # shorter than the 2 s clip: zero-padded
    ours = HTSATFrontEnd(CFG, geom).logmel(wave)
    assert ours.shape == (2, frames, 64) and geom.stft_frames == frames
    for i in range(2):
        ref = logmel_numpy(wave[i].numpy(), CFG, geom.hop_length)
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-3)  # dB (measured: 1.1e-4)
    assert ours[:, -3:].max() == pytest.approx(-100.0)  # padded silence sits at the 1e-10 floor


@pytest.mark.parametrize("seconds", [2.0, 1.5])
@pytest.mark.parametrize("method", ["none", "fshift"])
def test_one_buffer_gives_the_centred_stft_bit_for_bit(method, seconds):
    """The front end writes the zero-padded clip into one reflect-padded buffer and runs the STFT without
    centring: the official way (mask, zero-pad, ``torch.stft(center=True)``) gives the same bits."""
    geom = geometry(CFG, Compression(method, 4 if method == "fshift" else 1))
    front = HTSATFrontEnd(CFG, geom)
    wave = real_looking_signals(batch=3, seconds=seconds, sr=32000)
    lengths = torch.tensor([wave.shape[1], 20000, 1])
    x = wave * (torch.arange(wave.shape[1])[None, :] < lengths[:, None])
    x = torch.nn.functional.pad(x, (0, CFG.clip_samples - wave.shape[1]))
    spec = torch.stft(x, CFG.n_fft, hop_length=geom.hop_length, win_length=CFG.n_fft, window=front.window,
                      center=True, pad_mode="reflect", return_complex=True)
    power = spec.real.square() + spec.imag.square()
    official = 10.0 * torch.log10(torch.matmul(power.transpose(1, 2), front.melW).clamp(min=1e-10))
    assert torch.equal(front.logmel(wave, lengths), official)
    assert torch.equal(wave, real_looking_signals(batch=3, seconds=seconds, sr=32000))  # the input is untouched


def test_official_frame_counts():
    cfg = HTSATConfig()
    assert geometry(cfg).stft_frames == 1001 and geometry(cfg).stretch_frames == 1024
    d1 = geometry(cfg, Compression("fshift", 4))
    assert (d1.hop_length, d1.stft_frames, d1.stretch_frames, d1.image) == (1280, 251, 256, (128, 128))
    assert (geometry(cfg).tokens, d1.tokens, geometry(cfg, Compression("fshift", 2)).grid) == (4096, 1024, (32, 64))


def test_lengths_mark_padding_and_long_clips_are_refused():
    front = HTSATFrontEnd(CFG)
    wave = real_looking_signals(batch=2, seconds=2.0, sr=32000)
    lengths = torch.tensor([64000, 20000])
    cut = wave.clone()
    cut[1, 20000:] = 0
    assert torch.equal(front(wave, lengths), front(cut))
    with pytest.raises(ValueError, match="at most 64000 samples"):
        front(torch.zeros(1, 64001))
    with pytest.raises(ValueError, match="lengths must have shape"):
        front(wave, torch.tensor([3]))


def test_the_accelerator_branch_zeroes_the_padding_as_the_host_branch(monkeypatch):
    """On a GPU (and in a traced graph) the lengths are applied with a mask on the device, never read on the
    host: the same input, bit for bit, as the CPU branch's per-row zeroing (run here on the CPU by making the
    front end see a trace)."""
    front = HTSATFrontEnd(CFG)
    wave = real_looking_signals(batch=3, seconds=1.5, sr=32000)
    lengths = torch.tensor([48000, 20000, 1])
    host = front.logmel(wave, lengths)
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    device = front.logmel(wave, lengths)
    assert torch.equal(host, device)
    assert not torch.equal(device, front.logmel(wave))  # the lengths did zero something


def test_stripes_only_with_a_generator_and_reproducible():
    front = HTSATFrontEnd(CFG)
    wave = real_looking_signals(batch=4, seconds=2.0, sr=32000)
    plain = front(wave)
    assert plain.shape == (4, 1, 201, 64)
    a = front(wave, generator=torch.Generator().manual_seed(5))
    b = front(wave, generator=torch.Generator().manual_seed(5))
    c = front(wave, generator=torch.Generator().manual_seed(6))
    assert a.shape == (4, 2, 201, 64) and torch.equal(a, b) and not torch.equal(a[:, 1], c[:, 1])
    assert torch.equal(a[:, :1], plain)  # the log-mel itself is untouched: the model zeroes after bn0
    keep = a[:, 1].bool()
    dropped_frames = (~keep).all(dim=2).sum(dim=1)  # a time stripe hides every bin of its frames
    dropped_bins = (~keep).all(dim=1).sum(dim=1)
    assert dropped_frames.max() <= 2 * 63 and dropped_bins.max() <= 2 * 7
    assert dropped_frames.sum() > 0 and dropped_bins.sum() > 0
    masked = ~keep
    stripes = (~keep).all(dim=2)[:, :, None] | (~keep).all(dim=1)[:, None, :]
    assert torch.equal(masked, stripes)  # nothing but whole time and frequency stripes


@pytest.mark.slow
def test_time_stripe_scales_with_the_frame_rate():
    cfg = HTSATConfig()
    assert HTSATFrontEnd(cfg).time_width == 64
    assert HTSATFrontEnd(cfg, geometry(cfg, Compression("fshift", 4))).time_width == 16
    assert HTSATFrontEnd(cfg, geometry(cfg, Compression("fshift", 2))).time_width == 32
    assert HTSATFrontEnd(cfg, geometry(cfg, Compression("avgpool", 4))).time_width == 64  # stripes before pooling
    front = HTSATFrontEnd(CFG, geometry(CFG, Compression("fshift", 4)), SpecAugmentStripes(freq_stripes=0))
    keep = front(real_looking_signals(8, 2.0, 32000), generator=torch.Generator().manual_seed(0))[:, 1].bool()
    dropped_frames = (~keep).all(dim=2).sum(dim=1)
    assert 0 < dropped_frames.max() <= 2 * 15
    assert not (~keep).all(dim=1).any()  # no frequency stripes


@pytest.mark.slow
def test_model_zeroes_the_stripes_right_after_bn0():
    cfg = CFG.replace(clip_samples=320 * 1023)  # exactly 1024 frames: no stretch, so image cells are frames
    front, model = HTSATFrontEnd(cfg), HTSAT(cfg).eval()
    with torch.no_grad():
        model.bn0.running_mean.uniform_(-50, -20)
        model.bn0.bias.uniform_(0.5, 1.0)  # no normalised value is 0 by chance
    x = front(real_looking_signals(2, 10.23, 32000), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image = model.to_image(x)
        normed = model.bn0(x[:, :1].transpose(1, 3)).transpose(1, 3)
    keep = fold(x[:, 1:], 4).bool()
    assert image.shape == (2, 1, 256, 256) and (~keep).any()
    assert torch.equal(image == 0, ~keep)
    assert torch.equal(image[keep], fold(normed, 4)[keep])
