"""Loading a model checkpoint of any kind: what ``--init`` (and ``load_encoder``) take.

``load_encoder_state(CKPT)`` accepts

- an export of this package (``common.models.exports``: pretraining encoders, fine-tuned classifiers);
- a run directory (its final export, ``model.safetensors``);
- an official SSAST or AST ``.pth`` (``module.v.*`` keys), loaded with ``weights_only=True``;
- ImageNet ViT / DeiT weights saved by timm (``.pth`` or ``.safetensors``), the paper's AST start;
- an official HTS-AT checkpoint (the Lightning ``.ckpt`` with ``sed_model.*`` keys), loaded with
  ``weights_only=True`` (:mod:`common.models.htsat.official`);
- ImageNet Swin Transformer weights (Microsoft's layout, e.g. the official HTS-AT's start
  ``swin_tiny_c24_patch4_window8_256.pth``, or timm's, ``.pth`` or ``.safetensors``): an HTS-AT backbone
  (:mod:`common.models.htsat.imagenet`);

and returns :class:`EncoderWeights`: the encoder config, its state dict and what is known of the source.
Conversions of foreign layouts live in ``common.models.ast.official`` and ``common.models.htsat``. Training
checkpoints (optimizer, schedule, data position, RNG) are another thing: ``common.training.checkpoints``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from common.audio.compression import Compression
from common.models.arch import architecture_from_meta
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.ast.official import convert_official_state_dict, convert_timm_vit_state_dict, is_timm_vit
from common.models.exports import is_export, read_weights, resolve_model_file, unreadable
from common.models.hf import is_hf_directory, read_hf_directory
from common.models.htsat import class_names
from common.models.htsat.imagenet import convert_imagenet_swin, looks_imagenet_swin
from common.models.htsat.official import (
    config_from_official,
    convert_official,
    looks_official,
    official_clips,
    unwrap_official,
)

__all__ = ["EncoderWeights", "load_encoder_state", "load_encoder"]

log = logging.getLogger(__name__)


class EncoderWeights(NamedTuple):
    """An encoder's weights as loaded from a checkpoint.

    Attributes:
        config: the geometry and size the weights were trained with: an :class:`EncoderConfig` (AST family)
            or an :class:`~common.models.htsat.HTSATConfig`.
        state: the :class:`ASTEncoder` state dict.
        meta: where they come from: ``source`` is ``export``, ``official`` (SSAST / AST / HTS-AT) or
            ``imagenet`` (timm ViT / DeiT; ImageNet Swin for HTS-AT); ``objective`` is ``ssast`` for
            self-supervised pretraining weights (this package's pretraining exports, SSAST's pretrained files)
            and ``classification`` for fine-tuned ones; exports add their own metadata (front end, task, ...).
    """

    config: object
    state: dict[str, torch.Tensor]
    meta: dict

    @property
    def arch(self) -> str:
        """``ast`` or ``htsat``."""
        return self.meta.get("arch", "ast")

    @property
    def written_in(self) -> Compression:
        """The compression of the phase the weights were written in (an export's ``meta["phase"]``; full
        resolution for every other file). An AST-family export of a ``patch`` phase holds p x Cp kernels."""
        phase = self.meta.get("phase") or {}
        return Compression(phase.get("compression", "none"), phase.get("factor", 1),
                           phase.get("patch_transfer", "pi"))


def _hf_encoder_state(path: str | os.PathLike):
    """The :class:`EncoderWeights` of an HF AST directory (``meta["source"] == "hf"``)."""
    model = read_hf_directory(path)
    origin = model.provenance  # what this package exported into the directory (an SSAST encoder: its objective)
    return EncoderWeights(model.cfg, model.encoder, {
        "source": "hf", "file": str(path), "labels": model.labels, "own_export": model.own_export,
        "front_end": None if model.front_end is None else asdict(model.front_end),
        **({"objective": origin["objective"]} if "objective" in origin else {}),
        **({"origin": origin["source"]} if "source" in origin else {})})


OFFICIAL_GEOMETRY = ("input_fdim", "fstride", "tstride", "input_tdim")  # what an official AST file does not store


def load_encoder_state(path: str | os.PathLike, **official_kwargs) -> EncoderWeights:
    """The encoder weights of any supported checkpoint (see the module docstring).

    Args:
        path: the checkpoint.
        official_kwargs: ``input_fdim``, ``fstride``, ``tstride``, ``input_tdim``: the input geometry of an official
            SSAST / AST ``.pth`` that does not store it (``common.models.ast.official.convert_official_state_dict``).

    Raises:
        ValueError: an unknown keyword, or one given for a file that stores its geometry.
    """
    unknown = sorted(set(official_kwargs) - set(OFFICIAL_GEOMETRY))
    if unknown:
        raise ValueError(f"{path}: unknown keyword {', '.join(unknown)}; an official SSAST / AST file takes "
                         f"{', '.join(OFFICIAL_GEOMETRY)} (a patch stride of 10: fstride=10, tstride=10)")
    weights = _load_encoder_state(path, official_kwargs)
    if official_kwargs and not (weights.meta.get("source") == "official" and weights.arch == "ast"):
        raise ValueError(f"{path} stores its own input geometry ({weights.meta.get('source')} weights): "
                         f"{', '.join(sorted(official_kwargs))} are for official SSAST / AST .pth files; fit a loaded "
                         f"encoder to another input with common.models.ast.resize.adapt_encoder")
    return weights


def _load_encoder_state(path: str | os.PathLike, official_kwargs: dict) -> EncoderWeights:
    if is_hf_directory(path):
        return _hf_encoder_state(path)
    file = resolve_model_file(path)
    if file.suffix == ".safetensors":

        if not is_export(file):
            try:
                state = load_file(str(file))
            except SafetensorError as err:
                raise unreadable(file, err) from err
            if looks_imagenet_swin(state):
                return _imagenet_swin(state, file)
            if not is_timm_vit(state):
                raise ValueError(f"{file} is a safetensors file but neither an export of this package nor timm "
                                 "ViT weights nor ImageNet Swin weights")
            cfg, enc = convert_timm_vit_state_dict(state, str(file))
            return EncoderWeights(cfg, enc, {"source": "imagenet", "file": str(file)})
        tensors, meta = read_weights(file)
        if "encoder_config" not in meta:
            raise ValueError(f"{file} has no encoder_config in its metadata")
        prefix = meta.get("encoder_prefix", "")
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        return EncoderWeights(architecture_from_meta(meta).base, state, {"source": "export", **meta, "file": str(file)})
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, unsafe globals ...
        raise ValueError(f"{file} is neither an export of this package (.safetensors) nor a loadable checkpoint "
                         f"(an SSAST / AST / HTS-AT .pth, a Hugging Face AST directory): {_load_failure(file, err)}") \
            from err
    for wrapper in ("state_dict", "model"):  # {"model": ...} is how timm / DeiT training scripts save
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]

    if isinstance(state, dict) and looks_official(state):
        return _official_htsat(state, file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    if looks_imagenet_swin(state):
        return _imagenet_swin(state, file)
    if is_timm_vit(state):
        cfg, enc = convert_timm_vit_state_dict(state, str(file))
        return EncoderWeights(cfg, enc, {"source": "imagenet", "file": str(file)})
    cfg, enc = convert_official_state_dict(state, source=str(file), **official_kwargs)
    pretrained = any(k.split(".")[-1] == "p_input_fdim" for k in state)  # SSAST pretraining files store it
    objective = "ssast" if pretrained else "classification"
    return EncoderWeights(cfg, enc, {"source": "official", "file": str(file), "objective": objective})


def _load_failure(file: Path, err: Exception) -> str:
    """Why ``torch.load`` could not read ``file``, in words (its own message may be empty or say nothing, such as
    "pop from empty list" for a file that is not a PyTorch checkpoint at all)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(4)
    except OSError as os_err:
        return f"it cannot be read ({os_err.strerror or os_err})"
    if size == 0:
        return "the file is empty"
    if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
        return f"not a PyTorch checkpoint ({size} bytes that are neither torch's zip format nor a pickle)"
    text = " ".join(str(err).split())
    return text[:300] if text else type(err).__name__


