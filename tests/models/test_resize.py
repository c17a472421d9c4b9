import pytest
import torch
from torch.nn import functional as F

from common.audio.compression import Compression
from common.models.ast.encoder import ASTEncoder
from common.models.ast.resize import adapt_encoder, adapt_state_dict, resample_patch_kernel, resample_pos_embed


def test_same_size_resize_is_identity(tiny_cfg):
    enc = ASTEncoder(tiny_cfg)
    pos = enc.pos_embed.detach()
    for mode in ("bilinear", "cut"):
        assert torch.equal(resample_pos_embed(pos, (4, 8), (4, 8), 2, mode), pos)
    w = enc.patch_embed.proj.weight.detach()
    for mode in ("pi", "bilinear"):
        assert torch.equal(resample_patch_kernel(w, (8, 8), mode), w)
    state = adapt_state_dict(enc.state_dict(), tiny_cfg, tiny_cfg)
    assert all(torch.equal(state[k], v) for k, v in enc.state_dict().items())


@pytest.mark.parametrize("mode", ["bilinear", "cut"])
def test_prefix_rows_untouched_and_dtype_kept(mode):
    pos = torch.randn(1, 2 + 4 * 16, 8, dtype=torch.bfloat16)
    for new in ((4, 64), (4, 4), (2, 32)):
        out = resample_pos_embed(pos, (4, 16), new, 2, mode)
        assert out.shape == (1, 2 + new[0] * new[1], 8) and out.dtype == torch.bfloat16
        assert torch.equal(out[:, :2], pos[:, :2])


def test_bilinear_pos_embed_is_bilinear_interpolation_of_the_grid():
    pos = torch.randn(1, 2 + 3 * 5, 4)
    out = resample_pos_embed(pos, (3, 5), (3, 20), 2, "bilinear")
    grid = pos[:, 2:].reshape(1, 3, 5, 4).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(3, 20), mode="bilinear", align_corners=False)
    assert torch.allclose(out[:, 2:], ref.permute(0, 2, 3, 1).reshape(1, 60, 4), atol=1e-6)


