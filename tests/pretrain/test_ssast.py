import math

import pytest
import torch
from torch.nn import functional as F

from common.audio.compression import Compression
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from pretrain.masking import mask_count, sample_mask
from pretrain.ssast import SSASTConfig, SSASTModel, SSASTObjective, adapt_heads


@pytest.fixture
def cfg():
    return EncoderConfig(embed_dim=32, depth=2, num_heads=2, num_mel_bins=64, input_tdim=128,
                         fshape=16, tshape=16, fstride=16, tstride=16)  # grid 4 x 8


def test_mask_ratio_is_kept_across_phases():
    assert mask_count(512, 400 / 512) == 400
    assert mask_count(128, 400 / 512) == 100  # C = 4
    with pytest.raises(ValueError, match="masks 64 of 64"):
        mask_count(64, 0.999)


@pytest.mark.parametrize("method", ["uniform", "cluster", "cluster_ssast"])
def test_masks_have_exactly_m_distinct_sorted_indices(method):
    idx = sample_mask(16, (8, 64), 400, method, torch.Generator().manual_seed(0))
    assert idx.shape == (16, 400)
    assert (idx.diff(dim=1) > 0).all() and idx.min() >= 0 and idx.max() < 512
    again = sample_mask(16, (8, 64), 400, method, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)


def _mask(idx, n):
    return torch.zeros(idx.shape[0], n, dtype=torch.bool).scatter_(1, idx, True)


@pytest.mark.slow
def test_cluster_masking_is_clustered_and_unbiased():
    g = torch.Generator().manual_seed(1)
    grid, n, m = (8, 64), 512, 250

    def neighbour_rate(method):
        mask = _mask(sample_mask(400, grid, m, method, g), n).view(-1, *grid)
        right = (mask[..., :-1] & mask[..., 1:]).float().sum() / mask[..., :-1].float().sum()
        return right.item()

    assert neighbour_rate("cluster") > neighbour_rate("uniform") + 0.15
    rows = _mask(sample_mask(3000, grid, 400, "cluster", g), n).view(-1, *grid).float().mean((0, 2))
    assert (rows - 400 / 512).abs().max() < 0.02  # every frequency row masked equally often
    # the official generator's bias (SSAST's gen_maskid_patch): low mel bins masked ~half as often
    official = _mask(sample_mask(3000, grid, 400, "cluster_ssast", g), n).view(-1, *grid).float().mean((0, 2))
    assert official[0] == pytest.approx(0.415, abs=0.03) and official[4] == pytest.approx(0.89, abs=0.03)
    assert not _mask(sample_mask(200, grid, 400, "cluster_ssast", g), n)[:, 0].any()  # id 0 never masked


def test_cluster_masking_masks_clusters_only_even_when_the_first_clusters_fall_short():
    """Every masked patch lies in one of the clip's clusters: when a clip's first clusters overlap so much that
    they cover fewer than M patches (about 0.65 % of clips at 100 of 128), more are laid, where the patches
    still missing were drawn uniformly (unclustered) before."""
    from pretrain.masking import _MAX_ROUNDS, _cluster_cover

    grid, count = (8, 16), 100
    for seed in range(4):
        cover = _cluster_cover(1000, grid, count, torch.Generator().manual_seed(seed), (3, 5))
        idx = sample_mask(1000, grid, count, "cluster", torch.Generator().manual_seed(seed))
        laid = cover.max().item()  # the "uncovered" mark (some patch of some clip is uncovered)
        assert laid >= _MAX_ROUNDS
        assert ((cover < laid).sum(1) >= count).all()
        assert (cover.gather(1, idx) < laid).all()


def test_auto_masking_follows_ssast_rule():
    # frame models (one frequency row) use uniform masking: no spatial structure to cluster on
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_mask(4, (1, 64), 50, "auto", g1), sample_mask(4, (1, 64), 50, "uniform", g2))


def test_heads_are_sized_from_the_patch_area(cfg):
    model = SSASTModel(ASTEncoder(cfg), SSASTConfig())
    assert model.cpredlayer[2].out_features == 256 and model.gpredlayer[2].out_features == 256
    frame = cfg.replace(fshape=64, tshape=2, fstride=64, tstride=2)
    model = SSASTModel(ASTEncoder(frame), SSASTConfig())
    assert model.cpredlayer[2].out_features == 128 and model.mask_count == round(0.78125 * 64)


