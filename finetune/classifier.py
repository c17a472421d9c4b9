"""Supervised fine-tuning: the classifier (encoder + pooled head) and its trainer Objective.

Head: mean of the patch tokens (SSAST ``ft_avgtok``) or of the prefix tokens (AST: cls and dist), then
LayerNorm and Linear. Training applies waveform mixup (``lam ~ Beta(10, 10)``) and SpecAugment on the
device; the loss is BCE on sigmoid outputs (multi-label, and SSAST's SpeechCommands) or cross-entropy
with (mixed) soft targets. Evaluation gathers every rank's scores and computes mAP / accuracy with
scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.augment import MixupConfig, SpecAugmentConfig, mixup
from common.exports import read_weights, save_weights
from common.data import Batch
from common.distributed import Dist
from common.features import FeaturePipeline
from common.flops import train_step_flops
from common.memory import MemoryEstimate, estimate_training_memory
from common.metrics import compute_metrics
from common.model import ASTEncoder, EncoderConfig, check_pooling, pool_tokens

__all__ = ["HeadConfig", "AugmentConfig", "Classifier", "ClassifierObjective", "class_scores", "save_classifier",
           "load_classifier"]


@dataclass(frozen=True)
class HeadConfig:
    """Args:
        pool: ``mean`` (patch tokens, SSAST) or ``prefix`` (cls + dist tokens, AST)."""

    pool: Literal["mean", "prefix"] = "mean"


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: SpecAugment widths at full resolution and the mixup probability."""

    freqm: int = 0
    timem: int = 0
    mixup: float = 0.0

    @property
    def specaug(self) -> SpecAugmentConfig:
        return SpecAugmentConfig(self.freqm, self.timem)

    @property
    def mixup_config(self) -> MixupConfig:
        return MixupConfig(prob=self.mixup)


class Classifier(nn.Module):
    """Encoder + pooling + LayerNorm + Linear: fbank ``[B, T, F]`` -> logits ``[B, classes]``."""

    def __init__(self, encoder: ASTEncoder, num_classes: int, pool: str = "mean") -> None:
        super().__init__()
        check_pooling(pool, encoder.num_prefix_tokens)
        self.encoder = encoder
        self.pool = pool
        dim = encoder.cfg.embed_dim
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.02)
        nn.init.zeros_(self.head[1].bias)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return pool_tokens(self.encoder.forward_features(x), self.encoder.num_prefix_tokens, self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x))


def class_scores(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-class scores from logits: sigmoid for models trained with BCE, softmax for cross-entropy."""
    return torch.sigmoid(logits.float()) if loss == "bce" else torch.softmax(logits.float(), dim=-1)


def save_classifier(model: Classifier, path: Path, classes: Sequence[str], meta: dict) -> Path:
    """Export encoder + head with the config, class list and front end needed to predict."""
    tensors = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    return save_weights(path, tensors, {**meta, "encoder_config": model.encoder.cfg.to_dict(),
                                        "encoder_prefix": "encoder.",
                                        "classifier": {"classes": list(classes), "pool": model.pool}})


def load_classifier(path: str | Path) -> tuple[Classifier, dict]:
    """A classifier export (or a fine-tuning run directory) -> ``(Classifier, metadata)``."""
    from common.exports import resolve_model_file

    file = resolve_model_file(path)
    tensors, meta = read_weights(file)
    if "classifier" not in meta:
        raise ValueError(f"{file} is an encoder without a classification head (a pretraining export?); "
                         f"fine-tune it first: python finetune/run.py --init {path} --task NAME")
    info = meta["classifier"]
    model = Classifier(ASTEncoder(EncoderConfig.from_dict(meta["encoder_config"])), len(info["classes"]),
                       info["pool"])
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval(), meta


class ClassifierObjective:
    """Supervised fine-tuning as a :class:`common.trainer.Objective`."""

    head_prefixes = ("head.",)

    def __init__(self, classes: Sequence[str], metric: str, loss: str, augment: AugmentConfig,
                 head: HeadConfig = HeadConfig(), names: dict[str, str] | None = None) -> None:
        self.classes = list(classes)
        self.names = dict(names or {})
        self.score_name = metric
        self.loss = loss
        self.augment = augment
        self.specaug = augment.specaug
        self.head = head

    def build_model(self, encoder: ASTEncoder) -> Classifier:
        return Classifier(encoder, len(self.classes), self.head.pool)

    def adapt_state(self, state: dict, old: EncoderConfig, new: EncoderConfig) -> dict:
        return state  # the head does not depend on the token grid

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, targets)
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()  # soft-target CE

    def train_step(self, model, batch: Batch, pipeline: FeaturePipeline, generator: torch.Generator):
        waves, lengths, targets = mixup(batch.waveforms, batch.lengths, batch.targets, self.augment.mixup_config,
                                        generator)
        logits = model(pipeline(waves, lengths, generator))
        return self.criterion(logits, targets), {}

    def evaluate(self, model, batches: Iterator[Batch], pipeline: FeaturePipeline, dist: Dist,
                 generator: torch.Generator) -> dict[str, float]:
        scores, targets, losses = [], [], []
        for batch in batches:
            if not len(batch):
                continue
            logits = model(pipeline(batch.waveforms.to(dist.device), batch.lengths.to(dist.device)))
            target = batch.targets.to(dist.device)
            losses.append(self.criterion(logits, target).item() * len(batch))
            scores.append(class_scores(logits, self.loss).cpu().numpy())
            targets.append(target.cpu().numpy())
        parts = dist.gather_objects((scores, targets, losses))
        all_scores = np.concatenate([s for p in parts for s in p[0]])
        all_targets = np.concatenate([t for p in parts for t in p[1]])
        metrics = compute_metrics(all_targets, all_scores)
        metrics["loss"] = float(sum(x for p in parts for x in p[2]) / len(all_targets))
        metrics["clips"] = float(len(all_targets))
        return metrics

    def _meta_step(self, cfg: EncoderConfig):
        def step(model: Classifier, n: int) -> torch.Tensor:
            logits = model(torch.randn(n, cfg.input_tdim, cfg.num_mel_bins))
            return self.criterion(logits, torch.full_like(logits, 1.0 / logits.shape[-1]))

        return step

    def flops_per_sample(self, cfg: EncoderConfig) -> int:
        return train_step_flops(lambda: self.build_model(ASTEncoder(cfg)), self._meta_step(cfg))

    def memory_estimate(self, cfg: EncoderConfig, batch: int, **setting) -> MemoryEstimate:
        """Bytes per rank to train at geometry ``cfg`` and micro-batch ``batch`` (``setting``: see
        :func:`common.memory.estimate_training_memory`)."""
        return estimate_training_memory(lambda: self.build_model(ASTEncoder(cfg)), self._meta_step(cfg), batch,
                                        **setting)

    def export(self, model: Classifier, path: Path, meta: dict) -> None:
        save_classifier(model, path, self.classes, {**meta, "objective": "classification", "loss": self.loss,
                                                    "metric": self.score_name, "class_names": self.names})
