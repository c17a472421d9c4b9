"""Model files: this package's exports, official SSAST / AST ``.pth`` files, and run directories.

An export is one safetensors file: the weights plus, in its metadata, the JSON config needed to rebuild
the model (``encoder_config``) and whatever else the writer adds (front end, labels, head). Files are
written atomically (temporary file + rename), so a crash never leaves half a model behind.

``load_encoder(CKPT)`` accepts any of:

- an export written by :func:`save_encoder` (pretraining) or by the fine-tuning trainer;
- a run directory (its final export, ``model.safetensors``);
- an official SSAST or AST checkpoint (``module.v.*`` keys; reference/ssast_ast.md 1.5), loaded with
  ``weights_only=True``. SSAST pretrained files carry their input size (``p_input_fdim/tdim``); for
  fine-tuned SSAST and AST files the strides are not stored, so AST's defaults are assumed (stride 10
  for 16x16 patches, time stride 1 for 128x2 frames) unless given;
- ImageNet ViT / DeiT weights saved by timm (``.pth`` or ``.safetensors``; the paper's AST baseline
  starts there): the RGB kernel is summed to one channel and the square ImageNet grid is described as a
  ``16g x 16g`` "spectrogram" with 16x16 patches, so that the usual resizing (AST: centre cut where the
  audio grid is smaller, bilinear where it is larger) takes it to any audio input (reference 4.1).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

from common.model import ASTEncoder, EncoderConfig

__all__ = [
    "EXPORT_FORMAT",
    "save_weights",
    "read_weights",
    "save_encoder",
    "load_encoder",
    "load_encoder_state",
    "convert_official_state_dict",
    "convert_timm_vit_state_dict",
    "resolve_model_file",
    "atomic_write_text",
]

log = logging.getLogger(__name__)

EXPORT_FORMAT = "coarse2fine-ast/1"
RUN_EXPORT = "model.safetensors"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see either the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically write ``tensors`` and JSON-serialisable ``meta`` into one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": EXPORT_FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_weights`: ``(tensors, meta)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if raw.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not an export of this package (format={raw.get('format')!r}, "
            f"expected {EXPORT_FORMAT!r})"
        )
    meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    return tensors, meta


def save_encoder(encoder: ASTEncoder, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Export an encoder: weights + its config (+ ``meta``, e.g. the front end) in one safetensors file."""
    return save_weights(path, encoder.state_dict(), {"encoder_config": encoder.cfg.to_dict(),
                                                     "encoder_prefix": "", **(meta or {})})


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The model file behind ``path``: the file itself, or a run directory's final export."""
    path = Path(path)
    if path.is_dir():
        final = path / RUN_EXPORT
        if final.is_file():
            return final
        exports = sorted((path / "export").glob("*.safetensors")) if (path / "export").is_dir() else []
        hint = (f"; phase exports present: {', '.join(str(p) for p in exports)}" if exports
                else "; it holds no exports (is it a run directory?)")
        raise FileNotFoundError(f"run directory {path} has no final export {RUN_EXPORT} (run not finished?){hint}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


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
    patches, from which :func:`common.resize.adapt_state_dict` (mode ``cut``) reproduces AST's
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


def _is_timm_vit(state: dict) -> bool:
    return "patch_embed.proj.weight" in state and "cls_token" in state and "pos_embed" in state


def load_encoder_state(
    path: str | os.PathLike, **official_kwargs
) -> tuple[EncoderConfig, dict[str, torch.Tensor], dict]:
    """``(config, encoder state dict, metadata)`` of any supported checkpoint (see module docstring).

    ``metadata["source"]`` is ``export``, ``official`` (SSAST / AST), ``imagenet`` (timm ViT / DeiT) or ``hf``
    (a Hugging Face AST directory, read by :mod:`common.hf`).
    """
    from common.hf import hf_encoder_state, is_hf_directory

    if is_hf_directory(path):
        return hf_encoder_state(path)
    file = resolve_model_file(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file, safe_open

        with safe_open(str(file), framework="pt") as handle:
            foreign = (handle.metadata() or {}).get("format") != EXPORT_FORMAT
        if foreign:
            state = load_file(str(file))
            if not _is_timm_vit(state):
                raise ValueError(
                    f"{file} is a safetensors file but neither an export of this package nor timm ViT weights")
            cfg, enc = convert_timm_vit_state_dict(state, str(file))
            return cfg, enc, {"source": "imagenet", "file": str(file)}
        tensors, meta = read_weights(file)
        if "encoder_config" not in meta:
            raise ValueError(f"{file} has no encoder_config in its metadata")
        prefix = meta.get("encoder_prefix", "")
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return EncoderConfig.from_dict(meta["encoder_config"]), state, {"source": "export", **meta}
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, unsafe globals ...
        raise ValueError(
            f"{file} is neither an export of this package (.safetensors) nor a loadable SSAST/AST .pth: {err}"
        ) from err
    for wrapper in ("state_dict", "model"):  # {"model": ...} is how timm / DeiT training scripts save
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    if _is_timm_vit(state):
        cfg, enc = convert_timm_vit_state_dict(state, str(file))
        return cfg, enc, {"source": "imagenet", "file": str(file)}
    cfg, enc = convert_official_state_dict(state, source=str(file), **official_kwargs)
    return cfg, enc, {"source": "official", "file": str(file)}


def load_encoder(path: str | os.PathLike, **official_kwargs) -> ASTEncoder:
    """Rebuild an :class:`ASTEncoder` from any supported checkpoint, on the CPU, in float32.

    Args:
        path: an export, a run directory, or an official SSAST / AST ``.pth``.
        official_kwargs: ``input_fdim``, ``fstride``, ``tstride``, ``input_tdim`` for official files that do
            not store them.
    """
    cfg, state, _ = load_encoder_state(path, **official_kwargs)
    encoder = ASTEncoder(cfg)
    result = encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not match the encoder config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return encoder
