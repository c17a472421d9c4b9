import pytest
import torch

from common.models.ast.encoder import ASTEncoder
from common.models.exports import read_weights, save_encoder
from common.models.weights import load_encoder, load_encoder_state
from tests.helpers import ssast_pretrained_state


def test_export_round_trip(tmp_path, tiny_cfg):
    enc = ASTEncoder(tiny_cfg).eval()
    path = save_encoder(enc, tmp_path / "enc.safetensors", meta={"frontend": {"frame_shift_ms": 10.0}})
    loaded = load_encoder(path).eval()
    assert loaded.cfg == tiny_cfg
    x = torch.randn(2, 64, 32)
    assert torch.equal(loaded.forward_features(x), enc.forward_features(x))
    _, meta = read_weights(path)
    assert meta["frontend"] == {"frame_shift_ms": 10.0}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file


def test_run_directory_resolves_to_its_final_export(tmp_path, tiny_cfg):
    (tmp_path / "export").mkdir()
    save_encoder(ASTEncoder(tiny_cfg), tmp_path / "export" / "phase1.safetensors")
    with pytest.raises(FileNotFoundError, match="no final export model.safetensors.*phase1.safetensors"):
        load_encoder(tmp_path)
    save_encoder(ASTEncoder(tiny_cfg), tmp_path / "model.safetensors")
    assert load_encoder(tmp_path).cfg == tiny_cfg


def test_official_ssast_pretrained_pth(tmp_path):
    sd = ssast_pretrained_state()
    path = tmp_path / "SSAST-Tiny-Patch-400.pth"
    torch.save(sd, path)
    enc = load_encoder(path)
    cfg = enc.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_prefix_tokens) == (64, 2, 1, 2)
    assert (cfg.num_mel_bins, cfg.input_tdim, cfg.fshape, cfg.tshape, cfg.fstride, cfg.tstride) == \
        (128, 256, 16, 16, 16, 16)
    assert torch.equal(enc.prefix_tokens[:, 0], sd["module.v.cls_token"][:, 0])
    assert torch.equal(enc.prefix_tokens[:, 1], sd["module.v.dist_token"][:, 0])
    assert torch.equal(enc.blocks[1].mlp.fc2.weight, sd["module.v.blocks.1.mlp.fc2.weight"])
    assert torch.equal(enc.pos_embed, sd["module.v.pos_embed"])
    assert enc.forward_features(torch.randn(1, 256, 128)).shape == (1, 2 + 128, 64)


def test_official_ssast_frame_model(tmp_path):
    sd = ssast_pretrained_state(fshape=128, tshape=2, tdim=64)
    torch.save(sd, tmp_path / "frame.pth")
    cfg = load_encoder(tmp_path / "frame.pth").cfg
    assert cfg.grid == (1, 32) and (cfg.fstride, cfg.tstride) == (128, 2)


def test_official_ast_finetuned_pth(tmp_path):
    # AST / fine-tuned SSAST layout: no p_input_*, pos_embed for the 12 x 101 grid, an mlp_head
    sd = ssast_pretrained_state(tdim=256)
    for k in [k for k in sd if "pred" in k or "p_input" in k or "mask_embed" in k]:
        del sd[k]
    sd["module.v.pos_embed"] = torch.randn(1, 12 * 101 + 2, 64)
    sd["module.mlp_head.0.weight"], sd["module.mlp_head.1.weight"] = torch.ones(64), torch.randn(527, 64)
    torch.save(sd, tmp_path / "audioset_10_10.pth")
    enc = load_encoder(tmp_path / "audioset_10_10.pth")
    cfg = enc.cfg
    assert (cfg.fstride, cfg.tstride, cfg.input_tdim, cfg.grid) == (10, 10, 1016, (12, 101))
    assert enc.forward_features(torch.randn(1, 1024, 128)).shape == (1, 1214, 64)  # AST's 1024 frames
    assert load_encoder(tmp_path / "audioset_10_10.pth", input_tdim=1024).cfg.input_tdim == 1024
    with pytest.raises(ValueError, match="gives 1308"):
        load_encoder(tmp_path / "audioset_10_10.pth", input_tdim=1104)
    with pytest.raises(ValueError, match="not a multiple of the 13 frequency rows"):
        load_encoder(tmp_path / "audioset_10_10.pth", fstride=9)


def test_neither_format_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="neither an export of this package.*: not a PyTorch checkpoint \\(5 bytes"):
        load_encoder(bad)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="HTS-AT .pth, a Hugging Face AST directory\\): the file is empty$"):
        load_encoder(tmp_path / "empty.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"not an SSAST/AST checkpoint: missing \['v.pos_embed'"):
        load_encoder(tmp_path / "other.pth")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="neither an export of this package nor timm ViT weights"):
        load_encoder(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(tmp_path / "missing.pth")


def test_weights_only_load_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="neither an export"):
        load_encoder_state(tmp_path / "evil.pth")
