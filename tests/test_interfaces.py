"""The Python interface the package promises code outside it (docs/interop.md, "Python API"), at the import
paths written there: ``common.checkpoint.load_encoder(CKPT) -> ASTEncoder`` for a run directory, an export and an
official SSAST ``.pth``; ``forward_features`` on a normalised fbank, prefix tokens first; ``common.frontend.Fbank``
from waveforms ``[B, S]`` to ``[B, T, F]``."""

from __future__ import annotations

import torch

from tests.helpers import ssast_pretrained_state


def test_frontend_fbank_maps_waveforms_to_frames_by_mel_bins():
    import common.frontend

    assert set(common.frontend.__all__) == {"Fbank", "NORM_STATS", "NormStats", "normalize", "pad_or_crop",
                                            "resolve_norm_stats"}
    fbank = common.frontend.Fbank(frame_shift_ms=10, num_mel_bins=128, sample_rate=16000)
    assert isinstance(fbank, torch.nn.Module)
    feats = fbank(torch.randn(2, 16000))
    assert feats.shape == (2, 98, 128)  # Kaldi's framing of one second: 1 + (16000 - 400) // 160 frames
    x = common.frontend.normalize(common.frontend.pad_or_crop(feats, 128), common.frontend.NORM_STATS["audioset"])
    assert x.shape == (2, 128, 128) and torch.isfinite(x).all()


def test_checkpoint_load_encoder_reads_a_run_directory_an_export_and_an_official_pth(tmp_path, tiny_cfg):
    import common.checkpoint
    from common.models.exports import save_encoder

    encoder = common.checkpoint.ASTEncoder(tiny_cfg).eval()
    save_encoder(encoder, tmp_path / "model.safetensors")
    x = torch.randn(2, tiny_cfg.input_tdim, tiny_cfg.num_mel_bins)
    for ckpt in (tmp_path, tmp_path / "model.safetensors"):
        loaded = common.checkpoint.load_encoder(ckpt).eval()
        assert isinstance(loaded, common.checkpoint.ASTEncoder)
        tokens = loaded.forward_features(x)
        assert tokens.shape == (2, tiny_cfg.num_prefix_tokens + tiny_cfg.num_patches, tiny_cfg.embed_dim)
        assert torch.equal(tokens, encoder.forward_features(x))

    official = ssast_pretrained_state()
    torch.save(official, tmp_path / "SSAST-Tiny-Patch-400.pth")
    tokens = common.checkpoint.load_encoder(tmp_path / "SSAST-Tiny-Patch-400.pth").forward_features(
        torch.randn(1, 256, 128))
    assert tokens.shape == (1, 2 + 128, 64)