def test_mask_embedding_replaces_patches_before_positions(cfg):
    torch.manual_seed(0)
    model = SSASTModel(ASTEncoder(cfg), SSASTConfig()).eval()
    x = torch.randn(2, 128, 64)
    idx = torch.tensor([[0, 5, 9], [1, 2, 31]])
    hidden = model.encode_masked(x, idx)
    tokens = model.encoder.embed_patches(x)
    for b in range(2):
        tokens[b, idx[b]] = model.mask_embed[0, 0]
    ref = model.encoder.forward_tokens(tokens)[:, 2:]
    assert torch.allclose(hidden, torch.stack([ref[b, idx[b]] for b in range(2)]), atol=1e-6)
    # the content of masked patches never enters the encoder; that of the others does
    x_masked = x.clone()
    x_masked[0, 80:96, 0:16] += 5.0  # patch f=0, t=5 -> id 5, masked in clip 0
    assert torch.allclose(model.encode_masked(x_masked, idx), hidden, atol=1e-6)
    x_visible = x.clone()
    x_visible[0, 80:96, 16:32] += 5.0  # patch f=1, t=5 -> id 13, visible
    assert not torch.allclose(model.encode_masked(x_visible, idx), hidden, atol=1e-3)


def test_the_two_objectives_passes_batched_equal_separate_passes(cfg):
    """One encoder pass over both masks' copies of the batch gives what two passes give, output and gradient."""
    torch.manual_seed(0)
    model = SSASTModel(ASTEncoder(cfg), SSASTConfig())
    x = torch.randn(3, 128, 64)
    g = torch.Generator().manual_seed(1)
    idx_c, idx_g = model.sample_mask(3, g, x.device), model.sample_mask(3, g, x.device)
    batched = model.encode_masked(x, idx_c, idx_g)
    separate = (model.encode_masked(x, idx_c), model.encode_masked(x, idx_g))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(batched, separate))
    grads = []
    for hidden in (batched, separate):
        model.zero_grad()
        (hidden[0].square().mean() + hidden[1].mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4) for n in grads[0])
    # the joint loss draws its two masks in the same order from the generator as before
    out = model(x, torch.Generator().manual_seed(1))
    nce, _ = model.mpc(separate[0], model.encoder.unfold_patches(x).gather(
        1, idx_c.unsqueeze(-1).expand(-1, -1, cfg.patch_area)))
    assert torch.allclose(out["nce"], nce, atol=1e-5)


def test_nce_softmax_dimension_and_accuracy(cfg):
    model = SSASTModel(ASTEncoder(cfg), SSASTConfig(nce_softmax="targets"))
    hidden, targets = torch.randn(3, 5, 32), torch.randn(3, 5, 256)
    nce_t, acc = model.mpc(hidden, targets)
    logits = targets @ model.cpredlayer(hidden).transpose(1, 2)
    by_targets = -torch.stack([torch.diagonal(F.log_softmax(lg, dim=0)) for lg in logits]).mean()
    by_preds = -torch.stack([torch.diagonal(F.log_softmax(lg, dim=1)) for lg in logits]).mean()
    assert torch.allclose(nce_t, by_targets, atol=1e-5)
    model.cfg = SSASTConfig(nce_softmax="predictions")  # the official code's choice
    nce_p, acc_p = model.mpc(hidden, targets)
    assert torch.allclose(nce_p, by_preds, atol=1e-5) and not torch.allclose(nce_p, nce_t)
    expected = torch.stack([(lg.argmax(dim=0) == torch.arange(5)).float().mean() for lg in logits]).mean()
    assert acc == pytest.approx(expected.item())
    # the official accuracy with its softmax: argmax(softmax(total, dim=-1), dim=0), total = targets x predictions
    official = torch.stack([(F.softmax(lg, dim=-1).argmax(dim=0) == torch.arange(5)).float().mean() for lg in logits])
    assert acc_p == pytest.approx(official.mean().item())


def test_the_official_accuracy_differs_from_the_raw_argmax_where_rows_are_scaled_apart(cfg):
    """Targets of very different norms: the raw logits' argmax over targets picks the loudest target for every
    prediction; the official accuracy, normalising each target's row over the predictions first, does not."""
    torch.manual_seed(0)
    model = SSASTModel(ASTEncoder(cfg), SSASTConfig(nce_softmax="predictions"))
    hidden = torch.randn(1, 6, 32)
    pred = model.cpredlayer(hidden).detach()
    targets = (pred + 0.01 * torch.randn_like(pred)) * torch.tensor([8.0, 1, 1, 1, 1, 1]).view(1, 6, 1)
    _, acc = model.mpc(hidden, targets)
    raw = (targets @ pred.transpose(1, 2)).argmax(dim=1)
    assert (raw == 0).float().mean() > 0.5  # the loud target wins most predictions' raw argmax
    assert acc.item() > (raw[0] == torch.arange(6)).float().mean().item()


