"""Training-time augmentation on the device: waveform mixup, SpecAugment and fbank noise.

They follow AST's data loader (``src/dataloader.py``, SSAST's ``AudioDataset`` is the same) but act on whole batches:

- mixup pairs each selected clip with another clip of the same batch (AST draws the partner from the
  whole data set; within-batch pairing needs no second decode) and mixes waveforms with
  ``lam ~ Beta(10, 10)``; labels are mixed with the same weight, so a class present in both clips stays 1.
- SpecAugment masks one frequency band and one time span per clip, on the fbank before normalisation,
  with the masked cells set to 0 (as AST, where they become ``(0 - mean) / (2 std)`` after normalising).
- noise (``noise=True`` in SSAST's ESC-50 and SpeechCommands recipes, AST's SpeechCommands recipe):
  after normalisation, ``fbank + rand(T, F) * rand() / 10`` and a circular roll along time by
  ``randint(-10, 10)`` frames (numpy's upper bound is exclusive: -10 to 9), both drawn per clip. On a
  time-compressed phase (Fshift) the largest shift is scaled by the compression like the time mask
  (``round(10 / C)`` frames: the same stretch of audio); pooling phases add the noise and roll at full
  resolution, before pooling, as the time mask.

Randomness comes from an explicit ``torch.Generator`` so that a resumed run draws the same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from common.system.device import to_device

__all__ = ["mixup_weights", "MixupConfig", "SpecAugmentConfig", "NoiseConfig", "mixup", "spec_augment", "fbank_noise"]


# stripes drawn one by one per batch: a count past any axis' size masks nothing more, and 1e9 hung the first step
MAX_STRIPES = 1000


@dataclass(frozen=True)
class MixupConfig:
    """Mixup.

    Args:
        prob: probability that a clip is mixed with a partner (AST: 0.5 on AudioSet, 0 elsewhere; HTS-AT:
            every AudioSet clip).
        alpha: Beta(alpha, alpha) distribution of the mixing weight (AST: 10; HTS-AT: 0.5).
        on: ``waveform`` (AST: a random partner in the batch, mixed before the front end) or
            ``spectrogram`` (HTS-AT: the partner in the flipped batch, mixed inside the model after its
            normalisation and SpecAugment).
        targets: ``mixed`` with the same weight (AST) or ``unmixed`` (HTS-AT's code keeps the clip's own
            targets, on purpose: "adding noise").
    """

    prob: float = 0.0
    alpha: float = 10.0
    on: Literal["waveform", "spectrogram"] = "waveform"
    targets: Literal["mixed", "unmixed"] = "mixed"

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"mixup.prob must be in [0, 1], got {self.prob}")
        if not 0 < self.alpha < math.inf:  # also NaN
            raise ValueError(f"mixup.alpha must be positive and finite, got {self.alpha}")


@dataclass(frozen=True)
class SpecAugmentConfig:
    """SpecAugment widths at full resolution (frames at the base frame shift, mel bins).

    Args:
        freqm: maximum width of the frequency mask (AST: 48 on AudioSet, 24 on ESC-50).
        timem: maximum width of the time mask at the base frame shift (AST: 192 on AudioSet). On a
            time-compressed phase the width is divided by the compression factor, so that the same
            share of the clip is masked.
        freq_stripes, time_stripes: masks per clip along each axis (AST: 1 and 1; HTS-AT's torchlibrosa
            ``SpecAugmentation``: 2 and 2, with widths 8 and 64).
    """

    freqm: int = 0
    timem: int = 0
    freq_stripes: int = 1
    time_stripes: int = 1

    def __post_init__(self) -> None:
        if self.freqm < 0 or self.timem < 0:
            raise ValueError(f"SpecAugment widths must be >= 0, got freqm={self.freqm}, timem={self.timem}")
        if not (0 <= self.freq_stripes <= MAX_STRIPES and 0 <= self.time_stripes <= MAX_STRIPES):
            raise ValueError(f"SpecAugment stripe counts (augment.freq_stripes, augment.time_stripes) must be from 0 "
                             f"to {MAX_STRIPES}, got {self.freq_stripes}, {self.time_stripes}")


@dataclass(frozen=True)
class NoiseConfig:
    """SSAST / AST's fbank noise (their ``noise=True``).

    Args:
        enabled: add the noise and roll to training features.
        scale: largest noise amplitude, in normalised units (AST: ``rand() / 10``).
        max_shift: the roll is drawn from ``[-max_shift, max_shift)`` frames at the base frame shift
            (AST: ``np.random.randint(-10, 10)``).
    """

    enabled: bool = False
    scale: float = 0.1
    max_shift: int = 10

    def __post_init__(self) -> None:
        if self.scale < 0 or self.max_shift < 0:
            raise ValueError(f"noise scale and max_shift must be >= 0, got {self.scale}, {self.max_shift}")


def _beta(alpha: float, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` draws from Beta(alpha, alpha), reproducible from ``generator`` (numpy does the sampling)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=size)).float()


def mixup(
    waveforms: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    cfg: MixupConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix clips of a batch with partners from the same batch.

    Args:
        waveforms: ``[B, S]`` zero-padded waveforms.
        lengths: ``[B]`` valid samples per clip.
        targets: ``[B, K]`` float (multi-)hot targets.
        cfg: mixup settings; nothing happens when ``cfg.prob == 0`` or ``B < 2``.
        generator: CPU generator for every random draw.

    Returns:
        ``(waveforms, lengths, targets)``; a mixed clip keeps its own length (AST cuts or pads the
        partner to it), and its targets are mixed with the same weight unless ``cfg.targets`` is ``unmixed``.
    """
    batch = waveforms.shape[0]
    if cfg.prob <= 0 or batch < 2:
        return waveforms, lengths, targets
    device = waveforms.device
    chosen = to_device(torch.rand(batch, generator=generator) < cfg.prob, device)
    # partner = a random other clip: shift by 1..B-1 positions in a random permutation cycle
    perm = torch.randperm(batch, generator=generator)
    partner = torch.empty_like(perm)
    partner[perm] = perm.roll(1)
    partner = to_device(partner, device)
    lam = to_device(_beta(cfg.alpha, batch, generator), device)
    lam = torch.where(chosen, lam, torch.ones_like(lam))
    valid = torch.arange(waveforms.shape[1], device=device)[None, :] < lengths[:, None]
    other = waveforms[partner] * valid  # cut the partner to this clip's length
    mixed = lam[:, None] * waveforms + (1 - lam[:, None]) * other
    if cfg.targets == "unmixed":  # each clip keeps its own targets (HTS-AT's choice)
        return mixed, lengths, targets
    return mixed, lengths, lam[:, None] * targets + (1 - lam[:, None]) * targets[partner]


