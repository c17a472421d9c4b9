"""Supervised fine-tuning: the classification objective, and classifier exports.

The classifier is the architecture's (``common.models.arch``): for the AST family the encoder's tokens pooled
(mean of the patch tokens, SSAST's ``ft_avgtok``, or of the prefix tokens, AST's ``(cls + dist) / 2``, as
the init's own code pools by default: ``common.phases.init.init_pool``), then LayerNorm and Linear; for HTS-AT
its token-semantic head. Training applies mixup (AST: waveforms, ``lam ~ Beta(10, 10)``, mixed targets;
HTS-AT: spectrograms inside the model, ``Beta(0.5, 0.5)``, unmixed targets), SpecAugment and (if asked)
SSAST's fbank noise on the device; the loss is BCE on sigmoid outputs (multi-label, and SSAST's
SpeechCommands) or cross-entropy with (mixed) soft targets. Evaluation gathers every rank's scores and
computes mAP / accuracy with scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.audio.augment import MixupConfig, NoiseConfig, SpecAugmentConfig, mixup, mixup_weights
from common.data.bad_audio import TooMuchBadAudio
from common.data.clips import Batch
from common.metrics import compute_metrics, standard_error
from common.models.arch import architecture_for, architecture_from_meta
from common.models.ast.arch import Classifier
from common.models.exports import is_export, read_weights, resolve_model_file, save_weights
from common.models.fit import load_checked
from common.models.flops import train_step_flops
from common.models.hf import hf_classifier_export, is_hf_directory
from common.models.memory import MemoryEstimate, estimate_training_memory
from common.models.weights import load_encoder_state
from common.system.device import to_device
from common.system.distributed import Dist

__all__ = ["HeadConfig", "AugmentConfig", "Classifier", "ClassifierObjective", "class_scores", "metric_scores",
           "save_classifier",
           "load_classifier"]


@dataclass(frozen=True)
class HeadConfig:
    """Args:
        pool: ``mean`` of the patch tokens (SSAST's ``ft_avgtok``), ``prefix``: mean of the prefix tokens
            (AST's ``(cls + dist) / 2``; the cls token when there is one), ``tscam`` (HTS-AT's
            token-semantic head, its only one), or ``auto``: follow the init (``common.phases.init.init_pool``)."""

    pool: Literal["auto", "mean", "prefix", "tscam"] = "auto"


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation.

    Args:
        freqm, timem: SpecAugment's largest frequency / time mask at full resolution.
        freq_stripes, time_stripes: masks per clip and axis (AST: 1; HTS-AT: 2 of widths 8 and 64).
        mixup: probability that a clip is mixed with another.
        mixup_alpha: Beta(alpha, alpha) of the mixing weight (AST: 10; HTS-AT: 0.5).
        mixup_on: ``waveform`` (AST) or ``spectrogram`` (HTS-AT; see :class:`common.audio.augment.MixupConfig`).
        mixup_targets: ``mixed`` (AST) or ``unmixed`` (HTS-AT).
        noise: SSAST's fbank noise and roll of up to 10 frames (``common.audio.augment.fbank_noise``; on in
            SSAST's ESC-50 and SpeechCommands recipes).
    """

    freqm: int = 0
    timem: int = 0
    freq_stripes: int = 1
    time_stripes: int = 1
    mixup: float = 0.0
    mixup_alpha: float = 10.0
    mixup_on: Literal["waveform", "spectrogram"] = "waveform"
    mixup_targets: Literal["mixed", "unmixed"] = "mixed"
    noise: bool = False

    def __post_init__(self) -> None:
        for name in ("freqm", "timem", "freq_stripes", "time_stripes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.mixup <= 1:
            raise ValueError(f"mixup must be a probability in [0, 1], got {self.mixup}")
        if not 0 < self.mixup_alpha < math.inf:  # also NaN
            raise ValueError(f"mixup_alpha must be positive and finite, got {self.mixup_alpha}")

    @property
    def specaug(self) -> SpecAugmentConfig:
        return SpecAugmentConfig(self.freqm, self.timem, self.freq_stripes, self.time_stripes)

    @property
    def noise_config(self) -> NoiseConfig:
        return NoiseConfig(enabled=self.noise)

    @property
    def mixup_config(self) -> MixupConfig:
        return MixupConfig(self.mixup, self.mixup_alpha, self.mixup_on, self.mixup_targets)


def class_scores(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-class scores from logits: sigmoid for models trained with BCE, softmax for cross-entropy."""
    return torch.sigmoid(logits.float()) if loss == "bce" else torch.softmax(logits.float(), dim=-1)


def metric_scores(logits: torch.Tensor) -> torch.Tensor:
    """The scores the metrics rank: every class's sigmoid whatever the loss, as AST's validation scores its
    predictions (cross-entropy tasks too). A class's ranking of the clips is its logit's, as HTS-AT's raw
    ``clip_ce`` outputs rank them; the argmax, and so the accuracy, is the softmax's. In float64: a float32
    sigmoid is exactly 1 from a logit of 16.6 (AST's, whose ties there moved its accuracy and mAP), a float64
    one from 36.7."""
    return torch.sigmoid(logits.double())


def save_classifier(model: nn.Module, path: Path, classes: Sequence[str], meta: dict) -> Path:
    """Export a classifier (its encoder under ``encoder.``) with the config, class list and front end needed
    to predict (``meta`` carries the architecture's ``export_meta`` and the phase)."""
    return save_weights(path, model.state_dict(), {**meta, "encoder_config": model.encoder.cfg.to_dict(),
                                                   "encoder_prefix": "encoder.",
                                                   "classifier": {"classes": list(classes), "pool": model.pool}})


def _checkpoint_with_head(file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` as an export would hold them, for another project's checkpoint that has a
    classification head of its own (an official HTS-AT checkpoint: AudioSet's 527 classes, ESC-50's 50)."""
    weights = load_encoder_state(file)
    if "classes" not in weights.meta:
        raise ValueError(f"{file} holds an encoder without a classification head; fine-tune it first: "
                         f"python finetune/run.py --init {file} --task NAME")
    pool = architecture_for(weights.config).resolve_pool("auto", weights)
    meta = {**weights.meta, "encoder_config": weights.config.to_dict(), "loss": weights.meta.get("loss", "bce"),
            "classifier": {"classes": weights.meta["classes"], "pool": pool}}
    return {f"encoder.{k}": v for k, v in weights.state.items()}, meta


def load_classifier(path: str | Path) -> tuple[nn.Module, dict]:
    """A classifier export, a fine-tuning run directory, or another project's checkpoint with a head of
    its own (an official HTS-AT ``.ckpt``), or a Hugging Face AST directory -> ``(classifier, metadata)``, the
    classifier in eval mode; the global torch RNG is left as it was."""
    if is_hf_directory(path):
        file, (tensors, meta) = path, hf_classifier_export(path)
    else:
        file = resolve_model_file(path)
        exported = file.suffix == ".safetensors" and is_export(file)
        tensors, meta = read_weights(file) if exported else _checkpoint_with_head(file)
    if "classifier" not in meta:
        raise ValueError(f"{file} is an encoder without a classification head (a pretraining export?); "
                         f"fine-tune it first: python finetune/run.py --init {path} --task NAME")
    if "encoder_config" not in meta:
        raise ValueError(f"{file} has no encoder_config in its metadata")
    info = meta["classifier"]
    arch = architecture_from_meta(meta)
    try:
        with torch.random.fork_rng(devices=[]):  # its random start, overwritten below, leaves the caller's RNG be
            model = arch.build_classifier(arch.export_geometry(meta), len(info["classes"]), info["pool"])
    except ValueError as err:  # a pooling the architecture does not have
        raise ValueError(f"{file}: metadata classifier: {err}") from None
    return load_checked(model, tensors, file).eval(), meta


class ClassifierObjective:
    """Supervised fine-tuning as a :class:`common.training.objective.Objective` (any architecture)."""

    def __init__(self, classes: Sequence[str], metric: str, loss: str, augment: AugmentConfig,
                 head: HeadConfig = HeadConfig(), names: dict[str, str] | None = None,
                 head_init: dict[str, torch.Tensor] | None = None) -> None:
        """``head_init``: weights the head starts from (``finetune/run.py --keep-head``) instead of random ones."""
        self.head_init = head_init
        self.classes = list(classes)
        self.names = dict(names or {})
        self.score_name = metric
        self.loss = loss
        self.augment = augment
        self.specaug = augment.specaug
        self.head = head

    def build_model(self, geometry) -> nn.Module:
        """The architecture's classifier (``head.pool: auto`` here is the pooling of a model from scratch;
        ``finetune/run.py`` resolves it against the init first), its head from ``head_init`` if given."""
        arch = architecture_for(geometry)
        model = arch.build_classifier(geometry, len(self.classes), arch.resolve_pool(self.head.pool, None))
        if self.head_init is not None and not next(model.head.parameters()).is_meta:  # (FLOPs count on meta)
            model.head.load_state_dict({k: v.float() for k, v in self.head_init.items()})
        return model

    def adapt_state(self, state: dict, old, new) -> dict:
        return state  # the head does not depend on the token grid

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` against (soft) ``targets`` ``[B, classes]``, in float32: BCE with logits, or
        cross-entropy against a distribution (mixup's mixed targets)."""
        logits = logits.float()
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, targets)
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()  # soft-target CE

    def train_step(self, model: nn.Module, batch: Batch, pipeline: nn.Module,
                   generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch with the run's augmentation (mixup on the waveforms or the fbank, SpecAugment,
        noise, all drawn from ``generator``), and nothing more to log."""
        cfg = self.augment.mixup_config
        waves, lengths, targets = batch.waveforms, batch.lengths, batch.targets
        if cfg.on == "waveform":
            waves, lengths, targets = mixup(waves, lengths, targets, cfg, generator)
        x = pipeline(waves, lengths, generator, noise=self.augment.noise_config)
        lam = mixup_weights(len(batch), cfg, generator) if cfg.on == "spectrogram" else None
        if lam is not None:
            lam = to_device(lam, x.device)
            if cfg.targets == "mixed":
                targets = lam[:, None] * targets + (1 - lam[:, None]) * targets.flip(0)
        return self.criterion(model(x, mixup_lambda=lam), targets), {}

    def evaluate(self, model: nn.Module, batches: Iterator[Batch], pipeline: nn.Module, dist: Dist,
                 generator: torch.Generator) -> dict[str, float]:
        """Validation metrics over every rank's clips (the task's metrics, its score's standard error, the loss and
        the clips counted), identical on every rank.

        Raises:
            TooMuchBadAudio: no clip could be read.
        """
        scores, targets, losses = [], [], []
        for batch in batches:
            if not len(batch):
                continue
            logits = model(pipeline(batch.waveforms.to(dist.device), batch.lengths.to(dist.device)))
            target = batch.targets.to(dist.device)
            losses.append(self.criterion(logits, target).item() * len(batch))
            scores.append(metric_scores(logits).cpu().numpy())
            targets.append(target.cpu().numpy().copy())  # a view would keep the batch (its shared memory) to the end
        parts = dist.gather_objects((scores, targets, losses))
        if not any(len(t) for p in parts for t in p[1]):  # every clip read was bad (or none was read)
            raise TooMuchBadAudio("validation: none of the clips read could be used; the reasons are in the run's "
                                  "bad_audio.tsv (split 'valid'); check the validation manifests")
        all_scores = np.concatenate([s for p in parts for s in p[0]])
        all_targets = np.concatenate([t for p in parts for t in p[1]])
        metrics = compute_metrics(all_targets, all_scores)
        # the score's own noise on this set (common.phases.criteria: a change within it decides nothing)
        metrics[f"{self.score_name}_se"] = standard_error(self.score_name, all_targets, all_scores)
        metrics["loss"] = float(sum(x for p in parts for x in p[2]) / len(all_targets))
        metrics["clips"] = len(all_targets)
        return metrics

    def _meta_step(self, geometry):
        arch = architecture_for(geometry)

        def step(model: nn.Module, n: int) -> torch.Tensor:
            logits = model(arch.example_input(geometry, n))
            return self.criterion(logits, torch.full_like(logits, 1.0 / logits.shape[-1]))

        return step

    def flops_per_sample(self, geometry) -> int:
        return train_step_flops(lambda: self.build_model(geometry), self._meta_step(geometry))

    def memory_estimate(self, geometry, batch: int, **setting) -> MemoryEstimate:
        """Bytes per rank to train at ``geometry`` and micro-batch ``batch`` (``setting``: see
        :func:`common.models.memory.estimate_training_memory`)."""
        return estimate_training_memory(lambda: self.build_model(geometry), self._meta_step(geometry), batch,
                                        **setting)

    def score_settings(self, geometry) -> dict:
        """Nothing: mAP and accuracy on the same clips compare whatever the model's resolution."""
        return {}

    def export(self, model: nn.Module, path: Path, meta: dict) -> None:
        save_classifier(model, path, self.classes, {**meta, "objective": "classification", "loss": self.loss,
                                                    "metric": self.score_name, "class_names": self.names})
