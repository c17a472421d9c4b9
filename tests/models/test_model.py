import re

import pytest
import torch

from common.models.ast.encoder import ASTEncoder, EncoderConfig, count_parameters, encoder_config


def test_grid_is_derived_from_the_config():
    assert encoder_config("base").grid == (8, 64)
    assert encoder_config("base", fstride=10, tstride=10).grid == (12, 101)  # AST: 1212 tokens
    assert encoder_config("base", fshape=128, tshape=2, fstride=128, tstride=2).grid == (1, 512)
    assert encoder_config("base", fshape=128, tshape=2, fstride=128, tstride=1, input_tdim=128).grid == (1, 127)


@pytest.mark.slow
def test_sizes_match_ssast():
    tiny = ASTEncoder(encoder_config("tiny", input_tdim=64))
    assert tiny.cfg.embed_dim == 192 and len(tiny.blocks) == 12 and tiny.blocks[0].attn.num_heads == 3
    assert 5e6 < count_parameters(tiny) < 7e6  # SSAST README: tiny = 6M
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        encoder_config("huge")


@pytest.mark.slow
def test_forward_features_shapes_and_layers(tiny_cfg):
    enc = ASTEncoder(tiny_cfg)
    x = torch.randn(3, 64, 32)
    out = enc.forward_features(x)
    assert out.shape == (3, 2 + 4 * 8, 32)
    assert torch.allclose(out.mean(-1), torch.zeros(3, 34), atol=1e-4)  # final LayerNorm (no affine change yet)
    hidden = enc.forward_features(x, layer=1)
    assert hidden.shape == out.shape and not torch.allclose(hidden, out)
    assert torch.allclose(enc.forward_features(x, layer=-1), enc.forward_features(x, layer=2))
    with pytest.raises(ValueError, match="layer must be"):
        enc.forward_features(x, layer=3)


def test_wrong_input_shape_is_named(tiny_cfg):
    enc = ASTEncoder(tiny_cfg)
    with pytest.raises(ValueError, match=r"expects fbank \[B, T=64, F=32\], got \(1, 72, 32\)"):
        enc(torch.randn(1, 72, 32))


def test_blocks_use_fused_attention_and_layernorm_eps(tiny_cfg):
    enc = ASTEncoder(tiny_cfg)
    assert all(block.attn.fused_attn for block in enc.blocks)
    assert enc.norm.eps == 1e-6 and enc.blocks[0].norm1.eps == 1e-6


def test_patch_order_matches_conv_and_unfold(tiny_cfg):
    enc = ASTEncoder(tiny_cfg)
    x = torch.randn(2, 64, 32)
    patches = enc.unfold_patches(x)  # [B, N, fshape * tshape]
    w = enc.patch_embed.proj.weight.reshape(tiny_cfg.embed_dim, -1)
    tokens = patches @ w.T + enc.patch_embed.proj.bias
    assert torch.allclose(tokens, enc.embed_patches(x), atol=1e-5)
    # token index f * t_dim + t; frequency row 0 = lowest mel bins, time column 1 = frames 8..15
    assert torch.equal(patches[0, 1].reshape(8, 8), x[0, 8:16, 0:8].T)


def test_backward_is_finite(tiny_cfg):
    enc = ASTEncoder(tiny_cfg)
    enc.forward_features(torch.randn(2, 64, 32)).pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())


def test_config_round_trip_and_validation(tiny_cfg):
    assert EncoderConfig.from_dict(tiny_cfg.to_dict()) == tiny_cfg
    with pytest.raises(ValueError, match=r"^encoder_config\.heads: unknown key"):
        EncoderConfig.from_dict({**tiny_cfg.to_dict(), "heads": 3})
    # a value of the wrong type names its key, not a TypeError from a comparison deep in __post_init__
    for key, value, says in (("depth", "four", "expected an integer, got 'four'"),
                             ("embed_dim", None, "expected an integer, got None"),
                             ("qkv_bias", 1, "expected true or false, got 1"),
                             ("mlp_ratio", [4], "expected a number, got [4]")):
        with pytest.raises(ValueError, match=rf"^init\.json config\.{key}: {re.escape(says)}$"):
            EncoderConfig.from_dict({**tiny_cfg.to_dict(), key: value}, prefix="init.json config")
    with pytest.raises(ValueError, match=r"^encoder_config: expected a mapping, got \[1\]"):
        EncoderConfig.from_dict([1])
    with pytest.raises(ValueError, match="not divisible"):
        EncoderConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="exceeds the input length"):
        EncoderConfig(input_tdim=8)
