"""Converters from other projects' weights to this package's encoder: official SSAST / AST, timm ImageNet ViTs.

- Official SSAST and AST checkpoints (``module.v.*`` keys, as their trainers save a
  ``DataParallel`` model). SSAST pretrained
  files carry their input size (``p_input_fdim/tdim``); for fine-tuned SSAST and AST files the strides are
  not stored, so AST's defaults are assumed (stride 10 for 16x16 patches, time stride 1 for 128x2
  frames) unless given.
- ImageNet ViT / DeiT weights saved by timm (the paper's AST baseline starts there): the RGB kernel is
  summed to one channel and the square ImageNet grid is described as a ``16g x 16g`` "spectrogram" with
  16x16 patches, so that the usual resizing (AST: centre cut where the audio grid is smaller, bilinear
  where it is larger) takes it to any audio input (reference 4.1).

Each converter maps a state dict to ``(EncoderConfig, ASTEncoder state dict)``; loading files is
``common.models.weights``'s job.
"""

from __future__ import annotations

import logging
import re

import torch

from common.models.ast.encoder import EncoderConfig

__all__ = ["convert_official_state_dict", "convert_timm_vit_state_dict", "is_timm_vit"]

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^v\.blocks\.(\d+)\.")


def convert_official_state_dict(
    state: dict[str, torch.Tensor],
    input_fdim: int = 128,
    fstride: int | None = None,
    tstride: int | None = None,
    input_tdim: int | None = None,
    source: str = "checkpoint",
) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """Map an official SSAST / AST state dict to ``(EncoderConfig, ASTEncoder state dict)``.

    Args:
        state: the checkpoint's state dict (with or without the DataParallel ``module.`` prefix).
        input_fdim, fstride, tstride, input_tdim: the input geometry, for files that do not store it.
        source: the file name, for error messages.

    Keys outside the encoder (``mlp_head``, ``cpredlayer``, ``gpredlayer``, ``mask_embed``, the unused
    ImageNet heads ``v.head*``) are dropped.
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    required = ("v.pos_embed", "v.patch_embed.proj.weight", "v.cls_token")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(
            f"{source} is not an SSAST/AST checkpoint: missing {missing} "
            f"(keys look like {sorted(sd)[:4]})"
        )
    kernel = sd["v.patch_embed.proj.weight"]
    if kernel.dim() != 4 or kernel.shape[1] != 1:
        raise ValueError(f"{source}: v.patch_embed.proj.weight has shape {tuple(kernel.shape)}, expected [D, 1, h, w]")
    embed_dim, fshape, tshape = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    prefix = 2 if "v.dist_token" in sd else 1
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    depth = max(blocks) + 1 if blocks else 0
    if depth == 0:
        raise ValueError(f"{source} has no transformer blocks (v.blocks.*)")
    mlp_hidden = sd["v.blocks.0.mlp.fc1.weight"].shape[0]
    rows = sd["v.pos_embed"].shape[1] - prefix
    if "p_input_fdim" in sd:  # SSAST pretraining checkpoint: input size stored, stride = patch
        fdim, tdim = int(sd["p_input_fdim"].item()), int(sd["p_input_tdim"].item())
        fstride, tstride = fstride or fshape, tstride or tshape
    else:
        fdim = input_fdim
        fstride = fstride or (fshape if fshape == fdim else 10)
        tstride = tstride or (1 if fshape == fdim else 10)
        f_dim = (fdim - fshape) // fstride + 1
        if rows % f_dim:
            raise ValueError(
                f"{source}: pos_embed has {rows} patch rows, not a multiple of the {f_dim} frequency rows that "
                f"patch {fshape}x{tshape}, stride {fstride} give for {fdim} mel bins; pass fstride/input_fdim"
            )
        # the fewest frames giving the stored grid (AST's 1024 frames at stride 10 -> 1016; the encoder
        # accepts the longer input too), unless the caller knows the length it was trained on
        tdim = input_tdim or (rows // f_dim - 1) * tstride + tshape
    cfg = EncoderConfig(embed_dim=embed_dim, depth=depth, num_heads=max(1, embed_dim // 64),
                        mlp_ratio=mlp_hidden / embed_dim, qkv_bias="v.blocks.0.attn.qkv.bias" in sd,
                        num_mel_bins=fdim, input_tdim=tdim, fshape=fshape, tshape=tshape,
                        fstride=fstride, tstride=tstride, num_prefix_tokens=prefix)
    if cfg.num_patches != rows:
        raise ValueError(
            f"{source}: pos_embed has {rows} patch rows but the derived geometry ({fdim}x{tdim} input, "
            f"patch {fshape}x{tshape}, stride {fstride}x{tstride}) gives {cfg.num_patches}"
        )
    tokens = [sd["v.cls_token"]] + ([sd["v.dist_token"]] if prefix == 2 else [])
    out = {"prefix_tokens": torch.cat(tokens, dim=1), "pos_embed": sd["v.pos_embed"]}
    for key, value in sd.items():
        if key.startswith(("v.patch_embed.", "v.blocks.", "v.norm.")):
            out[key[2:]] = value
    dropped = sorted(k for k in sd if not k.startswith(("v.patch_embed.", "v.blocks.", "v.norm.", "v.pos_embed",
                                                       "v.cls_token", "v.dist_token")))
    if dropped:
        log.info("%s: ignoring %d non-encoder entries (%s)", source, len(dropped),
                 ", ".join(sorted({k.split(".")[0] if not k.startswith("v.") else k for k in dropped})))
    return cfg, out


def convert_timm_vit_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint"
                                ) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """Map a timm ViT / DeiT state dict (ImageNet, 3-channel 16x16 patches, square grid) to an encoder.

    The kernel is summed over RGB (AST); the grid ``g x g`` becomes a ``16g x 16g`` input with 16x16
    patches, from which :func:`common.models.ast.resize.adapt_state_dict` (mode ``cut``) reproduces AST's
    positional-embedding rule for any audio grid.
    """
    kernel = state["patch_embed.proj.weight"]
    if kernel.dim() != 4 or kernel.shape[1] != 3:
        raise ValueError(f"{source}: patch_embed.proj.weight {tuple(kernel.shape)} is not a 3-channel ViT kernel")
    embed_dim, fshape, tshape = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    prefix = 1 + ("dist_token" in state)
    rows = state["pos_embed"].shape[1] - prefix
    side = int(round(rows**0.5))
    if side * side != rows:
        raise ValueError(f"{source}: pos_embed has {rows} patch rows, not a square ImageNet grid")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))}
    cfg = EncoderConfig(embed_dim=embed_dim, depth=max(blocks) + 1, num_heads=max(1, embed_dim // 64),
                        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
                        qkv_bias="blocks.0.attn.qkv.bias" in state, num_mel_bins=side * fshape,
                        input_tdim=side * tshape, fshape=fshape, tshape=tshape, fstride=fshape, tstride=tshape,
                        num_prefix_tokens=prefix)
    tokens = [state["cls_token"]] + ([state["dist_token"]] if prefix == 2 else [])
    out = {"prefix_tokens": torch.cat(tokens, dim=1), "pos_embed": state["pos_embed"],
           "patch_embed.proj.weight": kernel.sum(dim=1, keepdim=True), "patch_embed.proj.bias":
           state["patch_embed.proj.bias"]}
    out.update({k: v for k, v in state.items() if k.startswith(("blocks.", "norm."))})
    return cfg, out


def is_timm_vit(state: dict) -> bool:
    """Whether a state dict has the keys of a timm ViT / DeiT."""
    return "patch_embed.proj.weight" in state and "cls_token" in state and "pos_embed" in state
