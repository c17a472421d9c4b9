"""Carrying HTS-AT weights from one phase geometry to the next.

HTS-AT has no absolute position embedding. What depends on the geometry is:

- each block's relative-position bias table, ``[(2 wh - 1) (2 ww - 1), heads]``, whose size follows the
  block's attention window; a window changes only where a stage grid crosses ``window_size`` (at
  Fshift x4 -> full resolution: the two stage-4 tables, 7 x 7 -> 15 x 15);
- the patch-embedding kernel, for ``patch`` compression (``4 x 4C`` <-> ``4 x 4``).

Everything else (patch norm, every linear and norm, ``bn0``, ``tscam_conv``) is passed through as the
same tensor. Table transfers (recipe switch ``bias_transfer``):

- ``timm`` (default): timm's ``resize_rel_pos_bias_table``, the route ``SwinTransformer.set_input_size``
  takes, so an adapted model equals a timm model resized in place;
- ``bilinear``: the table as a ``(2 wh - 1) x (2 ww - 1)`` image, bilinearly resized (the paper's
  operator for AST's positional embedding);
- ``bicubic``: the same, bicubic (Microsoft Swin's ``load_pretrained``).

The kernel goes through :func:`common.models.ast.resize.resample_patch_kernel` (PI-resize or bilinear), as for AST.
:func:`fit_tables` fits weights whose windows are not known from a geometry (an ImageNet Swin's) to one.
Every function is tensor -> tensor, computes in float32 and returns the input dtype.
"""

from __future__ import annotations

import logging
import math
import typing
import warnings
from typing import Literal

import torch
from timm.layers import resize_rel_pos_bias_table
from torch.nn import functional as F

from common.models.ast.resize import resample_patch_kernel
from common.models.htsat.config import HTSATConfig
from common.models.htsat.geometry import Geometry, stage_layout
from common.models.htsat.model import HTSAT

__all__ = ["BiasTransfer", "BIAS_TRANSFERS", "resize_bias_table", "adapt_state_dict", "fit_tables", "adapt_model"]

log = logging.getLogger(__name__)

BiasTransfer = Literal["timm", "bilinear", "bicubic"]  # the recipe's ``transfer.rel_pos_bias``
BIAS_TRANSFERS: tuple[str, ...] = typing.get_args(BiasTransfer)


def resize_bias_table(table: torch.Tensor, old_window: tuple[int, int], new_window: tuple[int, int],
                      mode: str = "timm") -> torch.Tensor:
    """Resize a relative-position bias table ``[(2 h - 1)(2 w - 1), heads]`` from one window to another.

    Args:
        table: the table of a block with window ``old_window``.
        old_window, new_window: ``(rows, columns)`` of the attention windows.
        mode: one of :data:`BIAS_TRANSFERS`.
    """
    if mode not in BIAS_TRANSFERS:
        raise ValueError(f"unknown bias_transfer {mode!r}; choose one of {list(BIAS_TRANSFERS)}")
    old_size = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    new_size = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if table.dim() != 2 or table.shape[0] != old_size[0] * old_size[1]:
        raise ValueError(f"relative-position table of shape {tuple(table.shape)} is not "
                         f"[{old_size[0]} x {old_size[1]}, heads] for a {old_window[0]}x{old_window[1]} window")
    if tuple(old_window) == tuple(new_window):
        return table
    heads = table.shape[1]
    if mode == "timm":

        with warnings.catch_warnings():  # timm's grid interpolator trips two torch deprecation warnings
            warnings.filterwarnings("ignore", message=".*(non-contiguous|non-tuple sequence).*")
            out = resize_rel_pos_bias_table(table.float(), new_window_size=tuple(new_window),
                                            new_bias_shape=(new_size[0] * new_size[1], heads),
                                            old_window_size=tuple(old_window))
    else:
        grid = table.float().T.reshape(1, heads, *old_size)
        out = F.interpolate(grid, size=new_size, mode=mode, align_corners=False).reshape(heads, -1).T
    return out.to(table.dtype).contiguous()