def test_joint_loss_and_gradients(cfg):
    torch.manual_seed(0)
    model = SSASTModel(ASTEncoder(cfg), SSASTConfig())
    out = model(torch.randn(8, 128, 64) * 0.5, torch.Generator().manual_seed(0))
    assert out["loss"].item() == pytest.approx((out["nce"] + 10 * out["mse"]).item(), rel=1e-6)
    assert 0 <= out["acc"].item() <= 1 and math.isfinite(out["nce"].item())
    out["loss"].backward()
    assert model.mask_embed.grad.abs().sum() > 0 and model.encoder.pos_embed.grad.abs().sum() > 0
    assert model.cpredlayer[2].weight.grad.abs().sum() > 0 and model.gpredlayer[2].weight.grad.abs().sum() > 0


def test_each_objective_is_scored_against_the_patches_under_its_own_mask(cfg):
    """With two masks, the generative MSE compares each MPG prediction with the patch at its own (second mask's)
    position, and the InfoNCE with the first mask's: patches zero under the MPG mask and a head that predicts
    zeros give an MSE of 0, which the other mask's (non-zero) patches would not."""
    torch.manual_seed(0)
    model = SSASTModel(ASTEncoder(cfg), SSASTConfig())
    torch.nn.init.zeros_(model.gpredlayer[2].weight)  # every MPG prediction is 0
    torch.nn.init.zeros_(model.gpredlayer[2].bias)
    idx = torch.tensor([[0, 1, 2, 3], [8, 9, 10, 11]])  # 4 x 8 grid, frequency-major: patch (f, t) = 8 f + t
    idx_g = torch.tensor([[4, 5, 6, 7], [12, 13, 14, 15]])
    x = torch.randn(2, 128, 64) + 3.0
    grid = x.view(2, 8, 16, 4, 16)  # [B, t, 16 frames, f, 16 bins]
    grid[0, 4:, :, 0] = 0.0  # clip 0: patches 4..7 (f 0, t 4..7)
    grid[1, 4:, :, 1] = 0.0  # clip 1: patches 12..15 (f 1, t 4..7)
    patches = model.encoder.unfold_patches(x)
    assert patches[0, 4:8].abs().sum() == 0 and patches[1, 12:16].abs().sum() == 0
    assert (patches[0, :4].abs() > 0).all()
    out = model(x, masks=[idx, idx_g])
    assert out["mse"].item() == 0.0
    # the masks the other way round: the MPG mask covers audio, whose squares the MSE averages
    swapped = model(x, masks=[idx_g, idx])
    under = torch.stack([patches[b, idx[b]] for b in range(2)])
    assert swapped["mse"].item() == pytest.approx(under.square().mean().item(), rel=1e-5)


