"""Evaluating exported classifiers, and the cross-validation summary.

An export carries its architecture and the front end it was trained with (audio settings and the
compression of its last phase), so the features are made exactly as in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from torch import nn

from common.models.arch import architecture_from_meta
from common.audio.augment import SpecAugmentConfig
from common.audio.compression import Compression
from common.data.loader import eval_loader
from common.metrics import compute_metrics
from finetune.classifier import class_scores, load_classifier

__all__ = ["pipeline_for_export", "clip_for_export", "clip_handling", "evaluate_export", "cross_validation_summary"]


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


def predict_scores(model: nn.Module, meta: dict, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-class scores (sigmoid for BCE-trained models, softmax otherwise) of a waveform batch."""
    pipeline = pipeline_for_export(meta).to(waveforms.device)
    with torch.no_grad():
        logits = model(pipeline(waveforms, lengths))
    return class_scores(logits, meta.get("loss", "ce"))


def clip_handling(meta: dict) -> dict:
    """How the export's validation filled a short clip (``pad``: ``zeros`` or ``repeat``) and cut a long one
    (``crop``: ``start`` or ``center``); exports without the record did as AST: zeros, from the start."""
    clips = meta.get("clips") if isinstance(meta.get("clips"), dict) else {}
    return {"pad": clips.get("pad", "zeros"), "crop": clips.get("crop", "start")}


def evaluate_export(path: str | Path, manifests: Sequence[str], classes: Sequence[str], batch_size: int = 32,
                    num_workers: int = 2, device: str | torch.device = "cpu", tracker=None) -> dict[str, float]:
    """mAP / accuracy of an exported classifier on ``manifests`` (one process); ``tracker`` counts bad and
    resampled clips (a run's :class:`~common.data.loader.BadAudioTracker` split, or a fresh one without a limit)."""
    model, meta = load_classifier(path)
    if list(meta["classifier"]["classes"]) != list(classes):
        raise ValueError(f"{path} was trained on other classes than the task's class list")
    model.to(device)
    sample_rate, clip_samples = clip_for_export(meta)
    clips = clip_handling(meta)
    loader = eval_loader(manifests, classes, clip_samples, sample_rate, batch_size, num_workers, crop=clips["crop"],
                         pad=clips["pad"], tracker=tracker)
    scores, targets = [], []
    for batch in loader.batches(epochs=1):
        if len(batch):
            scores.append(predict_scores(model, meta, batch.waveforms.to(device), batch.lengths.to(device)).cpu())
            targets.append(batch.targets)
    if not scores:
        raise ValueError(f"no usable clip in {', '.join(map(str, manifests))}")
    metrics = compute_metrics(torch.cat(targets).numpy(), torch.cat(scores).numpy())
    metrics["clips"] = float(sum(len(t) for t in targets))
    return metrics


def cross_validation_summary(fold_evals: Sequence[Sequence[dict]], metric: str) -> dict:
    """AST's ESC-50 protocol: the epoch with the best accuracy averaged over the folds, and that mean.

    Only the final phase's epochs compete (the paper reports the final, full-resolution phase).

    Args:
        fold_evals: per fold, the ledger's evaluation records (``phase``, ``epoch``, ``metrics``); records
            without an ``epoch`` (e.g. a weight average) and records of earlier phases are ignored.
        metric: the metric to average.

    Returns:
        ``{"metric", "per_epoch": [{"phase", "epoch", "mean", "folds"}], "best": {...}}``, and ``"left_out"``
        (``[{"phase", "epoch", "folds": [fold numbers that scored it]}]``) where some folds scored epochs the others
        did not (a fold that stopped early, ``train.stop_when_surpassing``): only epochs every fold scored are
        averaged.
    """
    if not fold_evals:
        raise ValueError("no folds to summarise")
    final = max((e["phase"] for evals in fold_evals for e in evals), default=0)
    tables = [{(e["phase"], e["epoch"]): e["metrics"][metric] for e in evals if "epoch" in e and e["phase"] == final}
              for evals in fold_evals]
    common = sorted(set.intersection(*(set(t) for t in tables)))
    if not common:
        raise ValueError("the folds share no evaluated epoch")
    per_epoch = [{"phase": p, "epoch": e, "folds": [t[(p, e)] for t in tables],
                  "mean": float(np.mean([t[(p, e)] for t in tables]))} for p, e in common]
    best = max(per_epoch, key=lambda row: row["mean"])
    summary = {"metric": metric, "per_epoch": per_epoch, "best": best}
    partial = sorted(set.union(*(set(t) for t in tables)) - set(common))
    if partial:
        summary["left_out"] = [{"phase": p, "epoch": e, "folds": [k + 1 for k, t in enumerate(tables) if (p, e) in t]}
                               for p, e in partial]
    return summary
