"""Inference with an exported classifier, shared by the commands that score audio (predict, evaluate, the ONNX
export) and those that read an export's audio settings (embed, the linear probe): the front end, clip length and
clip handling an export was trained with, and its scores of a waveform batch. Nothing here loads the training
stack (``common.cli``), so a library module imports it at its top."""

from __future__ import annotations

import torch
from torch import nn

from common.audio.augment import SpecAugmentConfig
from common.audio.compression import Compression
from common.audio.fbank import check_lengths, check_waveforms
from common.models.arch import architecture_from_meta, official_channels
from finetune.classifier import class_scores

__all__ = ["pipeline_for_export", "clip_for_export", "predict_logits", "predict_scores", "clip_handling"]


def pipeline_for_export(meta: dict) -> nn.Module:
    """The (evaluation) front end an export was trained with."""
    arch = architecture_from_meta(meta)
    phase = meta.get("phase", {})
    compression = Compression(phase.get("compression", "none"), phase.get("factor", 1),
                              phase.get("patch_transfer", "pi"))
    return arch.frontend(arch.export_geometry(meta), compression, SpecAugmentConfig())


def clip_for_export(meta: dict) -> tuple[int, int]:
    """``(sample rate, clip samples)`` an export's model takes its audio at."""
    arch = architecture_from_meta(meta)
    return arch.sample_rate, arch.clip_samples


def predict_logits(model: nn.Module, meta: dict, waveforms: torch.Tensor, lengths: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The classifier's logits of a waveform batch, through the export's front end.

    Args:
        waveforms: ``[B, S]`` float samples in [-1, 1] at the export's rate (``clip_for_export``), a tensor or a
            numpy array, on the model's device.
        lengths: ``[B]`` valid samples per clip, ``1..S`` (a tensor, a list or an array); None: every clip is
            ``S`` samples long.

    Raises:
        ValueError: integer or complex samples, more than 2 dimensions, channels last (``[S, C]``)
            (``common.audio.fbank.check_waveforms``), lengths of another shape or outside ``1..S``.
    """
    waveforms = check_waveforms(waveforms, "predict_logits")
    clips = 1 if waveforms.dim() == 1 else len(waveforms)
    if lengths is None:
        lengths = [waveforms.shape[-1]] * clips
    lengths = check_lengths(lengths, clips, waveforms.shape[-1], "predict_logits", read=True)
    pipeline = pipeline_for_export(meta).to(waveforms.device)
    with torch.no_grad():
        return model(pipeline(waveforms, lengths))


def predict_scores(model: nn.Module, meta: dict, waveforms: torch.Tensor, lengths: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Per-class scores (sigmoid for BCE-trained models, softmax otherwise) of a waveform batch (as
    :func:`predict_logits` takes it)."""
    waveforms = check_waveforms(waveforms, "predict_scores")  # named as called (predict_logits checks it too)
    return class_scores(predict_logits(model, meta, waveforms, lengths), meta.get("loss", "ce"))


def clip_handling(meta: dict) -> dict:
    """How the export's validation filled a short clip (``pad``: ``zeros`` or ``repeat``), cut a long one
    (``crop``: ``start`` or ``center``) and read a multi-channel file (``channels``: ``first`` or ``mean``);
    exports without the record did as AST: zeros, from the start, the first channel. An official HTS-AT checkpoint
    hears the channels' mean, as its code read its data, and its weights' record says how its clips were filled
    (``common.models.htsat.official.official_clips``: ESC-50's 50-class head heard each clip repeated)."""
    clips = meta.get("clips") if isinstance(meta.get("clips"), dict) else {}
    official = official_channels(meta.get("arch", "ast")) if meta.get("source") == "official" else "first"
    return {"pad": clips.get("pad", "zeros"), "crop": clips.get("crop", "start"),
            "channels": clips.get("channels", official)}
