"""The per-phase feature pipeline: waveform batch -> model input, on the training device.

    waveforms [B, S] --Fbank(frame shift of the phase)--> [B, T, F] --pad/crop--> --SpecAugment (train)-->
    --normalise--> --noise + roll (train, if asked)--> --avg/max pool (pool phases)--> [B, T', F]

One loader serves every compression method, since everything that depends on the phase happens here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.audio.augment import NoiseConfig, SpecAugmentConfig, fbank_noise, spec_augment
from common.audio.compression import Compression
from common.audio.fbank import (
    Fbank,
    NormStats,
    check_norm_name,
    normalize,
    pad_or_crop,
    resolve_norm_stats,
    samples_for_frames,
)

__all__ = ["AudioConfig", "FeaturePipeline"]


@dataclass(frozen=True)
class AudioConfig:
    """How clips become full-resolution features.

    Args:
        sample_rate: clips are resampled to this rate by the loader (16 kHz in AST/SSAST).
        num_mel_bins: F.
        frame_shift_ms, frame_length_ms: the full-resolution framing (10 ms / 25 ms in AST).
        target_frames: frames per clip at full resolution (1024 in AST = 10.24 s); shorter clips are
            zero-padded and longer ones cut.
        norm: normalisation statistics: a name from ``common.audio.fbank.NORM_STATS`` or a stats JSON file.
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_shift_ms: float = 10.0
    frame_length_ms: float = 25.0
    target_frames: int = 1024
    norm: str = "audioset"

    def __post_init__(self) -> None:
        for name, most in (("sample_rate", 384_000), ("num_mel_bins", 1024), ("target_frames", 1_000_000)):
            if not 0 < getattr(self, name) <= most:  # also NaN; a bound: 1e30 reached torch as a traceback
                raise ValueError(f"audio.{name} must be positive and at most {most}, got {getattr(self, name)}")
        if not (0 < self.frame_shift_ms < math.inf and 0 < self.frame_length_ms < math.inf):
            raise ValueError(f"audio.frame_shift_ms and audio.frame_length_ms must be positive and finite, got "
                             f"{self.frame_shift_ms}, {self.frame_length_ms}")
        if self.frame_shift < 1 or self.frame_length < 1:
            raise ValueError(f"audio.frame_shift_ms ({self.frame_shift_ms}) and audio.frame_length_ms "
                             f"({self.frame_length_ms}) must each be at least one sample at audio.sample_rate "
                             f"{self.sample_rate}")
        check_norm_name(self.norm)

    @property
    def frame_shift(self) -> int:
        return int(round(self.sample_rate * self.frame_shift_ms / 1000))

    @property
    def frame_length(self) -> int:
        return int(round(self.sample_rate * self.frame_length_ms / 1000))

    @property
    def clip_samples(self) -> int:
        """Samples the loader crops / pads every clip to: exactly enough for ``target_frames`` frames."""
        return samples_for_frames(self.target_frames, self.frame_length, self.frame_shift)

    @property
    def clip_seconds(self) -> float:
        return self.clip_samples / self.sample_rate


class FeaturePipeline(nn.Module):
    """Waveforms ``[B, S]`` (+ valid lengths) -> normalised, compressed features ``[B, T', F]``.

    Args:
        audio: the full-resolution audio settings.
        compression: the phase's compression (frame shift and pooling come from it).
        specaug: SpecAugment widths at full resolution; applied only when a generator is passed.
        norm: statistics overriding ``audio.norm``.
    """

    def __init__(
        self,
        audio: AudioConfig,
        compression: Compression = Compression(),
        specaug: SpecAugmentConfig = SpecAugmentConfig(),
        norm: NormStats | None = None,
    ) -> None:
        super().__init__()
        self.audio = audio
        self.compression = compression
        self.fbank = Fbank(
            frame_shift_ms=compression.frame_shift_ms(audio.frame_shift_ms),
            num_mel_bins=audio.num_mel_bins,
            sample_rate=audio.sample_rate,
            frame_length_ms=audio.frame_length_ms,
        )
        self.frames = compression.fbank_frames(audio.target_frames)
        self.stats = norm if norm is not None else resolve_norm_stats(audio.norm)
        # the time mask covers the same share of the clip whatever the frame shift
        self.freqm = specaug.freqm
        self.stripes = (specaug.freq_stripes, specaug.time_stripes)
        self.timem = round(specaug.timem * self.frames / audio.target_frames)

    def time_frames(self, frames: int) -> int:
        """``frames`` at the base frame shift, in this phase's fbank frames (a time mask, a roll)."""
        return round(frames * self.frames / self.audio.target_frames)

    @property
    def output_frames(self) -> int:
        return self.compression.model_frames(self.audio.target_frames)

    def forward(
        self,
        waveforms: torch.Tensor,
        lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: NoiseConfig | None = None,
    ) -> torch.Tensor:
        """Features of a batch; SpecAugment (and ``noise`` if enabled) only when a generator is given."""
        x = pad_or_crop(self.fbank(waveforms, lengths), self.frames)
        if generator is not None:
            x = spec_augment(x, self.freqm, self.timem, generator, 0.0, *self.stripes)
        x = normalize(x, self.stats)
        if generator is not None and noise is not None and noise.enabled:
            x = fbank_noise(x, noise.scale, self.time_frames(noise.max_shift), generator)
        return self.compression.pool(x)
