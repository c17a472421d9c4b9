import pytest
import torch

from common.audio.compression import Compression
from common.audio.pipeline import AudioConfig, FeaturePipeline
from common.models.ast.encoder import EncoderConfig, encoder_config


@pytest.fixture
def base():
    return encoder_config("tiny", input_tdim=1024, fshape=16, tshape=16, fstride=16, tstride=16)


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_token_grids(base, factor):
    expected_t = {1: 64, 2: 32, 3: 21, 4: 16}[factor]
    for method in ("fshift", "avgpool", "maxpool", "patch"):
        assert Compression(method, factor).token_grid(base) == (8, expected_t)
    assert Compression().token_grid(base) == (8, 64)


def test_frame_counts_use_round_and_pooling_pads(base):
    assert Compression("fshift", 3).fbank_frames(1024) == 341  # round(341.33), not int
    assert Compression("fshift", 3).fbank_frames(1000) == 333
    assert Compression("fshift", 4).frame_shift_ms(10) == 40
    # 1024 / 6 = 170.67: round keeps the 171st frame, which the fbank of a full clip at 60 ms has (int cuts it)
    assert Compression("fshift", 6).fbank_frames(1024) == 171
    assert Compression("fshift", 5).fbank_frames(1024) == 205  # 204.8
    audio = AudioConfig()
    assert FeaturePipeline(audio, Compression("fshift", 6)).fbank.num_frames(audio.clip_samples) == 171
    assert Compression("avgpool", 3).fbank_frames(1024) == 1024
    assert Compression("avgpool", 3).model_frames(1024) == 342  # ceil: the last window is kept
    assert Compression("patch", 4).encoder_config(base).tshape == 64
    assert Compression("patch", 4).encoder_config(base).tstride == 64


@pytest.mark.parametrize("method", ["avgpool", "maxpool", "patch"])
@pytest.mark.parametrize("factor", [2, 4])
def test_only_fshift_changes_the_frame_shift(method, factor):
    """Pooling and patch phases compress after the front end: their fbank is the full-resolution one (10 ms,
    all the clip's frames); a longer shift would squash the clip and fill the rest of the input with padding."""
    comp = Compression(method, factor)
    assert comp.frame_shift_ms(10) == 10
    assert comp.fbank_frames(1024) == 1024
    assert Compression("fshift", factor).frame_shift_ms(10) == 10 * factor
    assert Compression().frame_shift_ms(10) == 10


def test_avg_and_max_pool_are_eq2():
    x = torch.randn(2, 12, 5)
    for c in (2, 3, 4):
        avg = Compression("avgpool", c).pool(x)
        mx = Compression("maxpool", c).pool(x)
        for j in range(12 // c):
            window = x[:, c * j : c * j + c]
            assert torch.allclose(avg[:, j], window.mean(1), atol=1e-6)
            assert torch.equal(mx[:, j], window.amax(1))


def test_pool_keeps_odd_frame_counts():
    x = torch.randn(1, 1023, 3)
    avg = Compression("avgpool", 4).pool(x)
    mx = Compression("maxpool", 4).pool(x)
    assert avg.shape == (1, 256, 3) and mx.shape == (1, 256, 3)
    assert torch.allclose(avg[:, -1], x[:, 1020:].mean(1), atol=1e-6)  # last window: 3 frames
    assert torch.equal(mx[:, -1], x[:, 1020:].amax(1))


def test_invalid_compressions_are_named():
    with pytest.raises(ValueError, match="compression: unknown method 'zip'"):
        Compression("zip", 2)
    with pytest.raises(ValueError, match="positive integer"):
        Compression("fshift", 0)
    with pytest.raises(ValueError, match="positive integer"):
        Compression("fshift", 1.5)
    with pytest.raises(ValueError, match="'none' takes factor 1"):
        Compression("none", 2)
    with pytest.raises(ValueError, match="patch_transfer: unknown patch transfer"):
        Compression("patch", 2, patch_transfer="nearest")


def test_check_rejects_impossible_phases(base):
    Compression("fshift", 4).check(base)
    with pytest.raises(ValueError, match="does not divide the time grid of 64"):
        Compression("fshift", 3).check(base)
    small = base.replace(input_tdim=32)
    with pytest.raises(ValueError, match="impossible"):
        Compression("patch", 4).check(small)  # 16x64 patch on 32 frames
    overlapping = base.replace(fstride=10, tstride=10)
    Compression("fshift", 3).check(overlapping)  # overlapping patches: no divisibility rule


@pytest.mark.parametrize("method,factor", [("none", 1), ("fshift", 2), ("fshift", 4), ("avgpool", 4),
                                           ("maxpool", 3), ("patch", 2)])
def test_feature_pipeline_feeds_the_phase_encoder(method, factor):
    from common.models.ast.encoder import ASTEncoder

    audio = AudioConfig(num_mel_bins=32, target_frames=96)
    base = EncoderConfig(embed_dim=16, depth=1, num_heads=2, num_mel_bins=32, input_tdim=96,
                         fshape=8, tshape=4, fstride=8, tstride=4)
    comp = Compression(method, factor)
    cfg = comp.encoder_config(base)
    pipe = FeaturePipeline(audio, comp)
    waves = torch.randn(2, audio.clip_samples - 500)
    feats = pipe(waves, torch.tensor([audio.clip_samples - 500, 4000]))
    assert feats.shape == (2, cfg.input_tdim, 32) == (2, pipe.output_frames, 32)
    tokens = ASTEncoder(cfg).forward_features(feats)
    assert tokens.shape == (2, 2 + cfg.num_patches, 16)
    assert cfg.grid[1] == base.grid[1] // factor


def test_clip_samples_give_exactly_target_frames():
    audio = AudioConfig()
    assert audio.clip_samples == 400 + 1023 * 160
    for c in (1, 2, 4):
        pipe = FeaturePipeline(audio, Compression("fshift", c) if c > 1 else Compression())
        assert pipe.fbank.num_frames(audio.clip_samples) == 1024 // c


def test_pooled_frames_is_what_one_encoder_frame_stands_for():
    """The frames an encoder frame stands for, which the embedder's frame times and the pooling itself read:
    C for the pooling methods, 1 where the front end or the patch does the compressing."""
    from common.audio.compression import METHODS
    from common.phases.coarse import METHODS as COARSE

    assert {m: Compression(m, 1 if m == "none" else 4).pooled_frames for m in METHODS} == \
        {"none": 1, "fshift": 1, "avgpool": 4, "maxpool": 4, "patch": 1}
    assert set(COARSE) == set(METHODS) - {"none"}  # --coarse offers every method
