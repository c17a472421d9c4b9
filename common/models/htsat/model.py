"""The HTS-AT model: per-mel BatchNorm, the fold into an image, a timm Swin and the token-semantic head.

Structure as the official ``HTSAT_Swin_Transformer`` (RetroCirce/HTS-Audio-Transformer
``model/htsat.py``), for any phase :class:`~common.models.htsat.geometry.Geometry`::

    log-mel [B, 1|2, T, F] --bn0 (per mel bin)--> --SpecAugment stripes (keep plane)--> --mixup (optional)-->
      --bicubic stretch to the phase's frames--> --avg/max pool (pool phases)--> --fold--> image [B, 1, H, W]
      --timm SwinTransformer (patch embed + LN, 4 stages, final LN)--> tokens [B, h, w, D]
      --unfold--> [B, D, f, t] --tscam_conv (f x 3)--> [B, K, t] --mean over t--> clipwise logits [B, K]

The backbone is timm's ``SwinTransformer`` (no absolute position embedding, non-fused attention by
default), which the reference found bit-identical to the official backbone after one key rename
(:mod:`common.models.htsat.official`). The official model also builds a ``head = Linear(K, K)`` that its
token-semantic path never calls; it is not built here (official checkpoints' ``head.*`` are dropped).

Outputs are **logits** (before the sigmoid the official ``clip_bce`` model applies, or the softmax of
a cross-entropy loss): ``clipwise_output`` ``[B, K]``, ``framewise_output`` ``[B, frames, K]`` (the
per-step logits repeated over the image frames they cover, 1024 at full resolution, as the official
``interpolate``) and ``latent_output`` ``[B, D]`` (the mean of the last-stage tokens).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from timm.models.swin_transformer import SwinTransformer
from torch import nn
from torch.nn import functional as F

from common.models.heads import scored_head
from common.models.htsat.config import HTSATConfig
from common.models.htsat.geometry import Geometry, geometry

__all__ = ["HTSAT", "HEAD_PREFIXES", "fold", "unfold"]

# The class-specific weights: dropped when fine-tuning on other classes (the official ESC-50 recipe pops
# ``tscam_conv`` and the unused ``head`` from the AudioSet checkpoint: ``main.py`` under ``esc_config.py``).
HEAD_PREFIXES = ("tscam_conv.",)


def fold(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """Stack ``chunks`` consecutive time chunks along frequency: ``[B, C, T, F] -> [B, C, chunks * F, T / chunks]``.

    Image row ``k * F + f`` holds mel bin ``f`` of chunk ``k``; column ``t`` is frame ``k * T / chunks + t``.
    """
    return rearrange(x, "b c (k t) f -> b c (k f) t", k=chunks)


def unfold(tokens: torch.Tensor, chunks: int) -> torch.Tensor:
    """Undo the fold on the last-stage tokens: ``[B, h, w, D] -> [B, D, h / chunks, chunks * w]``.

    Rows ``k * (h / chunks) + f`` of chunk ``k`` become frequency row ``f``; time runs chunk by chunk.
    """
    return rearrange(tokens, "b (k f) t d -> b d f (k t)", k=chunks)


class HTSAT(nn.Module):
    """HTS-AT for one phase geometry.

    Args:
        cfg: the model configuration.
        geom: the phase's input geometry (:func:`common.models.htsat.geometry.geometry`); default full resolution.
    """
    def __init__(self, cfg: HTSATConfig, geom: Geometry | None = None) -> None:
        super().__init__()

        self.cfg = cfg
        self.geom = geom if geom is not None else geometry(cfg)
        self.bn0 = nn.BatchNorm2d(cfg.mel_bins)
        self.swin = SwinTransformer(
            img_size=self.geom.image, patch_size=self.geom.patch, in_chans=1, num_classes=0, global_pool="",
            embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads, window_size=cfg.window_size,
            mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_drop_rate=cfg.drop_rate,
            attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate,
        )
        self.pos_drop = nn.Dropout(cfg.drop_rate)  # the official one after the patch embedding (timm's Swin has none)
        self.freq_rows = cfg.mel_bins // (self.geom.patch[0] * 2 ** (cfg.num_stages - 1))
        self.tscam_conv = nn.Conv2d(cfg.num_features, cfg.num_classes, kernel_size=(self.freq_rows, 3),
                                    padding=(0, 1))

    @property
    def frames_per_step(self) -> int:
        """Image frames one output time step covers (32 at full resolution)."""
        return self.geom.patch[1] * 2 ** (self.cfg.num_stages - 1)

    def to_image(self, x: torch.Tensor, mixup_lambda: torch.Tensor | None = None) -> torch.Tensor:
        """Model input ``[B, 1|2, T, F]`` (or ``[B, T, F]``) -> Swin image ``[B, 1, H, W]``.

        Args:
            x: log-mel in dB, optionally with the front end's keep mask as a second plane.
            mixup_lambda: optional ``[B]`` weights: clip ``i`` becomes ``lam_i x_i + (1 - lam_i) x_{B-1-i}``
                after SpecAugment, as the official ``do_mixup`` (targets are left to the caller).
        """
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] not in (1, 2) or x.shape[-1] != self.cfg.mel_bins:
            raise ValueError(f"HTS-AT expects input [B, 1 or 2, T, {self.cfg.mel_bins}], got {tuple(x.shape)}")
        keep = x[:, 1:] if x.shape[1] == 2 else None
        x = x[:, :1]
        if x.shape[2] > self.geom.stretch_frames:
            raise ValueError(f"HTS-AT input has {x.shape[2]} frames, more than the {self.geom.stretch_frames} "
                             f"this phase's image holds ({self.geom.describe()})")
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # normalise each mel bin: [B, 1, T, F]
        if keep is not None:
            x = torch.where(keep > 0.5, x, torch.zeros_like(x))
        if mixup_lambda is not None:
            lam = mixup_lambda.to(x.dtype)[:, None, None, None]
            x = x * lam + x.flip(0) * (1 - lam)
        if x.shape[2] < self.geom.stretch_frames:
            x = F.interpolate(x, (self.geom.stretch_frames, x.shape[3]), mode="bicubic", align_corners=True)
        if self.geom.pool != "none":
            pool = F.avg_pool2d if self.geom.pool == "avg" else F.max_pool2d
            x = pool(x, kernel_size=(self.geom.pool_factor, 1))
        return fold(x, self.geom.chunks)

    def tokens(self, image: torch.Tensor) -> torch.Tensor:
        """The Swin's last-stage tokens ``[B, h, w, D]`` of an image ``[B, 1, H, W]``, after its final norm (timm's
        ``forward_features`` with the official dropout after the patch embedding)."""
        swin = self.swin
        return swin.norm(swin.layers(self.pos_drop(swin.patch_embed(image))))

    def forward_image(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Swin + token-semantic head on an image ``[B, 1, H, W]``; see the module docstring for the outputs."""
        tokens = self.tokens(image)  # [B, h, w, D]
        x = unfold(tokens, self.geom.chunks)  # [B, D, f, t]
        latent = x.flatten(2).mean(dim=2)  # [B, D]
        steps = scored_head(self.tscam_conv, x, self.training).flatten(2)  # [B, K, 1, t] -> [B, K, t]; fp32 in eval
        return {
            "clipwise_output": steps.mean(dim=2),
            "framewise_output": repeat(steps, "b k t -> b (t r) k", r=self.frames_per_step),
            "latent_output": latent,
        }

    def forward(self, x: torch.Tensor, mixup_lambda: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Model input (see :meth:`to_image`) -> ``clipwise_output`` / ``framewise_output`` logits and latent."""
        return self.forward_image(self.to_image(x, mixup_lambda))
