"""Task heads score in float32 in evaluation whatever the autocast around the model (bf16 logits tie a
validation set's scores and move its mAP); training keeps the autocast."""

import torch

from common.audio.compression import Compression
from common.models.ast.arch import Classifier
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.htsat import HTSAT, HTSATConfig, HTSATFrontEnd, geometry
from tests.helpers import real_looking_signals


def _dtypes(model: torch.nn.Module, x: torch.Tensor, out=lambda y: y) -> tuple[torch.dtype, torch.dtype]:
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        return out(model.eval()(x)).dtype, out(model.train()(x)).dtype


def test_an_ast_classifier_scores_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = Classifier(ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, num_mel_bins=32, input_tdim=32,
                                                fshape=8, tshape=8, fstride=8, tstride=8)), 50, "mean")
    x = torch.randn(64, 32, 32)
    assert _dtypes(model, x) == (torch.float32, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        scores = model.eval()(x)
        pooled = model.embedding(x)
    assert torch.equal(scores, model.head(pooled.float()))  # the head itself in float32
    assert scores.unique().numel() == scores.numel()  # no ties from bf16 rounding


def test_htsats_token_semantic_head_scores_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    cfg = HTSATConfig(sample_rate=16000, clip_samples=20320, n_fft=512, hop_length=160, mel_bins=32, fmax=8000,
                      spec_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], window_size=4,
                      num_classes=5)
    geom = geometry(cfg, Compression())
    x = HTSATFrontEnd(cfg, geom)(real_looking_signals(2, 1.27, 16000))
    assert _dtypes(HTSAT(cfg, geom), x, lambda y: y["clipwise_output"]) == (torch.float32, torch.bfloat16)


def test_an_ast_classifier_head_starts_as_asts_mlp_head():
    """AST's and SSAST's ``mlp_head`` (LayerNorm, Linear) keeps PyTorch's initialisation: the Linear's weights and
    bias uniform within 1/sqrt(dim) (not a truncated normal with a zero bias)."""
    torch.manual_seed(0)
    encoder = ASTEncoder(EncoderConfig(embed_dim=64, depth=1, num_heads=2, num_mel_bins=32, input_tdim=32,
                                       fshape=8, tshape=8, fstride=8, tstride=8))
    linear = Classifier(encoder, 300, "mean").head[1]
    bound = 64 ** -0.5
    for values in (linear.weight, linear.bias):
        assert values.abs().max() <= bound and values.abs().max() > 0.9 * bound  # uniform over the whole range
        assert values.std().item() > 0.5 * bound / 3 ** 0.5