def _official_htsat(state: dict, file) -> EncoderWeights:
    """An official HTS-AT checkpoint's weights; its classes are AudioSet's for 527 outputs, numbered otherwise.
    Its loss is the official configs' for its head: ``clip_ce`` (``ce``) for ESC-50's 50 classes, ``clip_bce``
    otherwise (AudioSet, Speech Commands V2): the weights do not record it. Nor its clips: ESC-50's were repeated
    (``official_clips``, recorded as an export records them)."""
    tensors = unwrap_official(state)
    try:
        cfg = config_from_official(tensors)
        converted = convert_official(tensors, cfg)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    classes, names = class_names(cfg.num_classes)
    return EncoderWeights(cfg, converted, {"source": "official", "arch": "htsat", "file": str(file),
                                           "objective": "classification", "classes": classes,
                                           "class_names": names, "loss": "ce" if cfg.num_classes == 50 else "bce",
                                           "clips": official_clips(cfg)})


def _imagenet_swin(state: dict, file) -> EncoderWeights:
    """An ImageNet Swin's weights as the start of an HTS-AT (``source: imagenet``; no class head, no ``bn0``)."""
    cfg, converted, info = convert_imagenet_swin(state, str(file))
    log.info("%s: ImageNet Swin (%s layout, windows %s, heads %s): patch kernel averaged over RGB, %d keys dropped "
             "(the ImageNet head and buffers)", file, info["layout"], info["windows"], list(cfg.num_heads),
             len(info["dropped"]))
    return EncoderWeights(cfg, converted, {"source": "imagenet", "arch": "htsat", "file": str(file),
                                           "swin_layout": info["layout"], "swin_windows": info["windows"]})


