"""HTS-AT (a Swin-T with a token-semantic head) as an architecture; the model itself is :mod:`common.models.htsat`.

- config: :class:`~common.models.htsat.HTSATConfig`; a phase's geometry: :class:`HTSATPhase` (the config and the
  folded image of :func:`common.models.htsat.geometry`);
- front end: :class:`~common.models.htsat.HTSATFrontEnd` at 32 kHz (STFT at the phase's hop, slaney mel, dB;
  SpecAugment stripes drawn here and applied by the model after its ``bn0``);
- compression: Fshift x4 as design D1 (a 128 x 128 image), factor 2 as D2 (128 x 256), Avg/Max pooling
  into the same geometry, ``patch`` as 4 x 4C patches (``common/models/htsat/geometry.py``);
- phase change: the relative-position bias tables of the stages whose window changes
  (``transfer.rel_pos_bias``), the patch kernel for ``patch`` phases (:mod:`common.models.htsat.adapt`);
- classifier: the model's own token-semantic head (``clipwise_output``); the embedding is its latent.
SSAST's masked-patch pretraining is defined for ViT encoders and is not available here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from common.audio.compression import Compression
from common.models.fit import load_checked
from common.models.htsat import HEAD_PREFIXES, HTSAT, HTSATConfig, HTSATFrontEnd, SpecAugmentStripes, adapt_state_dict
from common.models.htsat import geometry as htsat_geometry
from common.models.htsat.adapt import fit_tables
from common.models.htsat.geometry import Geometry
from common.models.htsat.imagenet import SWIN_FIELDS

__all__ = ["HTSATArch", "HTSATPhase", "HTSATClassifier", "HTSATPipeline", "weight_conflicts"]

log = logging.getLogger(__name__)


def weight_conflicts(weights, cfg: HTSATConfig) -> list[str]:
    """What ``cfg`` changes of the settings HTS-AT ``weights`` (an :class:`~common.models.weights.EncoderWeights`)
    fix, as ``"key old -> new"``: an ImageNet Swin's sizes (:data:`SWIN_FIELDS`), every other file's whole config but
    its dropout and its classes (the head starts afresh). Checked before a run (``common.phases.init``) and again
    where the weights load."""
    size = {k: v for k, v in weights.config.to_dict().items() if k != "num_classes"}
    want = {k: v for k, v in cfg.to_dict().items() if k != "num_classes"}
    fixed = SWIN_FIELDS if weights.meta.get("source") == "imagenet" else \
        [k for k in size if k not in ("drop_path_rate", "drop_rate", "attn_drop_rate")]
    return [f"{k} {size[k]} -> {want[k]}" for k in sorted(fixed) if size[k] != want[k]]


@dataclass(frozen=True)
class HTSATPhase:
    """One phase's HTS-AT: the model config and the phase's input geometry."""

    cfg: HTSATConfig
    geom: Geometry

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid of the first Swin stage (64 x 64 at full resolution)."""
        return self.geom.grid

    @property
    def num_patches(self) -> int:
        return self.geom.tokens

    @property
    def num_tokens(self) -> int:
        return self.geom.tokens


class HTSATPipeline(nn.Module):
    """The front end with the interface the objectives call: ``(waveforms, lengths, generator, noise)``."""

    def __init__(self, frontend: HTSATFrontEnd) -> None:
        super().__init__()
        self.frontend = frontend

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None,
                generator: torch.Generator | None = None, noise=None) -> torch.Tensor:
        if noise is not None and getattr(noise, "enabled", False):
            raise ValueError("augment.noise is SSAST's fbank noise (model.arch: ast); HTS-AT does not define it")
        return self.frontend(waveforms, lengths, generator)