def mixup_weights(batch: int, cfg: MixupConfig, generator: torch.Generator) -> torch.Tensor | None:
    """Per-clip weights ``[B]`` of spectrogram mixup (1 for clips left alone), or None when nothing mixes.

    Clip ``i`` becomes ``lam_i x_i + (1 - lam_i) x_{B-1-i}`` in the model (the official HTS-AT pairing).
    """
    if cfg.prob <= 0 or batch < 2:
        return None
    chosen = torch.rand(batch, generator=generator) < cfg.prob
    lam = _beta(cfg.alpha, batch, generator)
    return torch.where(chosen, lam, torch.ones_like(lam))


def spec_augment(
    fbank: torch.Tensor, freqm: int, timem: int, generator: torch.Generator, mask_value: float = 0.0,
    freq_stripes: int = 1, time_stripes: int = 1,
) -> torch.Tensor:
    """Mask random frequency bands (width < ``freqm``) and time spans (width < ``timem``) of every clip.

    Args:
        fbank: ``[B, T, F]`` features before normalisation.
        freqm, timem: maximum mask widths in bins and frames (0 disables that mask).
        generator: CPU generator for the mask positions.
        mask_value: what masked cells are set to.
        freq_stripes, time_stripes: masks per clip along each axis (AST: one each).
    """
    if freqm <= 0 and timem <= 0:
        return fbank
    batch, frames, bins = fbank.shape
    device = fbank.device  # the draws are made on the CPU generator; the [B, T, F] mask is built on the device
    keep = torch.ones(batch, frames, bins, dtype=torch.bool, device=device)
    for width_max, size, axis, stripes in ((freqm, bins, 2, freq_stripes), (timem, frames, 1, time_stripes)):
        if width_max <= 0:
            continue
        for _ in range(stripes):
            width = (torch.rand(batch, generator=generator) * min(width_max, size)).long()
            start = (torch.rand(batch, generator=generator) * (size - width)).long()
            width, start = to_device(width, device), to_device(start, device)
            pos = torch.arange(size, device=device)[None, :]
            band = (pos >= start[:, None]) & (pos < (start + width)[:, None])  # [B, size]
            keep &= ~(band[:, None, :] if axis == 2 else band[:, :, None])
    return torch.where(keep, fbank, torch.full_like(fbank, mask_value))


def fbank_noise(fbank: torch.Tensor, scale: float, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Add ``U[0, 1)`` noise times a per-clip ``U[0, scale)`` amplitude, then roll each clip along time.

    Args:
        fbank: ``[B, T, F]`` normalised features.
        scale: largest amplitude (AST: 0.1).
        max_shift: the shift of clip ``b`` is drawn from ``[-max_shift, max_shift)`` frames (0: no roll).
        generator: CPU generator; it draws the amplitudes, the shifts and the seed of the noise field,
            which is drawn on ``fbank``'s device (a resumed run adds the same noise).
    """
    batch, frames, _ = fbank.shape
    amplitude = torch.rand(batch, generator=generator) * scale
    shift = torch.randint(-max_shift, max_shift, (batch,), generator=generator) if max_shift > 0 else None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    device_generator = torch.Generator(device=fbank.device).manual_seed(seed)
    field = torch.rand(fbank.shape, generator=device_generator, device=fbank.device, dtype=fbank.dtype)
    out = fbank + field * to_device(amplitude, fbank.device, fbank.dtype)[:, None, None]
    if shift is None:
        return out
    # torch.roll(x, s, dims=time) per clip: out[t] = x[(t - s) mod T]
    source = (torch.arange(frames)[None, :] - shift[:, None]) % frames
    return torch.gather(out, 1, to_device(source, fbank.device)[:, :, None].expand_as(out))
