import pytest
import torch

from common.audio.augment import MixupConfig, mixup, spec_augment


def test_mixup_off_is_identity():
    w, n, y = torch.randn(4, 100), torch.full((4,), 100), torch.eye(4)
    out = mixup(w, n, y, MixupConfig(prob=0.0), torch.Generator().manual_seed(0))
    assert out[0] is w and out[2] is y


def test_mixup_mixes_waveforms_and_labels_with_the_same_weight():
    w = torch.randn(6, 50)
    lengths = torch.tensor([50, 50, 40, 50, 30, 50])
    for i, n in enumerate(lengths):
        w[i, n:] = 0
    y = torch.eye(6)
    mixed, _, targets = mixup(w, lengths, y, MixupConfig(prob=1.0), torch.Generator().manual_seed(1))
    assert torch.allclose(targets.sum(1), torch.ones(6))
    for i in range(6):
        lam = targets[i, i].item()
        partner = [j for j in range(6) if j != i and targets[i, j] > 0]
        assert len(partner) == 1 and 0 < lam < 1
        j = partner[0]
        expected = lam * w[i] + (1 - lam) * w[j] * (torch.arange(50) < lengths[i])
        assert torch.allclose(mixed[i], expected, atol=1e-6)
        assert torch.all(mixed[i, lengths[i]:] == 0)  # partner cut to this clip's length
    again = mixup(w, lengths, y, MixupConfig(prob=1.0), torch.Generator().manual_seed(1))
    assert torch.equal(again[0], mixed)
    kept = mixup(w, lengths, y, MixupConfig(prob=1.0, targets="unmixed"), torch.Generator().manual_seed(1))
    assert torch.equal(kept[0], mixed) and torch.equal(kept[2], y)  # the same clips, each with its own targets


def test_spec_augment_masks_one_band_and_one_span_per_clip():
    x = torch.ones(8, 40, 20)
    out = spec_augment(x, freqm=6, timem=10, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for clip in out:
        zero_cols = (clip == 0).all(dim=0).nonzero().flatten()  # masked mel bins
        zero_rows = (clip == 0).all(dim=1).nonzero().flatten()  # masked frames
        for idx, width_max in ((zero_cols, 6), (zero_rows, 10)):
            assert len(idx) < width_max
            if len(idx):
                assert (idx.diff() == 1).all()  # contiguous
    assert not torch.equal(out, x)
    same = spec_augment(x, 6, 10, torch.Generator().manual_seed(0))
    assert torch.equal(same, out)
    assert spec_augment(x, 0, 0, torch.Generator()) is x


def _rolls(out, base, max_shift):
    """The circular time shift that maps ``base`` to ``out`` for each clip, and the residual noise."""
    shifts, residual = [], []
    for o, b in zip(out, base):
        best = min(range(-max_shift, max_shift + 1), key=lambda s: (o - b.roll(s, 0)).abs().max().item())
        shifts.append(best)
        residual.append(o - b.roll(best, 0))
    return shifts, torch.stack(residual)


def test_fbank_noise_adds_bounded_noise_then_rolls_each_clip_as_ssast():
    from common.audio.augment import fbank_noise

    x = 100.0 * torch.arange(60.0)[None, :, None].expand(16, 60, 8).contiguous()  # time ramp
    out = fbank_noise(x, 0.1, 10, torch.Generator().manual_seed(0))
    shifts, noise = _rolls(out, x, 12)
    assert all(-10 <= s <= 9 for s in shifts) and len(set(shifts)) > 4  # AST: np.random.randint(-10, 10)
    assert noise.min() >= 0 and noise.max() < 0.1  # rand(T, F) * rand() / 10
    amplitude = noise.amax(dim=(1, 2))
    assert amplitude.max() - amplitude.min() > 0.02  # the amplitude is drawn per clip
    again = fbank_noise(x, 0.1, 10, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)  # all from the generator: a resumed run adds the same noise


@pytest.mark.slow
def test_noise_comes_after_normalisation_and_its_roll_scales_with_fshift(signals):
    from common.audio.augment import NoiseConfig
    from common.audio.compression import Compression
    from common.audio.pipeline import AudioConfig, FeaturePipeline
    from finetune.classifier import AugmentConfig
    from finetune.tasks import TASKS

    audio = AudioConfig(target_frames=128)
    noise = AugmentConfig(noise=True).noise_config
    assert noise == NoiseConfig(enabled=True, scale=0.1, max_shift=10)
    for compression, largest in ((Compression(), 10), (Compression("fshift", 4), 2)):
        pipe = FeaturePipeline(audio, compression)  # no SpecAugment: only the noise draws
        clean = pipe(signals)
        seen = set()
        for seed in range(12):
            noisy = pipe(signals, generator=torch.Generator().manual_seed(seed), noise=noise)
            shifts, residual = _rolls(noisy, clean, largest + 2)
            assert residual.min() >= -1e-6 and residual.max() < 0.1 + 1e-6  # normalised units: after norm
            seen.update(shifts)
        assert max(map(abs, seen)) == largest
    assert torch.equal(pipe(signals, generator=torch.Generator(), noise=NoiseConfig()), pipe(signals))
    on = {name for name, (_, recipe) in TASKS.items() if recipe.get("augment", {}).get("noise")}
    assert on == {"esc50", "speechcommands"}  # SSAST's recipes with noise=True
