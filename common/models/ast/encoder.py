"""The audio spectrogram transformer encoder shared by pretraining and fine-tuning.

Structure as AST / SSAST (their ``src/models/ast_models.py``): a Conv2d patch embedding over the
``[1, F, T]`` spectrogram, prefix tokens (cls + dist by default), a learned positional embedding, timm
transformer blocks (fused scaled-dot-product attention, LayerNorm eps 1e-6) and a final norm.

Token order is frequency-major, ``index = f * t_dim + t``, with frequency row 0 holding the lowest mel
bins, as in SSAST. The token grid is derived from the config, never written down twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from common.config.recipe import build

__all__ = ["EncoderConfig", "MODEL_SIZES", "POOLINGS", "encoder_config", "ASTEncoder", "check_pooling", "pool_tokens",
           "count_parameters"]

# SSAST's sizes (DeiT tiny / small / base: 12 blocks each).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


@dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to rebuild an :class:`ASTEncoder` (stored in every checkpoint).

    Args:
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        num_mel_bins: F, the frequency size of the input.
        input_tdim: T, the number of input frames the positional embedding is laid out for.
        fshape, tshape: patch (kernel) size along frequency and time.
        fstride, tstride: patch stride along frequency and time (equal to the shape: no overlap).
        num_prefix_tokens: 2 (cls + dist, as SSAST/AST and the Hugging Face AST format), 1 or 0.
        drop_path_rate: stochastic depth at the last block (linearly increasing), 0 in SSAST/AST.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_mel_bins: int = 128
    input_tdim: int = 1024
    fshape: int = 16
    tshape: int = 16
    fstride: int = 16
    tstride: int = 16
    num_prefix_tokens: int = 2
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "num_mel_bins", "input_tdim", "fshape", "tshape",
                     "fstride", "tstride"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EncoderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_prefix_tokens not in (0, 1, 2):
            raise ValueError(f"num_prefix_tokens must be 0, 1 or 2, got {self.num_prefix_tokens}")
        if self.fshape > self.num_mel_bins:
            raise ValueError(f"patch height fshape={self.fshape} exceeds num_mel_bins={self.num_mel_bins}")
        if self.tshape > self.input_tdim:
            raise ValueError(
                f"patch width tshape={self.tshape} exceeds the input length input_tdim={self.input_tdim} frames"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(f_dim, t_dim)``: what a Conv2d with this kernel and stride makes of ``[F, T]``."""
        return (
            (self.num_mel_bins - self.fshape) // self.fstride + 1,
            (self.input_tdim - self.tshape) // self.tstride + 1,
        )

    @property
    def num_patches(self) -> int:
        """Patch tokens per clip: ``f_dim * t_dim`` of :attr:`grid`."""
        f_dim, t_dim = self.grid
        return f_dim * t_dim

    @property
    def num_tokens(self) -> int:
        """Tokens the transformer sees: the prefix tokens and the patch tokens."""
        return self.num_prefix_tokens + self.num_patches

    @property
    def patch_area(self) -> int:
        """Spectrogram cells per patch: the size of a patch's raw target in SSAST pretraining."""
        return self.fshape * self.tshape

    def replace(self, **changes) -> "EncoderConfig":
        """A copy with ``changes`` (field names), validated as a new config."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as plain data (an export's ``encoder_config``; :meth:`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, prefix: str = "encoder_config") -> "EncoderConfig":
        """Build and validate a config from plain data (an export's metadata, a record); an unknown or ill-typed
        key is an error naming it (``encoder_config.depth: expected an integer, got 'four'``).

        Raises:
            RecipeError: (a ValueError) the key in full, under ``prefix``.
        """
        return build(cls, data, prefix)


def encoder_config(size: str = "base", **overrides) -> EncoderConfig:
    """Config for a named size (``tiny`` / ``small`` / ``base``) or ``custom`` (all sizes in overrides)."""
    if size == "custom":
        missing = [k for k in ("embed_dim", "depth", "num_heads") if k not in overrides]
        if missing:
            raise ValueError(f"model size 'custom' needs {', '.join(missing)}")
        return EncoderConfig(**overrides)
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)} or 'custom'")
    return EncoderConfig(**{**MODEL_SIZES[size], **overrides})


class PatchEmbed(nn.Module):
    """Conv2d patch embedding of a ``[B, 1, F, T]`` spectrogram (any kernel, any stride)."""
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.embed_dim, kernel_size=(cfg.fshape, cfg.tshape),
                              stride=(cfg.fstride, cfg.tstride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d f t -> b (f t) d")


class ASTEncoder(nn.Module):
    """Audio spectrogram transformer encoder.

    Input: normalised fbank ``[B, T, F]`` with ``T = cfg.input_tdim`` and ``F = cfg.num_mel_bins``.
    Output of :meth:`forward_features`: every token after the final norm, prefix tokens first,
    ``[B, num_prefix_tokens + N, D]``.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()

        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.prefix_tokens = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens + cfg.num_patches, cfg.embed_dim))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        dpr = [cfg.drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                  drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(cfg.depth)
        )
        self.norm = norm_layer(cfg.embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SSAST/DeiT initialisation: trunc-normal(0.02) tokens and linears, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.prefix_tokens, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix tokens before the patch tokens: 2 (AST, SSAST: cls and dist), 1 or 0."""
        return self.cfg.num_prefix_tokens

    def check_input(self, x: torch.Tensor) -> None:
        """Accept ``[B, T, F]`` whose token grid is this encoder's (T may exceed ``input_tdim`` by frames
        that no patch covers, as AST's 1024 frames at stride 10, whose last 8 frames are unused)."""
        cfg = self.cfg
        if x.dim() != 3:  # a rank no resize mends: say which axis is missing or too many
            hint = {2: "add the batch axis, x[None]", 4: "drop the channel axis, x[:, 0] of [B, 1, T, F]"}.get(
                x.dim(), "pass one fbank per clip")
            raise ValueError(f"ASTEncoder expects a batch of fbanks [B, T, F] (3 dims), got {x.dim()} dims "
                             f"{tuple(x.shape)}: {hint}")
        ok = x.shape[2] == cfg.num_mel_bins and x.shape[1] >= cfg.tshape and (
            (x.shape[1] - cfg.tshape) // cfg.tstride + 1 == cfg.grid[1])
        if not ok:
            raise ValueError(
                f"ASTEncoder expects fbank [B, T={cfg.input_tdim}, F={cfg.num_mel_bins}], got {tuple(x.shape)}; "
                f"resize the encoder to the new input with common.models.ast.resize.adapt_encoder"
            )

    def unfold_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Raw spectrogram patches ``[B, N, fshape * tshape]`` in token order, cells frequency-major
        (the Conv2d weight layout): SSAST's pretraining targets."""
        self.check_input(x)
        cfg = self.cfg
        patches = F.unfold(rearrange(x, "b t f -> b 1 f t"), kernel_size=(cfg.fshape, cfg.tshape),
                           stride=(cfg.fstride, cfg.tstride))  # [B, fshape * tshape, N]
        return rearrange(patches, "b cells n -> b n cells")

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B, N, D]`` (no prefix tokens, no positions) of an fbank ``[B, T, F]``."""
        self.check_input(x)
        return self.patch_embed(rearrange(x, "b t f -> b 1 f t"))

    def forward_tokens(self, tokens: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Prefix tokens + positions + blocks + final norm on patch tokens ``[B, N, D]``.

        Args:
            tokens: patch tokens, possibly with some replaced by a mask embedding.
            layer: stop after this block (1-based; negative counts from the end) and return its
                output without the final norm; ``None`` runs every block and the final norm.
        """
        batch = tokens.shape[0]
        x = torch.cat([self.prefix_tokens.expand(batch, -1, -1), tokens], dim=1) + self.pos_embed
        depth = len(self.blocks)
        stop = depth if layer is None else (layer if layer > 0 else depth + 1 + layer)
        if not 1 <= stop <= depth:
            raise ValueError(f"layer must be in 1..{depth} or -{depth}..-1, got {layer}")
        for block in self.blocks[:stop]:
            x = block(x)
        return self.norm(x) if layer is None else x

    def forward_features(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Every token ``[B, num_prefix_tokens + N, D]`` of a normalised fbank ``[B, T, F]``."""
        return self.forward_tokens(self.embed_patches(x), layer=layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_features`: every token ``[B, num_prefix_tokens + N, D]`` of a normalised fbank
        ``[B, T, F]``."""
        return self.forward_features(x)

    def extra_repr(self) -> str:
        f_dim, t_dim = self.cfg.grid
        return f"grid={f_dim}x{t_dim}, tokens={self.cfg.num_patches}+{self.cfg.num_prefix_tokens}"


POOLINGS = ("mean", "prefix")


def check_pooling(pool: str, num_prefix_tokens: int) -> None:
    """Raise ``ValueError`` if ``pool`` is unknown or cannot pool an encoder with ``num_prefix_tokens``."""
    if pool not in POOLINGS:
        raise ValueError(f"unknown pooling {pool!r}; choose one of {list(POOLINGS)}")
    if pool == "prefix" and num_prefix_tokens == 0:
        raise ValueError("prefix pooling needs prefix tokens; this encoder has none")


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pool: str) -> torch.Tensor:
    """One vector per clip from :meth:`ASTEncoder.forward_features` tokens ``[B, P + N, D]`` -> ``[B, D]``.

    Args:
        tokens: prefix tokens first, then the patch tokens.
        num_prefix_tokens: P.
        pool: ``mean`` over the patch tokens (SSAST's ``ft_avgtok``) or over the ``prefix`` tokens (AST:
            ``(cls + dist) / 2``).
    """
    check_pooling(pool, num_prefix_tokens)
    return tokens[:, num_prefix_tokens:].mean(1) if pool == "mean" else tokens[:, :num_prefix_tokens].mean(1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

