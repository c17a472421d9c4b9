"""HTS-AT model: the fold and unfold by hand, outputs, windows per geometry, config and geometry errors."""

import pytest
import torch
from einops import rearrange

from common.audio.compression import Compression
from common.config.recipe import RecipeError
from common.models.htsat import HTSAT, HTSATConfig, HTSATFrontEnd, fold, geometry, stage_layout, unfold
from tests.helpers import real_looking_signals

TINY = HTSATConfig(clip_samples=64000, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), num_classes=5)


def test_fold_by_hand():
    # x[t, f] = 100 t + f: 8 frames, 3 mel bins, 2 chunks -> a 6 x 4 image
    x = (100 * torch.arange(8)[:, None] + torch.arange(3)[None, :]).reshape(1, 1, 8, 3)
    image = fold(x, 2)[0, 0]
    expected = torch.tensor([
        [0, 100, 200, 300],      # chunk 0 (frames 0-3), mel 0
        [1, 101, 201, 301],      # chunk 0, mel 1
        [2, 102, 202, 302],      # chunk 0, mel 2
        [400, 500, 600, 700],    # chunk 1 (frames 4-7), mel 0
        [401, 501, 601, 701],
        [402, 502, 602, 702],
    ])
    assert torch.equal(image, expected)


def test_fold_matches_the_official_reshape():
    x = torch.randn(2, 1, 1024, 64)
    official = x.permute(0, 1, 3, 2).reshape(2, 1, 64, 4, 256).permute(0, 1, 3, 2, 4).reshape(2, 1, 256, 256)
    assert torch.equal(fold(x, 4), official)


