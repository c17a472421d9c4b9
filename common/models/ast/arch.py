"""The AST family (AST, SSAST): a ViT over the Kaldi fbank at 16 kHz.

- config and geometry: :class:`~common.models.ast.encoder.EncoderConfig` (patch, stride, input frames, size);
- front end: :class:`~common.audio.pipeline.FeaturePipeline` (fbank at the phase's frame shift, SpecAugment,
  normalisation, SSAST's noise, pooling);
- compression: every method (:meth:`~common.audio.compression.Compression.encoder_config`);
- phase change: the positional embedding and the patch kernel (:mod:`common.models.ast.resize`);
- classifier: pooled tokens -> LayerNorm -> Linear (:class:`Classifier`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from common.audio.compression import Compression
from common.audio.fbank import NormStats, resolve_norm_stats
from common.audio.pipeline import AudioConfig, FeaturePipeline
from common.models.ast.encoder import ASTEncoder, EncoderConfig, check_pooling, pool_tokens
from common.models.ast.resize import adapt_state_dict, load_adapted
from common.models.heads import scored_head

__all__ = ["ASTArch", "Classifier"]


class Classifier(nn.Module):
    """Encoder + pooling + LayerNorm + Linear: fbank ``[B, T, F]`` -> logits ``[B, classes]``.

    Args:
        encoder: the encoder.
        num_classes: outputs.
        pool: ``mean`` of the patch tokens or of the ``prefix`` tokens (:func:`common.models.ast.encoder.pool_tokens`).
    """

    head_prefixes = ("head.",)  # the task head's parameters (``optim.head_lr_scale``)

    def __init__(self, encoder: ASTEncoder, num_classes: int, pool: str = "mean") -> None:
        super().__init__()
        check_pooling(pool, encoder.num_prefix_tokens)
        self.encoder = encoder
        self.pool = pool
        dim = encoder.cfg.embed_dim
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))  # PyTorch's init, as AST's mlp_head

    def embedding(self, x: torch.Tensor, mixup_lambda: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled clip embedding ``[B, D]`` of a normalised fbank ``[B, T, F]``.

        ``mixup_lambda`` (``[B]``) mixes each clip's fbank with its partner in the flipped batch first
        (spectrogram mixup; AST itself mixes waveforms, in the objective).
        """
        if mixup_lambda is not None:
            lam = mixup_lambda.to(x.dtype)[:, None, None]
            x = lam * x + (1 - lam) * x.flip(0)
        return pool_tokens(self.encoder.forward_features(x), self.encoder.num_prefix_tokens, self.pool)

    def forward(self, x: torch.Tensor, mixup_lambda: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, classes]`` of a normalised fbank ``[B, T, F]`` (``mixup_lambda``: see :meth:`embedding`);
        float32 in evaluation whatever the autocast."""
        return scored_head(self.head, self.embedding(x, mixup_lambda), self.training)  # fp32 scores in evaluation


@dataclass(frozen=True)
class ASTArch:
    """The AST family for a run.

    Args:
        base: the full-resolution encoder geometry.
        audio: the full-resolution front end (sample rate, frames, normalisation).
        norm_stats: the statistics ``audio.norm`` resolved to when the model was exported (None: resolve it).
    """

    base: EncoderConfig
    audio: AudioConfig
    norm_stats: NormStats | None = None

    name: ClassVar[str] = "ast"
    channels: ClassVar[str] = "first"  # kaldi.fbank(channel=-1) reads the first channel (AST, SSAST)
    nondeterministic_on_cuda: ClassVar[str] = ""
    normalises_input: ClassVar[bool] = False  # the fbank is normalised with a corpus's mean and std (audio.norm)

    @property
    def sample_rate(self) -> int:
        return self.audio.sample_rate

    @property
    def clip_samples(self) -> int:
        return self.audio.clip_samples

    def geometry(self, compression: Compression) -> EncoderConfig:
        compression.check(self.base)
        return compression.encoder_config(self.base)

    def frontend(self, geometry: EncoderConfig, compression: Compression, specaug) -> FeaturePipeline:
        return FeaturePipeline(self.audio, compression, specaug, norm=self.norm_stats)

    def resolve_pool(self, pool: str, init) -> str:
        """``pool``, or for ``auto`` the pooling of the code the init comes from.

        AST (ImageNet / DeiT weights, official AST checkpoints) pools its prefix tokens, ``(cls + dist) / 2``;
        SSAST (its pretrained checkpoints, this package's pretraining exports) the mean of the patch tokens
        (``ft_avgtok``, for patch and frame models alike); a fine-tuned export keeps its pooling; a model
        from scratch pools as AST. Without prefix tokens the mean of the patch tokens is the only choice.
        """
        prefix = self.base.num_prefix_tokens
        if pool != "auto":
            if pool not in ("mean", "prefix"):
                raise ValueError(f"head.pool: the AST family pools 'mean' or 'prefix' (or 'auto'), got {pool!r}")
            if pool == "prefix" and prefix == 0:
                raise ValueError("head.pool: 'prefix' pooling needs prefix tokens, and this encoder has none")
            return pool
        if prefix == 0:
            return "mean"
        if init is None:
            return "prefix"
        recorded = init.meta.get("classifier")
        if isinstance(recorded, dict) and recorded.get("pool") in ("mean", "prefix"):
            return recorded["pool"]
        return "mean" if init.meta.get("objective") == "ssast" else "prefix"

    def build_encoder(self, geometry: EncoderConfig) -> ASTEncoder:
        return ASTEncoder(geometry)

    def features(self, encoder: ASTEncoder, x: torch.Tensor, pool: str, layer: int | None = None) -> torch.Tensor:
        """The clip embedding ``[B, D]``: block ``layer``'s tokens (default: the last, normed), pooled."""
        return pool_tokens(encoder.forward_features(x, layer), encoder.num_prefix_tokens, pool)

    def build_classifier(self, geometry: EncoderConfig, num_classes: int, pool: str) -> Classifier:
        return Classifier(ASTEncoder(geometry), num_classes, pool)

    def adapt_state(self, state: dict, old: EncoderConfig, new: EncoderConfig, transfer, patch_mode: str,
                    prefix: str = "") -> dict:
        return adapt_state_dict(state, old, new, transfer.pos_embed, patch_mode, prefix)

    def load_weights(self, encoder: ASTEncoder, weights, geometry: EncoderConfig, pos_mode: str,
                     patch_mode: str, table_mode: str = "timm") -> None:  # no relative-position tables
        load_adapted(encoder, weights.state, weights.config, geometry, pos_mode, patch_mode,
                     weights.meta.get("file"))

    def example_input(self, geometry: EncoderConfig, batch: int) -> torch.Tensor:
        return torch.randn(batch, geometry.input_tdim, geometry.num_mel_bins)

    def export_meta(self, geometry: EncoderConfig) -> dict:
        # the statistics by value: a stats file named in audio.norm may change or be absent where the model goes
        stats = self.norm_stats or resolve_norm_stats(self.audio.norm)
        return {"arch": self.name, "audio": asdict(self.audio), "norm_stats": asdict(stats)}

    def export_geometry(self, meta: dict) -> EncoderConfig:
        return EncoderConfig.from_dict(meta["encoder_config"])  # an export's config is its phase's geometry