class HTSATClassifier(nn.Module):
    """HTS-AT with its token-semantic head: model input -> clipwise logits ``[B, K]``.

    ``model.encoder`` is the :class:`~common.models.htsat.HTSAT`; ``embedding`` is its ``latent_output``.
    """

    pool = "tscam"
    head_prefixes = tuple(f"encoder.{p}" for p in HEAD_PREFIXES)  # the task head (``optim.head_lr_scale``)

    def __init__(self, model: HTSAT) -> None:
        super().__init__()
        self.encoder = model

    def forward(self, x: torch.Tensor, mixup_lambda: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(x, mixup_lambda)["clipwise_output"]

    def embedding(self, x: torch.Tensor, mixup_lambda: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(x, mixup_lambda)["latent_output"]


@dataclass(frozen=True)
class HTSATArch:
    """HTS-AT for a run.

    Args:
        base: the model config (its front end, Swin size and classes).
    """

    base: HTSATConfig

    name: ClassVar[str] = "htsat"
    channels: ClassVar[str] = "mean"  # librosa.load(mono=True) in the official data preparation
    # the bicubic stretch of its normalised spectrogram to the image's frames (model.py), behind the learnable bn0
    nondeterministic_on_cuda: ClassVar[str] = "the backward pass of HTS-AT's bicubic resize (upsample_bicubic2d)"
    normalises_input: ClassVar[bool] = True  # its own BatchNorm over the mel bins (bn0), no corpus statistics

    @property
    def sample_rate(self) -> int:
        return self.base.sample_rate

    @property
    def clip_samples(self) -> int:
        return self.base.clip_samples

    def geometry(self, compression: Compression) -> HTSATPhase:
        return HTSATPhase(self.base, htsat_geometry(self.base, compression))

    def frontend(self, geometry: HTSATPhase, compression: Compression, specaug) -> HTSATPipeline:
        stripes = SpecAugmentStripes(time_width=specaug.timem, time_stripes=specaug.time_stripes,
                                     freq_width=specaug.freqm, freq_stripes=specaug.freq_stripes)
        return HTSATPipeline(HTSATFrontEnd(geometry.cfg, geometry.geom, stripes))

    def build_encoder(self, geometry: HTSATPhase) -> HTSAT:
        """The HTS-AT model (with the token-semantic head of ``base.num_classes``)."""
        return HTSAT(geometry.cfg, geometry.geom)

    def features(self, encoder: HTSAT, x: torch.Tensor, pool: str, layer: int | None = None) -> torch.Tensor:
        """The clip embedding ``[B, D]``: the mean of the last stage's tokens (``latent_output``)."""
        if layer is not None:
            raise ValueError("layer: HTS-AT's embedding is its last stage's (latent_output); leave layer unset")
        return encoder(x)["latent_output"]

    def build_classifier(self, geometry: HTSATPhase, num_classes: int, pool: str) -> HTSATClassifier:
        if pool != "tscam":
            raise ValueError(f"head.pool: HTS-AT classifies with its token-semantic head ('tscam'), got {pool!r}")
        return HTSATClassifier(HTSAT(geometry.cfg.replace(num_classes=num_classes), geometry.geom))

    def resolve_pool(self, pool: str, init) -> str:
        """HTS-AT has one classification head: ``auto`` (or ``tscam``) is it."""
        if pool not in ("auto", "tscam"):
            raise ValueError(f"head.pool: HTS-AT classifies with its token-semantic head; use auto, got {pool!r}")
        return "tscam"

    def adapt_state(self, state: dict, old: HTSATPhase, new: HTSATPhase, transfer, patch_mode: str,
                    prefix: str = "") -> dict:
        return adapt_state_dict(state, self.base, old.geom, new.geom, transfer.rel_pos_bias, patch_mode, prefix)

    def load_weights(self, encoder: HTSAT, weights, geometry: HTSATPhase, pos_mode: str, patch_mode: str,
                     table_mode: str = "timm") -> None:
        """Load HTS-AT weights (full resolution unless the export says otherwise) into ``encoder``.

        The class-specific head (``tscam_conv``) always starts afresh, as the official code drops it from any
        checkpoint it fine-tunes (``main.py``; a head of the same size may hold other classes). ImageNet Swin weights
        (``source: imagenet``, :mod:`common.models.htsat.imagenet`) fix only the Swin's sizes: every relative-position
        table is fitted to its block's window in ``geometry`` and ``bn0`` starts afresh with the head. Tables are
        resized as ``table_mode`` says (the recipe's ``transfer.rel_pos_bias``, as at its phase changes).
        """
        cfg = weights.config
        if not isinstance(cfg, HTSATConfig):
            raise ValueError(f"--init holds {type(cfg).__name__} weights (model.arch: ast); this run trains HTS-AT")
        imagenet = weights.meta.get("source") == "imagenet"  # a Swin backbone: only its sizes are fixed
        changed = weight_conflicts(weights, geometry.cfg)
        if changed:
            raise ValueError("--init: the HTS-AT weights were trained with another model config ("
                             + ", ".join(changed) + ")")
        fresh = HEAD_PREFIXES
        if imagenet:  # every table fitted to its block's window here; bn0 and the head start afresh
            state, changes = fit_tables(weights.state, geometry.cfg, geometry.geom, table_mode, patch_mode)
            fresh = HEAD_PREFIXES + ("bn0.",)
            log.info("--init %s: ImageNet Swin backbone loaded%s; bn0 and the token-semantic head start afresh",
                     weights.meta.get("file", ""), "".join(f"; {line}" for line in changes))
        else:
            source = HTSATArch(cfg).export_geometry(weights.meta).geom
            state = adapt_state_dict(weights.state, cfg, source, geometry.geom, table_mode, patch_mode)
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
        # a missing, unexpected or wrongly shaped tensor: one error naming the file and the keys
        load_checked(encoder, state, f"--init {weights.meta.get('file', '')}".rstrip(), fresh)

    def example_input(self, geometry: HTSATPhase, batch: int) -> torch.Tensor:
        return torch.randn(batch, 1, geometry.geom.stft_frames, geometry.cfg.mel_bins)

    def export_meta(self, geometry: HTSATPhase) -> dict:
        return {"arch": self.name}

    def export_geometry(self, meta: dict) -> HTSATPhase:
        """The phase the export was written in (``meta["phase"]``; full resolution without one)."""
        phase = meta.get("phase", {})
        return self.geometry(Compression(phase.get("compression", "none"), phase.get("factor", 1),
                                         phase.get("patch_transfer", "pi")))
