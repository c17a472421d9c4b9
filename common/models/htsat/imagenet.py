"""ImageNet Swin Transformer weights -> the start of an HTS-AT (its backbone), as the official HTS-AT loads them.

The official code (RetroCirce/HTS-Audio-Transformer ``main.py``, ``swin_pretrain_path``: an option, ``None`` in its
``config.py``) starts its pretrained AudioSet model (HTS-AT^HCP) from Microsoft's ImageNet-1K Swin-T/C24
(``swin_tiny_c24_patch4_window8_256.pth``: 256 x 256 images,
window 8, heads 4-8-16-32, exactly HTS-AT's Swin): every key of the file's ``model`` dict that the model has
is loaded, the patch kernel averaged over the RGB channels, the ImageNet classifier ``head.*`` dropped. What
the file lacks (the per-mel ``bn0``, the token-semantic head) starts afresh.

Two layouts are read (told apart by ``layers.0.downsample``, as timm's own ``checkpoint_filter_fn``):

- Microsoft's (and the official HTS-AT's): patch merging at the **end** of stages 0..n-2,
  ``layers.{i}.downsample.*`` -> ``swin.layers.{i+1}.downsample.*``; ``head.*``; the buffers
  ``relative_position_index`` and ``attn_mask`` are stored;
- timm's (>= 0.9, e.g. ``swin_tiny_patch4_window7_224``): merging at the **start** of stages 1..n-1, the
  same index; ``head.fc.*``; no buffers. ``.pth`` (bare or under ``model`` / ``state_dict``) or ``.safetensors``.

Sizes are read from the weights: embed dim and patch (the kernel), depths (the blocks), heads (each stage's
relative-position table), MLP ratio, qkv bias. The attention window is HTS-AT's (the recipe's
``model.htsat.window_size``, 8): each block's table is fitted to its window when the model is built
(:func:`common.models.htsat.adapt.fit_tables`; a window-7 file's 13 x 13 tables become 15 x 15), which the official
code cannot do (it asserts equal shapes, so only a window-8 file loads there). Everything else in the
config (front end, image, classes) is the run's. Buffers are dropped (timm recomputes them).
"""

from __future__ import annotations

import logging
import math
import re

import torch

from common.models.htsat.config import HTSATConfig
from common.models.htsat.geometry import swin_depths

__all__ = ["SWIN_FIELDS", "OFFICIAL_START", "looks_imagenet_swin", "swin_layout", "convert_imagenet_swin"]

log = logging.getLogger(__name__)

# the config fields an ImageNet Swin's weights fix (the rest is the run's)
SWIN_FIELDS = ("patch_size", "embed_dim", "depths", "num_heads", "mlp_ratio", "qkv_bias")
# the file the official HTS-AT starts from when config.py's swin_pretrain_path names it, Microsoft's Swin-T/C24
OFFICIAL_START = "swin_tiny_c24_patch4_window8_256.pth"

_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(.+)")
_TABLE = "attn.relative_position_bias_table"


def looks_imagenet_swin(state: dict) -> bool:
    """Whether a state dict holds a Swin Transformer image classifier (not an HTS-AT: no token-semantic head)."""
    return ("patch_embed.proj.weight" in state and f"layers.0.blocks.0.{_TABLE}" in state
            and "tscam_conv.weight" not in state and "sed_model.tscam_conv.weight" not in state)


def swin_layout(state: dict) -> str:
    """``microsoft`` (patch merging at the end of a stage, stage 0 has one) or ``timm`` (at the start)."""
    return "microsoft" if "layers.0.downsample.reduction.weight" in state else "timm"


def _window(table: torch.Tensor, key: str, source: str) -> int:
    side = math.isqrt(table.shape[0])
    if table.dim() != 2 or side * side != table.shape[0] or side % 2 == 0:
        raise ValueError(f"{source}: {key} has shape {tuple(table.shape)}; expected [(2w-1)^2, heads] of a square "
                         "window")
    return (side + 1) // 2


def convert_imagenet_swin(state: dict[str, torch.Tensor], source: str = "checkpoint"
                          ) -> tuple[HTSATConfig, dict[str, torch.Tensor], dict]:
    """Map an ImageNet Swin state dict onto :class:`~common.models.htsat.model.HTSAT`'s backbone keys (``swin.*``).

    Args:
        state: the file's state dict (``model`` / ``state_dict`` wrapper already removed).
        source: the file name, for messages.

    Returns:
        ``(config, state, info)``: the official HTS-AT config with the file's Swin sizes (:data:`SWIN_FIELDS`),
        the converted weights (relative-position tables at the file's windows), and ``info``: ``layout``,
        ``windows`` (the file's window per stage), ``dropped`` (the keys left out).

    Raises:
        ValueError: naming the file and the key for a Swin V2, an absolute position embedding, a patch kernel
            that is not square, or a key this converter does not know.
    """
    if any(k.endswith(("logit_scale", "cpb_mlp.0.weight")) for k in state):
        raise ValueError(f"{source}: a Swin Transformer V2 (logit_scale / cpb_mlp keys); HTS-AT is built on the "
                         f"original Swin Transformer: use a Swin V1 file such as {OFFICIAL_START}")
    if "absolute_pos_embed" in state:
        raise ValueError(f"{source}: this Swin uses an absolute position embedding (ape=True), which HTS-AT does "
                         "not build")
    kernel = state["patch_embed.proj.weight"]
    if kernel.dim() != 4 or kernel.shape[2] != kernel.shape[3]:
        raise ValueError(f"{source}: patch_embed.proj.weight has shape {tuple(kernel.shape)}; expected "
                         "[D, channels, p, p]")
    depths = swin_depths(state, source)
    stages = range(len(depths))
    tables = [state[f"layers.{i}.blocks.0.{_TABLE}"] for i in stages]
    heads = tuple(int(t.shape[1]) for t in tables)
    windows = tuple(_window(t, f"layers.{i}.blocks.0.{_TABLE}", source) for i, t in enumerate(tables))
    embed_dim = int(kernel.shape[0])
    fc1 = state.get("layers.0.blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise ValueError(f"{source}: no layers.0.blocks.0.mlp.fc1.weight (keys start with {sorted(state)[:4]})")
    swin = dict(patch_size=int(kernel.shape[2]), embed_dim=embed_dim, depths=depths, num_heads=heads,
                mlp_ratio=fc1.shape[0] / embed_dim, qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state)
    try:
        cfg = HTSATConfig.from_dict(swin, prefix=source)
    except ValueError as err:
        raise ValueError(f"{source}: the Swin in this file cannot be an HTS-AT backbone: {err}") from None
    layout = swin_layout(state)
    shift = 1 if layout == "microsoft" else 0
    out, dropped, unknown = {}, [], []
    for key, value in state.items():
        if key.startswith("head.") or key.endswith(("relative_position_index", "attn_mask")):
            dropped.append(key)
            continue
        m = _DOWNSAMPLE.match(key)
        if key == "patch_embed.proj.weight":
            out["swin.patch_embed.proj.weight"] = value.float().mean(dim=1, keepdim=True).to(value.dtype)
        elif m:
            out[f"swin.layers.{int(m.group(1)) + shift}.downsample.{m.group(2)}"] = value
        elif key.startswith(("patch_embed.", "layers.", "norm.")):
            out[f"swin.{key}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: keys an ImageNet Swin Transformer does not have: {unknown[:6]}")
    return cfg, out, {"layout": layout, "windows": list(windows), "dropped": dropped}
