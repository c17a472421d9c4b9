"""From waveforms to embeddings: a frozen model of any ``--init``, its front end, a layer and a pooling.

An :class:`Embedder` turns a batch of clips (waveforms at the model's rate, each filled to its clip as the model
was trained: zero-padded, or repeated for a model trained with ``data.pad: repeat``) into

- a **clip** embedding ``[B, D]`` per clip, pooled from the tokens of one layer: ``mean`` of the patch
  tokens (SSAST's ``ft_avgtok``), ``prefix``: the mean of the prefix tokens (AST's ``(cls + dist) / 2``),
  ``cls``: the first prefix token alone; HTS-AT: ``mean``, its latent (the mean of the last stage's tokens,
  ``latent_output``); ``none`` writes no clip embedding;
- **frame** embeddings ``[B, T, D]``, one per time step of the token grid: the AST family's patch tokens
  averaged over the frequency rows of each time column; HTS-AT's last-stage tokens (the grid its
  token-semantic head reads) averaged over frequency, per time step;

with each time step's start and end in seconds within the clip (:meth:`Embedder.step_times`): an AST
column covers the fbank frames under its patch (``tstride``, ``tshape``, the phase's frame shift and
pooling, a frame's 25 ms window), an HTS-AT step an equal share of the span its image stretches over (STFT
frame centres ``0 .. (frames - 1) x hop``).

The layer is the linear probe's: ``None`` is every block and the final norm (what fine-tuning pools),
``N`` the output of block N (1-based; negative counts from the end: -1 is the last block *before* the final
norm). HTS-AT's embeddings are its last stage's (``layer`` unset).

:func:`load_embedder` builds one from anything fine-tuning's ``--init`` takes (a run directory, an export
at the geometry and front end of its phase, an official SSAST / AST ``.pth``, timm ImageNet ViT weights,
a Hugging Face AST directory, an official HTS-AT checkpoint or an HTS-AT run / export); the linear probe
builds one around the encoder it fitted to its task (:meth:`Embedder.from_arch`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.audio.augment import SpecAugmentConfig
from common.audio.compression import Compression
from common.audio.fbank import NORM_STATS, NormStats, check_lengths, check_waveforms, resolve_norm_stats
from common.audio.pipeline import AudioConfig, FeaturePipeline
from common.data.audio_file import repeat_to
from common.models.arch import Architecture, architecture_for, architecture_from_meta
from common.models.exports import resolve_model_file
from common.models.hf import is_hf_directory
from common.models.htsat import HTSAT
from common.models.htsat.model import unfold
from common.models.spec import ModelSpec
from common.phases.init import init_pos_mode, load_init, task_encoder_config
from finetune.embed_store import POOLS
from finetune.inference import clip_handling

__all__ = ["EmbedOutput", "Embedder", "load_embedder", "model_digest", "parse_layer"]

log = logging.getLogger(__name__)


def parse_layer(text: str | int | None) -> int | None:
    """``--layer``: ``final`` (None: every block and the final norm) or a block number (1-based, negative from
    the end)."""
    if text is None or (isinstance(text, str) and text.lower() in ("final", "last", "norm")):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--layer: 'final' or a block number (1-based, negative from the end), got {text!r}") \
            from None
    if value == 0:
        raise ValueError("--layer: block numbers are 1-based (negative from the end); 0 names no block")
    return value


@dataclass(frozen=True)
class EmbedOutput:
    """The embeddings of a batch of clips (float32, on the CPU).

    Attributes:
        clip: ``[B, D]``, or None with pooling ``none``.
        frames: ``[B, T, D]``, or None without frames.
    """
    clip: np.ndarray | None
    frames: np.ndarray | None


class Embedder:
    """A frozen encoder with its front end: waveforms ``[B, S]`` -> :class:`EmbedOutput`.

    Args:
        encoder: an :class:`~common.models.ast.encoder.ASTEncoder` or an :class:`~common.models.htsat.HTSAT`.
        pipeline: the evaluation front end (waveforms, lengths -> model input) at the encoder's geometry.
        sample_rate, clip_samples: the audio one clip is (resampled and filled to).
        layer: see the module docstring.
        pool: ``mean``, ``prefix``, ``cls`` or ``none`` (HTS-AT: ``mean`` or ``none``; its classifier's name for
            the latent, ``tscam``, is taken as ``mean``).
        frames: also compute frame embeddings.
        device: where the model runs.
        info: what :meth:`describe` adds (the init, the front end's statistics).
        channels: how a multi-channel file is read for it: ``first`` or ``mean`` (as the model was trained).
        pad: how a clip shorter than ``clip_samples`` is filled: ``zeros`` or ``repeat`` (the clip repeated and cut
            to ``clip_samples``, as ``data.pad: repeat`` trained the model and ``predict`` reads it).
    """

    def __init__(self, encoder: nn.Module, pipeline: nn.Module, sample_rate: int, clip_samples: int, *,
                 layer: int | None = None, pool: str = "mean", frames: bool = False,
                 device: str | torch.device = "cpu", info: dict | None = None, channels: str = "first",
                 pad: str = "zeros") -> None:
        if pad not in ("zeros", "repeat"):
            raise ValueError(f"pad: 'zeros' or 'repeat' (how the model was trained to fill a short clip), got {pad!r}")
        self.channels = channels
        self.pad = pad

        self.htsat = isinstance(encoder, HTSAT)
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.pipeline = pipeline.to(self.device).eval()
        self.sample_rate = int(sample_rate)
        self.clip_samples = int(clip_samples)
        self.layer = layer
        self.pool = self._check_pool(pool)
        self.frames = bool(frames)
        self.info = dict(info or {})
        self._check_layer()
        if self.pool == "none" and not self.frames:
            raise ValueError("--pool none writes no clip embedding: add --frames (frame embeddings), or pool")

    # ---------------------------------------------------------------------------------------- building
    @classmethod
    def from_arch(cls, encoder: nn.Module, arch: Architecture, *, layer: int | None = None, pool: str = "mean",
                  frames: bool = False, device: str | torch.device = "cpu", info: dict | None = None,
                  pad: str = "zeros") -> "Embedder":
        """Around a full-resolution encoder and its architecture (``common.models.arch``), with the architecture's
        evaluation front end (what the linear probe uses)."""
        geometry = arch.geometry(Compression())
        pipeline = arch.frontend(geometry, Compression(), SpecAugmentConfig())
        return cls(encoder, pipeline, arch.sample_rate, arch.clip_samples, layer=layer, pool=pool, frames=frames,
                   device=device, info=info, pad=pad)

    def _check_pool(self, pool: str) -> str:
        if self.htsat:
            if pool in ("auto", "mean", "tscam"):
                return "mean"
            if pool == "none":
                return pool
            raise ValueError(f"--pool {pool}: HTS-AT has no prefix tokens; its clip embedding is the mean of its last "
                             f"stage's tokens (--pool mean), or none")
        if pool not in POOLS or pool == "auto":
            raise ValueError(f"--pool: choose one of mean, prefix, cls, none, got {pool!r}")
        if pool in ("prefix", "cls") and self.encoder.num_prefix_tokens == 0:
            raise ValueError(f"--pool {pool}: this encoder has no prefix tokens; use --pool mean")
        return pool

    def _check_layer(self) -> None:
        if self.layer is None:
            return
        if self.htsat:
            raise ValueError(f"--layer {self.layer}: HTS-AT's embeddings are its last stage's (the latent its head "
                             f"reads); leave --layer unset")
        depth = len(self.encoder.blocks)
        if not (1 <= self.layer <= depth or -depth <= self.layer <= -1):
            raise ValueError(f"--layer {self.layer}: this encoder has {depth} blocks: 1..{depth} or -{depth}..-1 "
                             f"(or final: every block and the final norm)")

    # ---------------------------------------------------------------------------------------- geometry
    @property
    def dim(self) -> int:
        """Width of an embedding."""
        return self.encoder.cfg.num_features if self.htsat else self.encoder.cfg.embed_dim

    @property
    def steps(self) -> int:
        """Time steps per clip of the frame embeddings."""
        if self.htsat:
            return self.encoder.geom.frames // self.encoder.frames_per_step
        return self.encoder.cfg.grid[1]

    @property
    def clip_seconds(self) -> float:
        """Seconds in one clip: the longest waveform :meth:`embed` takes."""
        return self.clip_samples / self.sample_rate

    def step_times(self) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, ends)``: seconds each time step covers within a clip (see the module docstring)."""
        k = np.arange(self.steps, dtype=np.float64)
        if self.htsat:
            geom = self.encoder.geom
            span = (geom.stft_frames - 1) * geom.hop_length / self.sample_rate
            return k * span / self.steps, (k + 1) * span / self.steps
        cfg, audio, compression = self.encoder.cfg, self.pipeline.audio, self.pipeline.compression
        shift = compression.frame_shift_ms(audio.frame_shift_ms) / 1000.0
        pool = compression.pooled_frames
        first = k * cfg.tstride * pool  # the first and the last fbank frame under the column's patch
        last = (k * cfg.tstride + cfg.tshape - 1) * pool + pool - 1
        return first * shift, np.minimum(last * shift + audio.frame_length_ms / 1000.0, self.clip_seconds)

    def describe(self) -> dict:
        """What the embeddings are (``embeddings.json``): model, front end, layer, pooling, sizes."""
        if self.htsat:
            model = {"arch": "htsat", "config": self.encoder.cfg.to_dict(), "image": list(self.encoder.geom.image)}
        else:
            model = {"arch": "ast", "config": self.encoder.cfg.to_dict()}
        front = {"sample_rate": self.sample_rate, "clip_samples": self.clip_samples}
        if not self.htsat:
            stats = self.pipeline.stats
            front.update({"compression": self.pipeline.compression.describe(), "norm_mean": stats.mean,
                          "norm_std": stats.std})
        else:
            front["geometry"] = self.encoder.geom.describe()
        return {**self.info, "model": model, "front_end": front,
                "layer": "final" if self.layer is None else self.layer, "pool": self.pool, "frames": self.frames,
                "dim": self.dim, "steps": self.steps}

    # ---------------------------------------------------------------------------------------- compute
    @torch.no_grad()
    def embed(self, waveforms: torch.Tensor | np.ndarray,
              lengths: torch.Tensor | np.ndarray | list[int] | None = None) -> EmbedOutput:
        """The embeddings of ``[B, S]`` (or ``[S]``) float waveforms in [-1, 1] at ``sample_rate`` (a tensor or a numpy
        array; ``S <= clip_samples``; ``lengths``: valid samples per clip, ``1..S``, a tensor, a list or an array).
        A clip shorter than ``clip_samples`` is filled as the model was trained (``pad``).

        Raises:
            ValueError: integer or complex samples, more than 2 dimensions, channels last (``[S, C]``), or more
                samples than a clip (cut a long recording into windows, as ``finetune.embed.embed_files`` does),
                lengths of another shape or outside ``1..S``.
        """
        waveforms = check_waveforms(waveforms, "Embedder.embed")
        if waveforms.shape[-1] > self.clip_samples:
            raise ValueError(f"Embedder.embed: waveforms of {waveforms.shape[-1]} samples are longer than the model's "
                             f"clip ({self.clip_samples} samples, {self.clip_seconds:g} s at {self.sample_rate} Hz); "
                             f"cut them into clips (finetune.embed.embed_files windows a long file)")
        if lengths is not None:
            lengths = check_lengths(lengths, 1 if waveforms.dim() == 1 else len(waveforms), waveforms.shape[-1],
                                    "Embedder.embed", read=True)
        if self.pad == "repeat":
            waveforms, lengths = _repeat_short(waveforms, lengths, self.clip_samples)
        x = self.pipeline(waveforms.to(self.device), None if lengths is None else lengths.to(self.device))
        clip, frames = self._htsat(x) if self.htsat else self._ast(x)
        return EmbedOutput(None if clip is None else clip.float().cpu().numpy(),
                           None if frames is None else frames.float().cpu().numpy())

    __call__ = embed

    def _ast(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        tokens = self.encoder.forward_features(x, self.layer)  # [B, P + N, D], prefix tokens first
        prefix = self.encoder.num_prefix_tokens
        clip = None
        if self.pool == "mean":
            clip = tokens[:, prefix:].mean(1)
        elif self.pool == "prefix":
            clip = tokens[:, :prefix].mean(1)
        elif self.pool == "cls":
            clip = tokens[:, 0]
        frames = None
        if self.frames:  # patches are numbered frequency-major (PatchEmbed: "b d f t -> b (f t) d")
            f_dim, t_dim = self.encoder.cfg.grid
            frames = tokens[:, prefix:].reshape(len(tokens), f_dim, t_dim, -1).mean(1)
        return clip, frames

    def _htsat(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:

        model = self.encoder
        tokens = model.tokens(model.to_image(x))  # [B, h, w, D] after the final norm
        grid = unfold(tokens, model.geom.chunks)  # [B, D, f, t]: what the token-semantic head reads
        clip = grid.flatten(2).mean(dim=2) if self.pool == "mean" else None  # = latent_output
        frames = grid.mean(2).transpose(1, 2) if self.frames else None  # [B, t, D]
        return clip, frames


def _repeat_short(waveforms: torch.Tensor, lengths: torch.Tensor | None,
                  clip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each clip's valid samples repeated and cut to ``clip`` samples (``data.pad: repeat``, as
    ``common.data.clips.ClipDataset`` fills a short clip in training and ``predict`` a short file): ``[B, clip]``
    and lengths of ``clip``."""
    waves = waveforms if waveforms.dim() == 2 else waveforms[None]
    valid = [waves.shape[-1]] * len(waves) if lengths is None else lengths.reshape(-1).tolist()
    full = torch.full((len(waves),), clip, dtype=torch.long, device=waves.device)
    if waves.shape[-1] == clip and all(n == clip for n in valid):  # filled already (the probe's loader repeats)
        return waves, full
    out = torch.stack([repeat_to(waves[i, :n], clip) if n > 0 else waves.new_zeros(clip)
                       for i, n in enumerate(valid)])  # an empty clip stays silence, as zero padding makes it
    return out, full


def model_digest(init: str | Path) -> str:
    """SHA-256 over the model file(s) of ``init`` (a file, a run directory's export, an HF directory's files):
    which model a set of embeddings came from, wherever it has moved since."""
    files = sorted(p for p in Path(init).iterdir() if p.is_file()) if is_hf_directory(init) \
        else [resolve_model_file(init)]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() if len(files) > 1 else b"")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _norm_for(weights, norm: str | None, recorded: str | None, recorded_stats: NormStats | None = None) -> tuple:
    """``(NormStats, label)``: ``--norm``, else what the init records (its statistics by value, else by name),
    else AudioSet's (AST's and SSAST's own)."""
    if norm is not None:
        return resolve_norm_stats(norm), norm
    front = weights.meta.get("front_end")  # a Hugging Face directory's preprocessor_config.json
    if isinstance(front, dict):

        return NormStats(float(front["mean"]), float(front["std"])), str(front.get("norm") or "preprocessor")
    if recorded_stats is not None:
        return recorded_stats, recorded or "recorded"
    if recorded is not None:
        return resolve_norm_stats(recorded), recorded
    log.warning("--init %s does not record its normalisation statistics: using AudioSet's (mean %.4f, std %.4f), "
                "those of AST's and SSAST's training; --norm NAME|FILE gives others", weights.meta.get("file", ""),
                NORM_STATS["audioset"].mean, NORM_STATS["audioset"].std)
    return NORM_STATS["audioset"], "audioset"


def load_embedder(init: str | Path, *, layer: int | None = None, pool: str = "auto", frames: bool = False,
                  norm: str | None = None, device: str | torch.device = "cpu") -> Embedder:
    """An :class:`Embedder` for anything fine-tuning's ``--init`` takes (see the module docstring).

    An export keeps the geometry and the front end of its phase (a coarse phase's export embeds as that
    phase computed); other files are taken at full resolution with their own patch stride and input length
    (timm ImageNet ViT weights: AST's 128 mel bins and 1024 frames). The global torch RNG is left as it was.

    Args:
        init: the model.
        layer: see the module docstring.
        pool: ``auto`` (as the init's own code pools: ``common.phases.init.init_pool``), ``mean``, ``prefix``,
            ``cls`` or ``none``.
        frames: compute frame embeddings too.
        norm: the AST family's normalisation statistics (a ``NORM_STATS`` name or a stats JSON file) instead of
            what the init records; AudioSet's where it records none (official ``.pth`` files).
        device: where the model runs.

    Raises:
        ValueError: ``none`` or an unreadable model, a layer or a pooling the model does not have.
    """

    weights = load_init(str(init))
    if weights is None:
        raise ValueError("--init none: a random encoder's embeddings say nothing; give a model")
    meta, source = weights.meta, weights.meta.get("source")
    compression = Compression()
    if source == "export":
        arch = architecture_from_meta(meta)
        geometry = arch.export_geometry(meta)
        phase = meta.get("phase") or {}
        compression = Compression(phase.get("compression", "none"), phase.get("factor", 1),
                                  phase.get("patch_transfer", "pi"))
    else:
        cfg = weights.config
        if weights.arch == "ast" and source == "imagenet":  # AST's start: its input, the stride of the patch
            cfg = task_encoder_config(weights, ModelSpec(), 128, 1024)
        arch = architecture_for(cfg)
        geometry = arch.geometry(compression)
    if source == "imagenet":
        log.warning("--init %s holds ImageNet weights, which have never heard audio%s", meta.get("file", init),
                    "; HTS-AT's bn0 (its input normalisation) starts afresh" if weights.arch == "htsat" else "")
    with torch.random.fork_rng(devices=[]):  # its random start, overwritten by the weights, leaves the caller's RNG be
        encoder = arch.build_encoder(geometry)
        arch.load_weights(encoder, weights, geometry, init_pos_mode(weights, "bilinear"), "pi")
    info = {"init": str(init), "model_sha256": model_digest(init), "source": source}
    if arch.normalises_input:
        if norm is not None:
            raise ValueError(f"--norm: the {arch.name} model normalises its input itself (HTS-AT: its BatchNorm bn0); "
                             "--norm is for models normalised with a corpus's statistics (the AST family)")
        pipeline = arch.frontend(geometry, compression, SpecAugmentConfig())
    else:
        recorded = meta["audio"].get("norm") if isinstance(meta.get("audio"), dict) else None
        stats, label = _norm_for(weights, norm, recorded, getattr(arch, "norm_stats", None))
        audio = getattr(arch, "audio", None) if isinstance(meta.get("audio"), dict) else None
        if audio is None:
            front = meta.get("front_end") if isinstance(meta.get("front_end"), dict) else {}
            full = arch.base
            audio = AudioConfig(sample_rate=int(front.get("sample_rate", 16000)), num_mel_bins=full.num_mel_bins,
                                target_frames=full.input_tdim)
        pipeline = FeaturePipeline(audio, compression, SpecAugmentConfig(), norm=stats)
        info["norm"] = label
        arch = architecture_for(arch.base, audio)
    pool = arch.resolve_pool("auto", weights) if pool == "auto" and weights.arch == "ast" else pool
    clips = clip_handling(meta)  # as the model was trained (an export's record; official HTS-AT: the channels' mean)
    return Embedder(encoder, pipeline, arch.sample_rate, arch.clip_samples, layer=layer, pool=pool, frames=frames,
                    device=device, info=info, channels=clips["channels"], pad=clips["pad"])
