"""Adapting grid-dependent weights when the token grid or the patch shape changes.

Used at every phase change (coarse -> fine) and when a checkpoint is loaded for an input of another
length. Two kinds of weights depend on the grid:

- the positional embedding: resampled with timm's ``resample_abs_pos_embed`` (explicit old grid,
  bilinear, prefix rows untouched; antialiased where an axis shrinks, as the authors' FlexiAST resampling,
  so that a coarse position averages all the fine positions it covers, not two of them), or ``cut``: the
  centre of the old grid where the new one is smaller, bilinear along an axis that grows (the rule of
  SSAST's and AST's fine-tuning code for shorter inputs, without SSAST's hard-coded 8 frequency rows and
  its use of the time size in the frequency cut: those bugs are not reproduced);
- the patch-embedding kernel, when the patch shape changes (``patch`` compression): PI-resize (timm's
  ``resample_patch_embed``, bilinear, no antialias, as FlexiViT / FlexiAST) or plain bilinear
  interpolation of the kernel (FlexiAST's "BL").

A stride change needs no weight change. Every function is tensor -> tensor, computes in float32 and
returns the input dtype.
"""

from __future__ import annotations

import logging
import typing
from typing import Literal

import torch
from einops import rearrange
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn
from torch.nn import functional as F

from common.audio.compression import PATCH_MODES, PatchResize
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.fit import load_checked

__all__ = ["PosResize", "PatchResize", "POS_MODES", "PATCH_MODES", "resample_pos_embed", "resample_patch_kernel",
           "adapt_state_dict", "load_adapted", "adapt_encoder"]

log = logging.getLogger(__name__)

PosResize = Literal["bilinear", "cut"]  # how the positional embedding follows a grid change
POS_MODES: tuple[str, ...] = typing.get_args(PosResize)


