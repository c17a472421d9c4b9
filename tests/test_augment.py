import torch

from common.augment import MixupConfig, mixup, spec_augment


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
