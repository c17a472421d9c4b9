import pytest
import torch

from common.audio.compression import Compression
from common.models.ast.encoder import encoder_config
from common.models.flops import count_flops, encoder_train_flops


def analytic_train_flops(cfg) -> float:
    """3 x forward matmul FLOPs (backward = 2 x forward), attention included."""
    n, d, depth = cfg.num_patches + cfg.num_prefix_tokens, cfg.embed_dim, cfg.depth
    hidden = int(cfg.mlp_ratio * d)
    per_block = 2 * n * d * 3 * d + 2 * n * n * d * 2 + 2 * n * d * d + 2 * n * d * hidden * 2
    embed = 2 * cfg.num_patches * cfg.patch_area * d
    return 3 * (depth * per_block) + 2 * embed  # no grad w.r.t. the input spectrogram


def test_counter_sees_matmuls():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


@pytest.mark.slow
def test_encoder_training_flops_match_the_analytic_count():
    cfg = encoder_config("base")
    counted = encoder_train_flops(cfg)
    assert abs(counted - analytic_train_flops(cfg)) / counted < 0.01
    assert 280e9 < counted < 300e9  # SSAST-base, 512 + 2 tokens


@pytest.mark.slow
def test_compression_cuts_flops_by_at_least_the_factor():
    base = encoder_config("tiny")
    full = encoder_train_flops(base)
    for method in ("fshift", "avgpool", "maxpool", "patch"):
        cfg = Compression(method, 4).encoder_config(base)
        quarter = encoder_train_flops(cfg)
        assert abs(quarter - analytic_train_flops(cfg)) / quarter < 0.01
        assert quarter < full / 4 * 1.05  # attention shrinks quadratically, the rest linearly


def test_the_table_names_a_factor_the_clip_cannot_take(capsys):
    from common.models.flops import main

    main(["--size", "tiny", "--factors", "2,1024"])
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "impossible" not in rows["fshift x2"]
    assert rows["fshift x1024"].split(None, 2)[2].startswith("impossible: patch width tshape=16 exceeds")