def _interpolate(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resample a ``[1, P + f*t, D]`` positional embedding from ``old_grid`` to ``new_grid``.

    Args:
        pos_embed: the embedding, prefix rows first, then the grid frequency-major.
        old_grid, new_grid: ``(f_dim, t_dim)``.
        num_prefix_tokens: P, rows kept as they are.
        mode: ``bilinear`` (antialiased when an axis shrinks) or ``cut`` (centre cut where an axis
            shrinks, bilinear where it grows).
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos_embed.dim() != 3 or pos_embed.shape[1] != expected:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not hold {num_prefix_tokens} prefix rows and "
            f"a {old_grid[0]}x{old_grid[1]} grid ({expected} rows)"
        )
    if mode not in POS_MODES:
        raise ValueError(f"unknown positional-embedding resize mode {mode!r}; choose one of {list(POS_MODES)}")
    if old_grid == new_grid:
        return pos_embed
    if mode == "bilinear":

        shrinks = any(n < o for n, o in zip(new_grid, old_grid))  # growing is the same with or without
        out = resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                     num_prefix_tokens=num_prefix_tokens, interpolation="bilinear",
                                     antialias=shrinks)
    else:
        dtype = pos_embed.dtype
        prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:].float()
        grid = rearrange(grid, "1 (f t) d -> 1 d f t", f=old_grid[0], t=old_grid[1])
        for axis, (old, new) in enumerate(zip(old_grid, new_grid)):
            if new < old:  # centre cut, start as SSAST: old // 2 - new // 2
                grid = grid.narrow(2 + axis, old // 2 - new // 2, new)
            elif new > old:
                size = list(grid.shape[-2:])
                size[axis] = new
                grid = _interpolate(grid, tuple(size))
        grid = rearrange(grid, "1 d f t -> 1 (f t) d").to(dtype)
        out = torch.cat([prefix, grid], dim=1)
    log.info("resampled pos_embed %dx%d -> %dx%d (%s)", *old_grid, *new_grid, mode)
    return out


def resample_patch_kernel(weight: torch.Tensor, new_shape: tuple[int, int], mode: str = "pi",
                          what: str | None = "patch kernel") -> torch.Tensor:
    """Resize a patch-embedding kernel ``[D, C, h, w]`` to ``new_shape = (h', w')`` (logged as ``what``; None: not
    logged, the caller says it).

    ``pi``: the pseudo-inverse resize of FlexiViT: token values are kept for patches that are bilinearly
    resized along with the kernel (exactly when the kernel grows, in the least-squares sense when it
    shrinks). ``bilinear``: the kernel is interpolated like an image (antialiased when shrinking).
    """
    if mode not in PATCH_MODES:
        raise ValueError(f"unknown patch-embedding resize mode {mode!r}; choose one of {list(PATCH_MODES)}")
    if weight.dim() != 4:
        raise ValueError(f"patch-embedding kernel must be [D, C, h, w], got {tuple(weight.shape)}")
    old_shape = tuple(weight.shape[-2:])
    new_shape = tuple(new_shape)
    if old_shape == new_shape:
        return weight
    if mode == "pi":

        out = resample_patch_embed(weight, list(new_shape), interpolation="bilinear", antialias=False)
    else:
        out = F.interpolate(weight.float(), size=new_shape, mode="bilinear", align_corners=False,
                            antialias=True).to(weight.dtype)
    if what is not None:
        log.info("resized %s %dx%d -> %dx%d (%s)", what, *old_shape, *new_shape, mode)
    return out


def adapt_state_dict(
    state: dict[str, torch.Tensor],
    old: EncoderConfig,
    new: EncoderConfig,
    pos_mode: str = "bilinear",
    patch_mode: str = "pi",
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Return a copy of an encoder state dict laid out for ``new`` instead of ``old``.

    Args:
        state: the state dict (keys of :class:`ASTEncoder`, optionally under ``prefix``).
        old, new: the configs the weights come from and go to. Only the input geometry may differ
            (frames, mel bins, patch shape, stride); the transformer itself must be the same.
        pos_mode: see :func:`resample_pos_embed`.
        patch_mode: see :func:`resample_patch_kernel`.
        prefix: key prefix of the encoder inside ``state`` (e.g. ``"encoder."``).
    """
    fixed = ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "num_prefix_tokens")
    changed = [name for name in fixed if getattr(old, name) != getattr(new, name)]
    if changed:
        raise ValueError(
            "cannot adapt weights across different transformers: "
            + ", ".join(f"{n} {getattr(old, n)} -> {getattr(new, n)}" for n in changed)
        )
    out = dict(state)
    pos_key, kernel_key = f"{prefix}pos_embed", f"{prefix}patch_embed.proj.weight"
    for key in (pos_key, kernel_key):
        if key not in out:
            raise KeyError(f"state dict has no {key!r}; keys start with {sorted(out)[:5]}")
    out[kernel_key] = resample_patch_kernel(out[kernel_key], (new.fshape, new.tshape), patch_mode)
    out[pos_key] = resample_pos_embed(out[pos_key], old.grid, new.grid, old.num_prefix_tokens, pos_mode)
    return out


def load_adapted(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    old: EncoderConfig,
    new: EncoderConfig,
    pos_mode: str = "bilinear",
    patch_mode: str = "pi",
    source: str | None = None,
) -> nn.Module:
    """Load encoder weights laid out for ``old`` into ``module`` (an encoder laid out for ``new``).

    The weights are adapted (:func:`adapt_state_dict`) and cast to the module's dtype; every key and shape must
    match. ``source``: where the weights come from (a file), for the error. Returns ``module``.

    Raises:
        ValueError: weights that do not fit ``old`` (a missing positional embedding or patch kernel, a tensor of
            another shape, a missing or unexpected key), naming ``source`` and the first mismatching keys.
    """
    source = source or "the weights"
    try:
        adapted = adapt_state_dict(state, old, new, pos_mode, patch_mode)
    except KeyError as err:  # no pos_embed / patch kernel
        raise ValueError(f"{source}: {err.args[0]}") from None
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return load_checked(module, adapted, source)


def adapt_encoder(
    encoder: ASTEncoder, new: EncoderConfig, pos_mode: str = "bilinear", patch_mode: str = "pi"
) -> ASTEncoder:
    """A new encoder for ``new`` carrying ``encoder``'s weights (adapted), on the same device and dtype and in the
    same mode (an encoder in eval mode comes back in eval mode: with stochastic depth, a train-mode one drops
    blocks at random); the caller's random state is left as it was (the new encoder's initial weights, all
    replaced, are drawn from a generator of their own)."""
    param = next(encoder.parameters())
    with torch.random.fork_rng(devices=[param.device] if param.device.type == "cuda" else []), \
            torch.device(param.device):
        out = ASTEncoder(new).to(dtype=param.dtype)
    return load_adapted(out, encoder.state_dict(), encoder.cfg, new, pos_mode, patch_mode).train(encoder.training)