def test_separate_passes_cost_one_more_encoder_pass(cfg):
    """The second objective's pass costs the encoder's blocks again; the patch embedding is computed once and
    shared by the two passes (``encode_masked``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from common.models.flops import encoder_train_flops

    one = SSASTObjective(SSASTConfig(separate_passes=False)).flops_per_sample(cfg)
    two = SSASTObjective(SSASTConfig()).flops_per_sample(cfg)
    with FlopCounterMode(display=False) as counter:  # the patch embedding of one clip, forward + backward
        ASTEncoder(cfg).embed_patches(torch.randn(1, cfg.input_tdim, cfg.num_mel_bins)).sum().backward()
    assert (two - one) == pytest.approx(encoder_train_flops(cfg) - counter.get_total_flops(), rel=0.05)


def test_heads_follow_a_patch_shape_change(cfg, caplog):
    model = SSASTModel(ASTEncoder(cfg), SSASTConfig())
    coarse = Compression("patch", 4).encoder_config(cfg)  # 16 x 64 patches
    with caplog.at_level("INFO"):
        state = adapt_heads(model.state_dict(), cfg, coarse)
    # one line per head, named as the head (not as a patch kernel, which a patch recipe resizes its own way)
    assert [r.getMessage() for r in caplog.records] == [
        f"resized {head}'s outputs (one per patch cell) 16x16 -> 16x64 (bilinear, whatever patch_transfer is)"
        for head in ("cpredlayer", "gpredlayer")]
    assert state["cpredlayer.2.weight"].shape == (16 * 64, 32) and state["gpredlayer.2.bias"].shape == (1024,)
    new = SSASTModel(ASTEncoder(coarse), SSASTConfig())
    new.load_state_dict({k: v for k, v in state.items() if not k.startswith("encoder.")}, strict=False)
    # a new prediction is the old prediction resized like a patch image
    h = torch.randn(4, 32)
    old_pred = model.gpredlayer(h).reshape(4, 1, 16, 16)
    ref = F.interpolate(old_pred, size=(16, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(new.gpredlayer(h).reshape(4, 1, 16, 64), ref, atol=1e-5)
    assert adapt_heads(state, coarse, coarse) is state


def test_heads_follow_the_patch_phases_change_to_full_resolution(cfg):
    """The way every patch schedule goes at its phase change, 16x64 -> 16x16 (not square to square, where the
    patch's two axes cannot be confused): each head's prediction is the old one shrunk like a patch image."""
    torch.manual_seed(0)
    coarse = Compression("patch", 4).encoder_config(cfg)
    model = SSASTModel(ASTEncoder(coarse), SSASTConfig())
    state = adapt_heads(model.state_dict(), coarse, cfg)
    assert state["cpredlayer.2.weight"].shape == (16 * 16, 32) and state["gpredlayer.2.bias"].shape == (256,)
    new = SSASTModel(ASTEncoder(cfg), SSASTConfig())
    new.load_state_dict({k: v for k, v in state.items() if not k.startswith("encoder.")}, strict=False)
    h = torch.randn(4, 32)
    for head in ("cpredlayer", "gpredlayer"):
        old_pred = getattr(model, head)(h).reshape(4, 1, 16, 64)
        ref = F.interpolate(old_pred, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        assert torch.allclose(getattr(new, head)(h).reshape(4, 1, 16, 16), ref, atol=1e-5), head


def test_infonce_logits_softmax_and_accuracy_are_fp32_under_autocast(cfg):
    """CUDA / CPU autocast would compute the M x M logits of ``.float()`` tensors in bf16 (issue 10 item 6)."""
    model = SSASTModel(ASTEncoder(cfg), SSASTConfig())
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 100, cfg.embed_dim, generator=g)
    targets = 0.5 * torch.randn(2, 100, cfg.patch_area, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred, gen = model.cpredlayer(hidden), model.gpredlayer(hidden)  # the heads do run under autocast
        logits = model.mpc_logits(hidden, targets)
        nce, acc = model.mpc(hidden, targets)
        mse = model.mpg(hidden, targets)
    assert pred.dtype == torch.bfloat16
    assert logits.dtype == nce.dtype == acc.dtype == mse.dtype == torch.float32
    expected = targets @ pred.float().transpose(1, 2)  # fp32 products of the same head outputs
    assert torch.allclose(logits, expected, rtol=1e-6, atol=1e-5)
    lowp = (targets.bfloat16() @ pred.transpose(1, 2)).float()
    assert (lowp - expected).abs().max() > 1e-2  # what bf16 logits would have been: visibly off
    expected_nce = -torch.diagonal(F.log_softmax(expected, dim=1), dim1=1, dim2=2).mean()
    assert nce.item() == pytest.approx(expected_nce.item(), abs=1e-5)
    assert acc.item() == (expected.argmax(dim=1) == torch.arange(100)).float().mean().item()
    assert mse.item() == pytest.approx(F.mse_loss(gen.float(), targets).item(), rel=1e-6)


@pytest.mark.parametrize("eval_ratio, masked", [(400 / 512, 25), (None, 16)])
def test_the_validation_masks_400_of_512_whatever_the_training_mask(cfg, eval_ratio, masked):
    """The official ``validatemask`` always masks 400 patches (of 512), so the masked-patch accuracy keeps its scale
    (chance 1 / 400) when a run trains with another mask: here 25 of the 4 x 8 grid while training masks 16;
    ``eval_mask_ratio: null`` validates with the training mask."""
    from common.data.clips import Batch
    from common.system.distributed import Dist

    ssast = SSASTConfig(mask_ratio=0.5, eval_mask_ratio=eval_ratio)
    model = SSASTModel(ASTEncoder(cfg), ssast)
    seen = []
    real = model.forward

    def forward(x, generator=None, masks=None):
        seen.append([m.shape[1] for m in masks])
        return real(x, generator, masks=masks)

    model.forward = forward
    x = torch.randn(3, cfg.input_tdim, cfg.num_mel_bins)
    batch = Batch(torch.zeros(3, 16), torch.full((3,), 16), None, ["a", "b", "c"])
    metrics = SSASTObjective(ssast).evaluate(model, iter([batch]), lambda w, n: x, Dist(0, 1, 0, torch.device("cpu")),
                                             torch.Generator().manual_seed(0))
    assert seen == [[masked, masked]] and model.mask_count == 16 and 0 <= metrics["acc"] <= 1
    assert SSASTObjective(ssast).score_settings(cfg)["masked"] == masked


def _scored(clips: list[int], sizes: list[int], dist=None, seed: int = 7) -> dict:
    """SSAST's validation metrics of one tiny model (the same weights in every process) over clips ``clips`` of six,
    in batches of ``sizes`` clips, on ``dist``'s ranks (None: this process alone)."""
    from common.data.clips import Batch
    from common.system.distributed import Dist

    cfg = EncoderConfig(embed_dim=32, depth=2, num_heads=2, num_mel_bins=64, input_tdim=128, fshape=16, tshape=16,
                        fstride=16, tstride=16)
    torch.manual_seed(0)
    ssast = SSASTConfig(mask_ratio=0.5)
    model = SSASTModel(ASTEncoder(cfg), ssast).eval()
    x = torch.randn(6, cfg.input_tdim, cfg.num_mel_bins)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    batches = [Batch(torch.tensor(clips[a:a + n], dtype=torch.float32)[:, None], torch.ones(n), None,
                     [f"clip{i}" for i in clips[a:a + n]]) for a, n in zip(starts, sizes)]
    features = lambda w, n: x[w[:, 0].long()]  # noqa: E731 (each clip's features by its number)
    with torch.no_grad():
        return SSASTObjective(ssast).evaluate(model, iter(batches), features,
                                              dist or Dist(0, 1, 0, torch.device("cpu")),
                                              torch.Generator().manual_seed(seed))


def test_the_validation_score_does_not_depend_on_how_the_clips_are_batched():
    """Validation masks were drawn a batch at a time from one seed: a clip's mask depended on the clips before it in
    its batch, so the same weights scored 0.18-0.24 masked-patch accuracy at eval batch sizes 12 to 1, and a run on
    2 ranks scored otherwise than on one. Each clip's masks are its own (the run seed and its id)."""
    clips = list(range(6))
    whole = _scored(clips, [6])
    for sizes in ([4, 2], [1] * 6, [3, 3]):
        for key in ("acc", "nce", "mse"):
            assert _scored(clips, sizes)[key] == pytest.approx(whole[key], rel=1e-5), (sizes, key)
    assert _scored(clips, [6], seed=8)["nce"] != whole["nce"]  # another run seed: other masks


def _rank_share(dist) -> dict:
    """A rank's share of the six clips (every ``world_size``-th), scored a clip at a time; the metrics of all."""
    share = list(range(dist.rank, 6, dist.world_size))
    return _scored(share, [1] * len(share), dist)


@pytest.mark.parametrize("world", [2, 3])
def test_validation_on_several_ranks_scores_as_one_process(tmp_path, world):
    """Every rank scores its own clips and the sums are reduced: 2 and 3 gloo ranks give one process's scores."""
    from tests.ranks import spawn_ranks

    whole = _scored(list(range(6)), [6])
    for metrics in spawn_ranks(_rank_share, world, tmp_path):
        for key in ("acc", "nce", "mse"):
            assert metrics[key] == pytest.approx(whole[key], rel=1e-5), key


def test_a_run_recorded_before_the_validation_mask_key_resumes_unless_it_validates_otherwise_now():
    """A recipe.yaml written before ``ssast.eval_mask_ratio`` existed validated with the training mask: the same as
    today's 400 / 512 when it trained with 400 / 512 (the run resumes), not when it trained with another."""
    from common.training.run_recipe import recipe_diff

    old = {"ssast": {"mask_ratio": 0.78125}}
    assert recipe_diff(old, {"ssast": {"mask_ratio": 0.78125, "eval_mask_ratio": 0.78125}}) == []
    assert recipe_diff(old, {"ssast": {"mask_ratio": 0.78125, "eval_mask_ratio": None}}) == []
    assert recipe_diff({"ssast": {"mask_ratio": 0.5}},
                       {"ssast": {"mask_ratio": 0.5, "eval_mask_ratio": 0.78125}}) == ["ssast.eval_mask_ratio"]