def _warn_compressed(path, weights: EncoderWeights) -> None:
    """Warn that an export of a compressed (coarse) phase takes that phase's fbank, not the full-resolution one."""
    phase, compression = weights.meta.get("phase") or {}, weights.written_in
    audio = weights.meta.get("audio") if isinstance(weights.meta.get("audio"), dict) else {}
    shift = f"{compression.frame_shift_ms(float(audio['frame_shift_ms'])):g} ms frame shift, " \
        if "frame_shift_ms" in audio else ""
    log.warning("%s was exported at phase %s/%s (%s): its input is that phase's fbank (%s%d frames for the clip), not "
                "the full-resolution one; finetune.embedder.load_embedder(path).embed computes it from waveforms, and "
                "load_encoder_state(path).meta holds the phase and the front end ('phase', 'audio', 'norm_stats')",
                path, phase.get("index", "?"), phase.get("of", "?"), compression.describe(), shift,
                weights.config.input_tdim)


def load_encoder(path: str | os.PathLike, **official_kwargs) -> ASTEncoder:
    """Rebuild an :class:`ASTEncoder` from any supported checkpoint, on the CPU, in float32, in eval mode (as
    ``load_classifier`` returns its model: a model trained with stochastic depth, ``drop_path_rate``, would drop
    blocks at random in train mode; call ``.train()`` to fine-tune it). The global torch RNG is left as it was.

    The encoder takes a normalised fbank and knows nothing of the front end that makes it: an export of a
    compressed (coarse) phase takes that phase's fbank (e.g. a 40 ms frame shift at Fshift x4), which is logged as
    a warning. :func:`finetune.embedder.load_embedder` builds the encoder with its front end; the export's metadata
    (:func:`load_encoder_state`'s ``meta``: ``phase``, ``audio``, ``norm_stats``) says what it is.

    Args:
        path: an export, a run directory, or an official SSAST / AST ``.pth``.
        official_kwargs: ``input_fdim``, ``fstride``, ``tstride``, ``input_tdim`` for official files that do
            not store them (see :func:`load_encoder_state`).

    Returns:
        the encoder, in eval mode.

    Raises:
        ValueError: an HTS-AT model, weights that do not fit their config, keywords it does not take.
    """
    weights = load_encoder_state(path, **official_kwargs)
    cfg, state, meta = weights
    if not isinstance(cfg, EncoderConfig):
        raise ValueError(f"{path} holds an {meta.get('arch', '?')} model, not an AST-family encoder; load it with "
                         f"finetune.classifier.load_classifier (or as --init / --ckpt)")
    if meta.get("source") == "export" and not weights.written_in.is_full_resolution:
        _warn_compressed(path, weights)
    with torch.random.fork_rng(devices=[]):  # its random start, overwritten below, leaves the caller's RNG as it was
        encoder = ASTEncoder(cfg)
    result = encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not match the encoder config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return encoder.eval()