def test_unfold_by_hand():
    # tokens[row, col] = 10 row + col on a 4 x 3 grid of 2 chunks (2 rows each) -> 2 rows x 6 time steps
    tokens = (10 * torch.arange(4)[:, None] + torch.arange(3)[None, :]).reshape(1, 4, 3, 1)
    out = unfold(tokens, 2)[0, 0]
    assert torch.equal(out, torch.tensor([[0, 1, 2, 20, 21, 22], [10, 11, 12, 30, 31, 32]]))
    # unfolding a folded log-mel (one token per pixel) gives the log-mel back, time in order
    x = torch.randn(2, 1, 16, 4)
    back = unfold(rearrange(fold(x, 4), "b c h w -> b h w c"), 4)  # [B, 1, F, T]
    assert torch.equal(back, x.transpose(2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("comp, frames", [(Compression(), 1024), (Compression("fshift", 4), 256),
                                          (Compression("fshift", 2), 512), (Compression("maxpool", 4), 256)])
def test_outputs(comp, frames):
    geom = geometry(TINY, comp)
    model = HTSAT(TINY, geom).eval()
    x = HTSATFrontEnd(TINY, geom)(real_looking_signals(3, 2.0, 32000))
    with torch.no_grad():
        out = model(x)
        tokens = model.swin.forward_features(model.to_image(x))
    assert out["clipwise_output"].shape == (3, 5)
    assert out["framewise_output"].shape == (3, frames, 5)
    assert out["latent_output"].shape == (3, TINY.num_features)
    torch.testing.assert_close(out["latent_output"], tokens.mean(dim=(1, 2)))
    # clipwise logits = mean over time steps; each step is repeated over the frames it covers
    torch.testing.assert_close(out["clipwise_output"], out["framewise_output"].mean(dim=1))
    steps = out["framewise_output"][:, ::model.frames_per_step]
    assert torch.equal(out["framewise_output"], steps.repeat_interleave(model.frames_per_step, dim=1))


@pytest.mark.slow
@pytest.mark.parametrize("comp", [Compression(), Compression("fshift", 4), Compression("fshift", 2),
                                  Compression("patch", 4), Compression("avgpool", 16)])
def test_windows_follow_the_stage_layout(comp):
    geom = geometry(TINY, comp)
    model = HTSAT(TINY, geom)
    blocks = [b for stage in model.swin.layers for b in stage.blocks]
    layout = stage_layout(TINY, geom)
    assert len(blocks) == len(layout) == sum(TINY.depths)
    for want, block in zip(layout, blocks):
        assert (tuple(block.input_resolution), tuple(block.window_size), tuple(block.shift_size)) == \
               (want.grid, want.window, want.shift)


def test_d1_geometry_changes_only_the_last_stage_windows():
    cfg = HTSATConfig()
    full, coarse = stage_layout(cfg, geometry(cfg)), stage_layout(cfg, geometry(cfg, Compression("fshift", 4)))
    changed = [(b.stage, b.block, b.window, c.window) for b, c in zip(full, coarse) if b.window != c.window]
    assert changed == [(3, 0, (8, 8), (4, 4)), (3, 1, (8, 8), (4, 4))]
    assert [b.grid for b in coarse[::2]][:1] == [(32, 32)]


@pytest.mark.slow
def test_training_step_reaches_every_parameter_and_mixup_pairs_with_the_flipped_clip():
    model = HTSAT(TINY)
    front = HTSATFrontEnd(TINY)
    x = front(real_looking_signals(4, 2.0, 32000), generator=torch.Generator().manual_seed(0))
    out = model(x, mixup_lambda=torch.full((4,), 0.7))
    torch.nn.functional.binary_cross_entropy_with_logits(out["clipwise_output"], torch.zeros(4, 5)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        plain = model(x[:, :1])["clipwise_output"]
        swapped = model(x[:, :1], mixup_lambda=torch.zeros(4))["clipwise_output"]  # all weight on the partner
        same = model(x[:, :1], mixup_lambda=torch.ones(4))["clipwise_output"]
    torch.testing.assert_close(swapped, plain.flip(0))
    torch.testing.assert_close(same, plain)


def test_drop_rate_drops_where_the_official_model_does():
    """``drop_rate`` is the official dropout after the patch embedding, on each attention's output projection and
    in each MLP (timm's ``drop_rate`` alone only reaches its unused classifier)."""
    model = HTSAT(TINY.replace(drop_rate=0.5, drop_path_rate=0.0))
    rates = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
    assert "pos_drop" in rates and any(".attn.proj_drop" in n for n in rates) and any(".mlp.drop" in n for n in rates)
    x = HTSATFrontEnd(TINY)(real_looking_signals(2, 2.0, 32000), generator=torch.Generator().manual_seed(0))
    model.train()
    assert not torch.equal(model(x)["clipwise_output"], model(x)["clipwise_output"])  # dropped differently
    model.eval()
    assert torch.equal(model(x)["clipwise_output"], model(x)["clipwise_output"])


def test_input_shape_errors():
    model = HTSAT(TINY)
    with pytest.raises(ValueError, match=r"\[B, 1 or 2, T, 64\]"):
        model(torch.zeros(2, 3, 100, 64))
    with pytest.raises(ValueError, match="more than the 1024"):
        model(torch.zeros(2, 1, 1025, 64))


def test_config_round_trip_and_errors_name_the_key():
    cfg = HTSATConfig(depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24])
    assert cfg.depths == (2, 2, 2, 2) and HTSATConfig.from_dict(cfg.to_dict()) == cfg
    assert HTSATConfig().num_features == 768 and HTSATConfig().chunks == 4 and HTSATConfig().target_frames == 1024
    with pytest.raises(RecipeError, match="model.windw_size: unknown key"):
        HTSATConfig.from_dict({"windw_size": 8})
    with pytest.raises(RecipeError, match="model.depths.1: expected an integer"):
        HTSATConfig.from_dict({"depths": [2, "two", 6, 2]})
    with pytest.raises(RecipeError, match=r"num_heads\[1\] = 5 does not divide"):
        HTSATConfig.from_dict({"num_heads": [4, 5, 16, 32]})
    with pytest.raises(ValueError, match="spec_size 250 must be a multiple of mel_bins"):
        HTSATConfig(spec_size=250)
    with pytest.raises(ValueError, match="gives 1251 STFT frames"):
        HTSATConfig(clip_samples=400000)


@pytest.mark.parametrize("comp, message", [
    (Compression("fshift", 3), "compression fshift x3: the factor does not divide the 1024 frames"),
    (Compression("avgpool", 32), "compression avgpool x32 leaves 32 frames, fewer than the 64 mel bins"),
    (Compression("patch", 16), r"compression patch x16: its 1024 frames over 64 mel bins fold into 4 time "
                                r"chunk\(s\), a 256x256 image, whose width is not a multiple of 512 \(patches 64 wide, "
                                r"then 3 patch merges that each halve the width\)"),
])
def test_impossible_geometries_name_method_and_factor(comp, message):
    with pytest.raises(ValueError, match=message):
        geometry(HTSATConfig(), comp)
