"""HTS-AT phase changes: adapted weights equal timm's in-place resize, kept tensors are bit-identical; FLOPs."""

import copy

import pytest
import torch

from common.audio.compression import Compression
from common.models.htsat import (
    HTSAT,
    HTSATConfig,
    HTSATFrontEnd,
    adapt_model,
    adapt_state_dict,
    geometry,
    resize_bias_table,
    train_flops,
)
from tests.helpers import real_looking_signals

TINY = HTSATConfig(clip_samples=64000, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), num_classes=5)


def trained_looking(model: HTSAT) -> HTSAT:
    """Random non-default values in the tensors that are usually constant at init (tables, norms, bn0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or "norm" in name or "bn0" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
        model.bn0.running_mean.uniform_(-60, -20, generator=g)
        model.bn0.running_var.uniform_(50, 300, generator=g)
    return model.eval()


def outputs(model: HTSAT, cfg: HTSATConfig = TINY) -> dict:
    x = HTSATFrontEnd(cfg, model.geom)(real_looking_signals(2, 2.0, 32000))
    with torch.no_grad():
        return model(x)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(non-contiguous|non-tuple sequence):UserWarning")  # inside timm's resize
@pytest.mark.parametrize("path", [[("fshift", 4), ("none", 1)],                 # D1: 128x128 -> 256x256
                                  [("fshift", 4), ("fshift", 2), ("none", 1)]])  # 4 -> 2 -> 1 through D2
def test_adapted_model_equals_timm_in_place_resize_and_a_fresh_model(path):
    geoms = [geometry(TINY, Compression(*step)) for step in path]
    model = trained_looking(HTSAT(TINY, geoms[0]))
    reference = copy.deepcopy(model)  # resized in place by timm, the route the reference verified
    state = model.state_dict()
    for old, new in zip(geoms, geoms[1:]):
        before = state
        state = adapt_state_dict(state, TINY, old, new)
        reference.swin.set_input_size(img_size=new.image, window_size=TINY.window_size)
        reference.geom = new
        changed = {k for k in state if state[k] is not before[k]}
        assert changed and all("layers.3.blocks" in k and k.endswith("relative_position_bias_table") for k in changed)
        assert all(torch.equal(state[k], before[k]) for k in state if k not in changed)
        ref_state = reference.state_dict()
        assert set(ref_state) == set(state)
        assert all(torch.equal(ref_state[k], state[k]) for k in state)  # bit-identical, tables included
    fresh = HTSAT(TINY, geoms[-1]).eval()
    fresh.load_state_dict(state)
    got, want = outputs(fresh), outputs(reference)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert got["framewise_output"].shape == (2, 1024, 5)


@pytest.mark.slow
def test_d1_tables_grow_7x7_to_15x15_keeping_the_centre():
    coarse, full = geometry(TINY, Compression("fshift", 4)), geometry(TINY)
    model = trained_looking(HTSAT(TINY, coarse))
    state = adapt_state_dict(model.state_dict(), TINY, coarse, full)
    key = "swin.layers.3.blocks.1.attn.relative_position_bias_table"
    assert model.state_dict()[key].shape == (49, 2) and state[key].shape == (225, 2)
    assert torch.equal(state[key][112], model.state_dict()[key][24])  # offset (0, 0) sits in the middle
    back = adapt_model(adapt_model(model, full), coarse)  # and the model adapter goes both ways
    assert back.geom == coarse and back.state_dict()[key].shape == (49, 2)


@pytest.mark.parametrize("mode", ["timm", "bilinear", "bicubic"])
def test_bias_table_transfers_keep_dtype_and_shape(mode):
    table = torch.randn(7 * 15, 3).to(torch.bfloat16)
    out = resize_bias_table(table, (4, 8), (8, 8), mode)
    assert out.shape == (225, 3) and out.dtype == torch.bfloat16
    assert resize_bias_table(table, (4, 8), (4, 8), mode) is table
    flat = resize_bias_table(torch.ones(49, 2), (4, 4), (8, 8), mode)
    torch.testing.assert_close(flat, torch.ones(225, 2))  # a constant bias stays constant
    with pytest.raises(ValueError, match="is not \\[7 x 7, heads\\]"):
        resize_bias_table(torch.ones(50, 2), (4, 4), (8, 8), mode)


@pytest.mark.slow
def test_patch_phase_resizes_the_kernel_and_the_clamped_tables():
    coarse, full = geometry(TINY, Compression("patch", 4)), geometry(TINY)
    assert coarse.patch == (4, 16) and coarse.image == (256, 256)
    model = trained_looking(HTSAT(TINY, coarse))
    state = adapt_state_dict(model.state_dict(), TINY, coarse, full, patch_transfer="pi")
    changed = sorted(k for k in state if state[k] is not model.state_dict()[k] and
                     not torch.equal(state[k], model.state_dict()[k]))
    assert changed == ["swin.layers.2.blocks.0.attn.relative_position_bias_table",
                       "swin.layers.2.blocks.1.attn.relative_position_bias_table",
                       "swin.layers.3.blocks.0.attn.relative_position_bias_table",
                       "swin.layers.3.blocks.1.attn.relative_position_bias_table",
                       "swin.patch_embed.proj.weight"]
    assert state["swin.patch_embed.proj.weight"].shape == (8, 1, 4, 4)
    fresh = HTSAT(TINY, full).eval()
    fresh.load_state_dict(state)
    assert torch.isfinite(outputs(fresh)["clipwise_output"]).all()


@pytest.mark.slow
def test_training_flops_of_the_full_model():
    cfg = HTSATConfig()
    full = train_flops(cfg)
    coarse = {m: train_flops(cfg, geometry(cfg, Compression(m, 4))) for m in ("fshift", "avgpool", "maxpool")}
    half = train_flops(cfg, geometry(cfg, Compression("fshift", 2)))
    print(f"\nHTS-AT training GFLOPs per clip: full {full / 1e9:.2f}, Fshift x4 {coarse['fshift'] / 1e9:.2f}, "
          f"Fshift x2 {half / 1e9:.2f}")
    assert full == pytest.approx(35.9e9, rel=0.01)  # the reference's count of the official model
    for flops in coarse.values():
        assert flops / full == pytest.approx(0.25, rel=0.01)
    assert half / full == pytest.approx(0.5, rel=0.01)


def test_a_compression_method_without_htsat_geometry_is_refused_not_run_at_full_resolution():
    """A compression method HTS-AT's geometry does not know (one added to common.audio.compression for the AST
    family) is refused by name; it was planned and trained at full resolution under the coarse phase's label."""
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="compression mixpool x4: HTS-AT has no geometry for the compression method"):
        geometry(TINY, SimpleNamespace(method="mixpool", factor=4))
    assert geometry(TINY, Compression("avgpool", 4)).image != geometry(TINY).image