def adapt_state_dict(state: dict[str, torch.Tensor], cfg: HTSATConfig, old: Geometry, new: Geometry,
                     bias_transfer: str = "timm", patch_transfer: str = "pi", prefix: str = ""
                     ) -> dict[str, torch.Tensor]:
    """A copy of an :class:`~common.models.htsat.model.HTSAT` state dict laid out for geometry ``new``.

    Args:
        state: the weights for geometry ``old`` (keys of ``HTSAT``, optionally under ``prefix``).
        cfg: the model configuration (the same in both phases).
        old, new: the geometries the weights come from and go to.
        bias_transfer: how relative-position tables are resized (:data:`BIAS_TRANSFERS`).
        patch_transfer: ``pi`` or ``bilinear``, for a patch kernel that changes shape.
        prefix: key prefix of the model inside ``state``.

    Returns:
        A new dict; tensors that do not depend on the geometry are the very same objects.
    """
    out = dict(state)
    for before, after in zip(stage_layout(cfg, old), stage_layout(cfg, new)):
        if before.window == after.window:
            continue
        key = f"{prefix}swin.layers.{after.stage}.blocks.{after.block}.attn.relative_position_bias_table"
        if key not in out:
            raise KeyError(f"state dict has no {key!r}; is it an HTS-AT state dict under prefix {prefix!r}?")
        out[key] = resize_bias_table(out[key], before.window, after.window, bias_transfer)
        log.info("resized %s: window %dx%d -> %dx%d (%s)", key, *before.window, *after.window, bias_transfer)
    if old.patch != new.patch:

        key = f"{prefix}swin.patch_embed.proj.weight"
        if key not in out:
            raise KeyError(f"state dict has no {key!r}")
        out[key] = resample_patch_kernel(out[key], new.patch, patch_transfer)
    return out


def fit_tables(state: dict[str, torch.Tensor], cfg: HTSATConfig, geom: Geometry, bias_transfer: str = "timm",
               patch_transfer: str = "pi") -> tuple[dict[str, torch.Tensor], list[str]]:
    """A copy of ``state`` whose relative-position tables and patch kernel fit geometry ``geom``, whatever
    windows the weights were trained with (an ImageNet Swin's: window 7 at 224 x 224, 8 at 256 x 256).

    Unlike :func:`adapt_state_dict`, which knows both geometries, each table's window is read from its size
    (``(2w - 1)^2`` rows: a square window). Returns the new dict and a line per kind of change made.
    """
    out, changes = dict(state), {}
    for block in stage_layout(cfg, geom):
        key = f"swin.layers.{block.stage}.blocks.{block.block}.attn.relative_position_bias_table"
        if key not in out:
            raise KeyError(f"state dict has no {key!r}")
        side = math.isqrt(out[key].shape[0])
        if side * side != out[key].shape[0]:
            raise ValueError(f"{key} has shape {tuple(out[key].shape)}, not the table of a square window")
        old = ((side + 1) // 2,) * 2
        if old != tuple(block.window):
            out[key] = resize_bias_table(out[key], old, block.window, bias_transfer)
            what = f"{old[0]}x{old[1]} -> {block.window[0]}x{block.window[1]}"
            changes[what] = changes.get(what, 0) + 1
    lines = [f"{n} relative-position table(s) resized, windows {what} ({bias_transfer})" for what, n in changes.items()]
    kernel = out.get("swin.patch_embed.proj.weight")
    if kernel is not None and tuple(kernel.shape[-2:]) != tuple(geom.patch):

        out["swin.patch_embed.proj.weight"] = resample_patch_kernel(kernel, geom.patch, patch_transfer)
        lines.append(f"patch kernel resized {tuple(kernel.shape[-2:])} -> {tuple(geom.patch)} ({patch_transfer})")
    return out, lines


def adapt_model(model: torch.nn.Module, new: Geometry, bias_transfer: str = "timm",
                patch_transfer: str = "pi") -> torch.nn.Module:
    """A new :class:`~common.models.htsat.model.HTSAT` for geometry ``new`` with ``model``'s weights, same device
    and dtype."""

    param = next(model.parameters())
    state = adapt_state_dict(model.state_dict(), model.cfg, model.geom, new, bias_transfer, patch_transfer)
    with torch.device(param.device):
        out = HTSAT(model.cfg, new)
    out.load_state_dict(state)
    return out.to(dtype=param.dtype).train(model.training)