def test_cut_takes_the_centre_and_interpolates_growing_axes():
    grid = torch.arange(4 * 10, dtype=torch.float32).reshape(1, 4, 10, 1)
    pos = torch.cat([torch.full((1, 2, 1), -1.0), grid.reshape(1, 40, 1)], dim=1)
    out = resample_pos_embed(pos, (4, 10), (2, 4), 2, "cut")[:, 2:].reshape(2, 4)
    # rows 4//2 - 2//2 = 1.., columns 10//2 - 4//2 = 3..
    assert torch.equal(out, grid[0, 1:3, 3:7, 0])
    grown = resample_pos_embed(pos, (4, 10), (2, 20), 2, "cut")[:, 2:].reshape(2, 20)
    ref = F.interpolate(grid[:, 1:3, :, 0][None], size=(2, 20), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(grown, ref)


def test_bad_pos_embed_shape_is_named():
    with pytest.raises(ValueError, match=r"does not hold 2 prefix rows and a 4x8 grid \(34 rows\)"):
        resample_pos_embed(torch.randn(1, 30, 4), (4, 8), (4, 16), 2)


def _upsample_patches(patches: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    # patches: [..., h*w] frequency-major -> bilinearly resized [..., h'*w']
    lead = patches.shape[:-1]
    x = patches.reshape(-1, 1, *old)
    x = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=False)
    return x.reshape(*lead, new[0] * new[1])


def test_pi_resize_to_a_larger_kernel_is_exact():
    torch.manual_seed(0)
    w = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    patches = torch.randn(50, 64, dtype=torch.float64)
    tokens = patches @ w.reshape(16, -1).T
    for new in ((8, 16), (8, 32), (16, 16)):
        w_new = resample_patch_kernel(w, new, "pi")
        up = _upsample_patches(patches, (8, 8), new)
        # exact up to timm's float32 pseudo-inverse
        assert torch.allclose(up @ w_new.reshape(16, -1).T, tokens, atol=1e-4)
    # plain bilinear interpolation of the kernel does not keep the tokens
    w_bl = resample_patch_kernel(w, (8, 32), "bilinear")
    assert not torch.allclose(_upsample_patches(patches, (8, 8), (8, 32)) @ w_bl.reshape(16, -1).T, tokens,
                              atol=1e-2)


def test_pi_resized_encoder_gives_the_same_tokens_on_the_upsampled_input(tiny_cfg):
    torch.manual_seed(0)
    fine = ASTEncoder(tiny_cfg).double()
    coarse_cfg = Compression("patch", 2).encoder_config(tiny_cfg)  # 8x16 patches, stride 8x16
    big_cfg = tiny_cfg.replace(input_tdim=128, tshape=16, tstride=16)  # same grid, twice the frames
    big = adapt_encoder(fine, big_cfg, patch_mode="pi")
    assert big.cfg.grid == tiny_cfg.grid and coarse_cfg.tshape == 16
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    patches = fine.unfold_patches(x)  # [B, N, 64]
    up = _upsample_patches(patches, (8, 8), (8, 16))  # each patch upsampled along time
    # fold the upsampled patches back into a [B, 128, 32] spectrogram (non-overlapping)
    image = F.fold(up.transpose(1, 2), output_size=(32, 128), kernel_size=(8, 16), stride=(8, 16))
    x_up = image[:, 0].transpose(1, 2)
    assert torch.allclose(big.embed_patches(x_up), fine.embed_patches(x), atol=1e-4)
    assert torch.allclose(big.forward_features(x_up), fine.forward_features(x), atol=1e-4)


def test_phase_change_adapts_pos_and_kernel(tiny_cfg):
    enc = ASTEncoder(tiny_cfg)
    coarse = adapt_encoder(enc, Compression("patch", 4).encoder_config(tiny_cfg), patch_mode="bilinear")
    assert coarse.patch_embed.proj.weight.shape[-2:] == (8, 32) and coarse.cfg.grid == (4, 2)
    back = adapt_encoder(coarse, tiny_cfg, patch_mode="pi")
    assert back.pos_embed.shape == enc.pos_embed.shape
    assert back.forward_features(torch.randn(1, 64, 32)).shape == (1, 34, 32)
    fshift = adapt_encoder(enc, Compression("fshift", 4).encoder_config(tiny_cfg))
    assert fshift.cfg.input_tdim == 16 and torch.equal(fshift.patch_embed.proj.weight,
                                                       enc.patch_embed.proj.weight)
    with pytest.raises(ValueError, match="embed_dim 32 -> 64"):
        adapt_state_dict(enc.state_dict(), tiny_cfg, tiny_cfg.replace(embed_dim=64))


def _column_weights(mode, old=(8, 64), new=(8, 16)):
    """Resample a grid whose channel t is 1 at time column t: the output says which fine columns each
    coarse position is made of."""
    cols = old[1]
    grid = torch.eye(cols).reshape(1, 1, cols, cols).expand(1, old[0], cols, cols)
    pos = torch.cat([torch.zeros(1, 2, cols), grid.reshape(1, old[0] * cols, cols)], dim=1)
    out = resample_pos_embed(pos, old, new, 2, mode)[:, 2:].reshape(new[0], new[1], cols)
    return out[0]  # [new time columns, old time columns], the same for every frequency row


def test_shrinking_bilinearly_averages_every_fine_column_a_coarse_position_covers():
    weights = _column_weights("bilinear")  # 8x64 -> 8x16, the Fshift x4 grid of an SSAST init
    assert torch.allclose(weights.sum(1), torch.ones(16), atol=1e-6)
    for j in range(1, 15):
        own = weights[j, 4 * j: 4 * j + 4]
        assert (own > 0.1).all()  # all four fine columns count (without antialias: only 4j+1, 4j+2)
        assert own.sum() > 0.7 and torch.allclose(own, own.flip(0), atol=1e-6)
    ramp = torch.arange(64.0)[None, None, :, None].expand(1, 8, 64, 1).reshape(1, 512, 1)
    out = resample_pos_embed(torch.cat([torch.zeros(1, 2, 1), ramp], 1), (8, 64), (8, 16), 2)[:, 2:]
    assert torch.allclose(out.reshape(8, 16)[0, 1:15], 4 * torch.arange(1.0, 15) + 1.5)  # the centres


def test_shrinking_a_patch_kernel_bilinearly_averages_every_fine_column_a_coarse_one_covers():
    """Leaving a ``patch_transfer: bilinear`` phase, the 16x64 kernel becomes 16x16 like an image shrunk with
    antialiasing, as the positional embedding does: each coarse kernel column is made of the four fine columns
    it covers (without antialias only the middle two, 4j+1 and 4j+2, count)."""
    kernel = torch.eye(64).reshape(64, 1, 1, 64).expand(64, 1, 16, 64)  # output channel t: 1 at column t
    out = resample_patch_kernel(kernel, (16, 16), "bilinear")
    assert out.shape == (64, 1, 16, 16) and torch.equal(out, out[:, :, :1].expand_as(out))
    weights = out[:, 0, 0].T  # [coarse columns, fine columns]
    assert torch.allclose(weights.sum(1), torch.ones(16), atol=1e-6)
    for j in range(1, 15):
        own = weights[j, 4 * j: 4 * j + 4]
        assert (own > 0.1).all() and own.sum() > 0.7 and torch.allclose(own, own.flip(0), atol=1e-6)


def test_cut_keeps_the_centre_columns_of_an_ssast_grid():
    weights = _column_weights("cut")  # 64 // 2 - 16 // 2 = 24: columns 24..39 survive, unchanged
    assert torch.equal(weights, torch.eye(64)[24:40])


def test_growing_is_plain_bilinear_in_both_modes():
    # the paper's coarse -> fine transfer (section 3.3): 8x16 -> 8x64, not touched by the antialiasing
    pos = torch.randn(1, 2 + 8 * 16, 4)
    grid = pos[:, 2:].reshape(1, 8, 16, 4).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(8, 64), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    for mode in ("bilinear", "cut"):
        out = resample_pos_embed(pos, (8, 16), (8, 64), 2, mode)[:, 2:]
        assert torch.allclose(out, ref.reshape(1, 512, 4), atol=1e-6)


def test_official_inits_follow_their_codes_rule_and_exports_the_recipe():
    from common.models.weights import EncoderWeights
    from common.phases.init import init_pos_mode
    from finetune.recipe import load_recipe

    official, imagenet, export = EncoderWeights(None, None, {"source": "official"}), \
        EncoderWeights(None, None, {"source": "imagenet"}), \
        EncoderWeights(None, None, {"source": "export", "objective": "ssast"})
    assert init_pos_mode(official, "bilinear") == init_pos_mode(imagenet, "bilinear") == "cut"  # SSAST / AST
    # a compressed first phase: official audio weights cut at full resolution, then carried as a phase change;
    # ImageNet weights (no time axis) by AST's rule on the phase's grid
    assert init_pos_mode(official, "bilinear", compressed=True) == "cut_at_full"
    assert init_pos_mode(imagenet, "bilinear", compressed=True) == "cut"
    assert init_pos_mode(export, "bilinear") == "bilinear" and init_pos_mode(None, "cut") == "cut"
    assert init_pos_mode(official, "bilinear", "bilinear") == "bilinear"  # transfer.init_pos_embed
    assert init_pos_mode(imagenet, "bilinear", "cut_at_full", compressed=True) == "cut_at_full"
    assert init_pos_mode(official, "bilinear", "cut", compressed=True) == "cut"  # the former default, on request
    recipe = load_recipe("esc50", overrides=["transfer.init_pos_embed=bilinear"])
    assert (recipe.transfer.pos_embed, recipe.transfer.init_pos_embed) == ("bilinear", "bilinear")
    with pytest.raises(ValueError, match="transfer.init_pos_embed"):
        load_recipe("esc50", overrides=["transfer.init_pos_embed=nearest"])


@pytest.mark.parametrize("transfer", ["pi", "bilinear"])
def test_an_export_of_a_patch_phase_starts_a_task_at_full_resolution(transfer):
    """An export written in a p x Cp phase (`export/phase1.safetensors` of a `patch` run) used as --init: the task's
    full resolution is p x p patches (not the export's p x Cp), and its kernel leaves the patch phase by that phase's
    transfer, as the run's own phase change would have."""
    from common.models.arch import architecture_for
    from common.models.weights import EncoderWeights
    from common.phases.config import PhaseConfig
    from common.phases.init import task_encoder, task_encoder_config
    from common.phases.transition import initial_model
    from finetune.classifier import AugmentConfig, ClassifierObjective
    from finetune.recipe import load_recipe

    recipe = load_recipe("synth", overrides=["model.size=custom", "model.embed_dim=32", "model.depth=2",
                                             "model.num_heads=2"])
    full = task_encoder_config(None, recipe.model, recipe.num_mel_bins, recipe.task.target_frames)
    coarse = Compression("patch", 4, transfer).encoder_config(full)
    torch.manual_seed(0)
    state = ASTEncoder(coarse).state_dict()
    init = EncoderWeights(coarse, state, {"source": "export", "objective": "ssast",
                                          "phase": {"index": 1, "of": 2, "compression": "patch", "factor": 4,
                                                    "patch_transfer": transfer}})
    assert init.written_in == Compression("patch", 4, transfer)
    cfg = task_encoder_config(init, recipe.model, recipe.num_mel_bins, recipe.task.target_frames)
    assert (cfg.fshape, cfg.tshape, cfg.fstride, cfg.tstride, cfg.grid) == \
        (full.fshape, full.tshape, full.fstride, full.tstride, full.grid)
    objective = ClassifierObjective(["a", "b"], "acc", "ce", AugmentConfig())
    model = initial_model(architecture_for(cfg), objective, cfg, PhaseConfig(epochs=1), 0, init)
    expected = adapt_state_dict(state, coarse, cfg, "bilinear", transfer)["patch_embed.proj.weight"]
    other = adapt_state_dict(state, coarse, cfg, "bilinear", "bilinear" if transfer == "pi" else "pi")
    assert torch.equal(model.encoder.patch_embed.proj.weight.detach(), expected)
    assert not torch.allclose(expected, other["patch_embed.proj.weight"])
    frozen = task_encoder(init, cfg)  # a linear probe's encoder: the same kernel as fine-tuning's start
    assert torch.equal(frozen.patch_embed.proj.weight.detach(), expected)


@pytest.mark.parametrize("compression", [Compression("fshift", 4), Compression("patch", 4, "bilinear")])
def test_official_weights_enter_a_compressed_phase_as_a_full_resolution_start_then_a_phase_change(tmp_path,
                                                                                                      compression):
    """An official SSAST checkpoint fine-tuned with a compressed first phase: its positional embedding is fitted to
    the task's full-resolution grid by SSAST's rule (here the same grid: kept), then carried to the phase's grid as
    a phase change carries it (bilinear over the whole clip), not centre-cut to the phase's grid (the middle
    quarter of the positions at x4, which the next phase change would stretch over the clip)."""
    from common.models.arch import architecture_for
    from common.models.weights import load_encoder_state
    from common.phases.config import PhaseConfig, TransferConfig
    from common.phases.init import init_pos_mode
    from common.phases.transition import initial_model
    from finetune.classifier import AugmentConfig, ClassifierObjective
    from tests.helpers import ssast_pretrained_state

    path = tmp_path / "SSAST-Tiny-Patch-400.pth"
    torch.save(ssast_pretrained_state(dim=32, fdim=64, tdim=128), path)
    init = load_encoder_state(str(path))
    full = init.config.replace(num_heads=2)
    init = init._replace(config=full)
    phase = PhaseConfig(compression=compression.method, factor=4, patch_transfer=compression.patch_transfer or "pi",
                        epochs=1)
    coarse = compression.encoder_config(full)
    mode = init_pos_mode(init, "bilinear", compressed=True)
    objective = ClassifierObjective(["a", "b"], "acc", "ce", AugmentConfig())
    model = initial_model(architecture_for(full), objective, coarse, phase, 0, init, mode, TransferConfig())
    expected = resample_pos_embed(init.state["pos_embed"], full.grid, coarse.grid, 2, "bilinear")
    centre = resample_pos_embed(init.state["pos_embed"], full.grid, coarse.grid, 2, "cut")
    assert mode == "cut_at_full" and full.grid == (4, 8) and coarse.grid == (4, 2)
    assert torch.allclose(model.encoder.pos_embed.detach(), expected, atol=1e-6)
    assert not torch.allclose(expected, centre)
    direct = initial_model(architecture_for(full), objective, coarse, phase, 0, init, "cut", TransferConfig())
    assert torch.equal(direct.encoder.pos_embed.detach(), centre)  # transfer.init_pos_embed: cut, as before
    assert torch.equal(direct.encoder.patch_embed.proj.weight, model.encoder.patch_embed.proj.weight)


@pytest.mark.parametrize("source", ["official", "hf", "export", "imagenet"])
def test_a_changed_patch_stride_of_an_audio_init_is_said(source, caplog):
    """An init trained on audio with overlapping patches (AST's AudioSet checkpoints: stride 10, a 12 x 101 grid)
    re-strided to the recipe's non-overlapping patches is a warning naming the setting that keeps it; ImageNet
    weights have no audio stride to keep."""
    import logging

    from common.models.ast.encoder import EncoderConfig
    from common.models.spec import ModelSpec
    from common.models.weights import EncoderWeights
    from common.phases.init import task_encoder_config

    init = EncoderWeights(EncoderConfig(fstride=10, tstride=10, input_tdim=1024), None, {"source": source})
    with caplog.at_level(logging.WARNING):
        cfg = task_encoder_config(init, ModelSpec(), 128, 1024)
    assert (cfg.fstride, cfg.tstride) == (16, 16)
    said = [r.getMessage() for r in caplog.records if "trained with patch stride 10x10" in r.getMessage()]
    assert bool(said) is (source != "imagenet") and all("--set model.stride=[10,10] keeps it" in m for m in said)


def test_weights_that_do_not_fit_are_one_error_naming_the_file_and_the_keys(tiny_cfg, tmp_path, capsys):
    """--init (finetune, pretrain, linear_probe, embed) loads through load_adapted: a tensor of another shape, a
    missing or an unexpected key is a ValueError naming the file and the first mismatching keys, not
    load_state_dict's RuntimeError; and embed ends with that one line."""
    from common.models.ast.resize import load_adapted
    from common.models.exports import save_encoder
    from finetune.embed import main as embed
    from tests.helpers import _write, one_error

    good = ASTEncoder(tiny_cfg).state_dict()
    cases = {"wrong shapes blocks.1.mlp.fc1.bias (7,) (the model's (128,))": {**good, "blocks.1.mlp.fc1.bias":
                                                                                torch.zeros(7)},
             "missing keys ['norm.bias']": {k: v for k, v in good.items() if k != "norm.bias"},
             "unexpected keys ['head.weight']": {**good, "head.weight": torch.zeros(3)},
             "no 'pos_embed'": {k: v for k, v in good.items() if k != "pos_embed"}}
    for says, state in cases.items():
        with pytest.raises(ValueError, match=r"^w\.pth: .*" + says.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            load_adapted(ASTEncoder(tiny_cfg), state, tiny_cfg, tiny_cfg, source="w.pth")
    encoder = ASTEncoder(tiny_cfg)
    load_adapted(encoder, good, tiny_cfg, tiny_cfg, source="w.pth")  # fitting weights load as before
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in good.items())
    # through a command: an export whose tensor does not fit its own config
    path = save_encoder(ASTEncoder(tiny_cfg), tmp_path / "e.safetensors")
    from safetensors.torch import load_file, safe_open, save_file
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    save_file({**load_file(str(path)), "blocks.0.norm1.weight": torch.ones(5)}, str(path), metadata=meta)
    clip = _write(tmp_path / "a.wav", 0.5)
    assert embed(["--init", str(path), "--inputs", str(clip), "--out", str(tmp_path / "o")]) == 2
    assert one_error(capsys.readouterr().err) == (
        f"error: {path}: the weights do not fit the model its config describes: wrong shapes blocks.0.norm1.weight "
        f"(5,) (the model's (32,))")


def test_weights_that_are_not_finite_floats_are_refused_naming_the_file_and_the_key(tiny_cfg):
    """--init with a NaN weight or integer weights is refused naming the file and the tensor (a cast would load
    them without a word)."""
    from common.models.ast.resize import load_adapted

    good = ASTEncoder(tiny_cfg).state_dict()
    broken = {**good, "norm.weight": torch.full_like(good["norm.weight"], float("nan"))}
    with pytest.raises(ValueError, match=r"^w\.pth: tensor norm\.weight holds NaN or infinite values$"):
        load_adapted(ASTEncoder(tiny_cfg), broken, tiny_cfg, tiny_cfg, source="w.pth")
    integers = {**good, "blocks.0.attn.qkv.weight": good["blocks.0.attn.qkv.weight"].to(torch.int64)}
    with pytest.raises(ValueError, match=r"^w\.pth: tensor blocks\.0\.attn\.qkv\.weight holds int64 values; the "
                                         r"model's weights are floating point$"):
        load_adapted(ASTEncoder(tiny_cfg), integers, tiny_cfg, tiny_cfg, source="w.pth")
