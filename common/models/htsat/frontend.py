"""HTS-AT's front end on the training device: waveforms at 32 kHz -> log-mel in dB (+ SpecAugment stripes).

As the official model's torchlibrosa extractors (``model/htsat.py``), batched on any device::

    waveform [B, S] --zero-pad to clip_samples--> torch.stft(n_fft 1024, hop, periodic Hann, center, reflect)
      (built as one reflect-padded buffer and an STFT without centring: the same frames, fewer passes)
      --|.|^2--> @ slaney mel [513, 64] (torchaudio) --> 10 log10(max(., 1e-10)) --> [B, 1, T, 64]

The official model applies SpecAugment *after* its per-mel BatchNorm ``bn0``, which is a trained part
of the model. So the front end does not zero the stripes itself: with a generator it draws them and
returns a second plane, the keep mask (1 = kept, 0 = in a stripe), and the model zeroes those cells
right after ``bn0``, exactly where torchlibrosa's ``DropStripes`` does. Model input is therefore
``[B, 1, T, F]`` (no augmentation) or ``[B, 2, T, F]`` (log-mel, keep mask).

Stripes follow torchlibrosa's ``SpecAugmentation(time_drop_width=64, time_stripes_num=2,
freq_drop_width=8, freq_stripes_num=2)``: each stripe has a width drawn from [0, drop_width) and a
start from [0, size - width). The time width is scaled with the phase's frame rate (16 frames at
Fshift x4), so a stripe hides the same share of the clip in every phase, as for AST.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torchaudio.functional import melscale_fbanks

from common.models.htsat.config import HTSATConfig
from common.models.htsat.geometry import Geometry, geometry
from common.system.device import to_device

__all__ = ["SpecAugmentStripes", "HTSATFrontEnd", "mel_filterbank"]


@dataclass(frozen=True)
class SpecAugmentStripes:
    """SpecAugment as HTS-AT's torchlibrosa ``SpecAugmentation`` (widths at full resolution).

    Args:
        time_width: stripes along time are narrower than this many full-resolution frames (64).
        time_stripes: stripes along time per clip (2).
        freq_width: stripes along frequency are narrower than this many mel bins (8).
        freq_stripes: stripes along frequency per clip (2).
    """

    time_width: int = 64
    time_stripes: int = 2
    freq_width: int = 8
    freq_stripes: int = 2

    def __post_init__(self) -> None:
        for name in ("time_width", "time_stripes", "freq_width", "freq_stripes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def mel_filterbank(cfg: HTSATConfig) -> torch.Tensor:
    """The ``[n_fft // 2 + 1, mel_bins]`` slaney-scale, slaney-normalised filterbank (= librosa's default; with
    ``fmax`` above Nyquist its top filters are empty, as librosa's and the official Speech Commands model's are)."""
    with warnings.catch_warnings():
        if cfg.empty_filters:  # torchaudio warns of the empty filters: here they are the model's own
            warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero values")
        return melscale_fbanks(cfg.n_fft // 2 + 1, cfg.fmin, cfg.fmax, cfg.mel_bins, cfg.sample_rate,
                               norm="slaney", mel_scale="slaney")


def _keep_mask(batch: int, size: int, width: int, stripes: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, size]`` bool: False inside ``stripes`` random stripes of width in [0, width) per row."""
    keep = torch.ones(batch, size, dtype=torch.bool)
    if width <= 0 or stripes <= 0:
        return keep
    widths = torch.randint(0, min(width, size), (batch, stripes), generator=generator)
    starts = (torch.rand(batch, stripes, generator=generator) * (size - widths)).long()
    pos = torch.arange(size)[None, None, :]
    inside = (pos >= starts[..., None]) & (pos < (starts + widths)[..., None])  # [B, stripes, size]
    return keep & ~inside.any(dim=1)


class HTSATFrontEnd(nn.Module):
    """Waveforms ``[B, S]`` at ``cfg.sample_rate`` -> HTS-AT model input ``[B, 1 or 2, T, F]``.

    Args:
        cfg: the model configuration (STFT, mel and clip settings).
        geom: the phase geometry (its hop); default full resolution.
        stripes: SpecAugment widths at full resolution; stripes are drawn only when ``forward`` gets a
            generator.
    """
    def __init__(self, cfg: HTSATConfig, geom: Geometry | None = None,
                 stripes: SpecAugmentStripes = SpecAugmentStripes()) -> None:
        super().__init__()
        self.cfg = cfg
        self.geom = geom if geom is not None else geometry(cfg)
        self.stripes = stripes
        self.time_width = round(stripes.time_width * self.geom.time_scale)
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=True), persistent=False)
        self.register_buffer("melW", mel_filterbank(cfg), persistent=False)

    def extra_repr(self) -> str:
        return (f"sample_rate={self.cfg.sample_rate}, n_fft={self.cfg.n_fft}, hop={self.geom.hop_length}, "
                f"mel_bins={self.cfg.mel_bins}, frames={self.geom.stft_frames}, time_stripe<{self.time_width}")

    def logmel(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, S]`` waveforms -> ``[B, T, F]`` log-mel power in dB (float32, autocast off)."""
        if waveforms.dim() == 1:
            waveforms = waveforms.unsqueeze(0)
        if waveforms.dim() != 2:
            raise ValueError(f"HTS-AT front end expects waveforms [B, S], got shape {tuple(waveforms.shape)}")
        batch, samples = waveforms.shape
        if samples > self.cfg.clip_samples:
            raise ValueError(
                f"HTS-AT takes clips of at most {self.cfg.clip_samples} samples ({self.cfg.clip_seconds:g} s at "
                f"{self.cfg.sample_rate} Hz), got {samples}: cut longer audio into windows")
        if lengths is not None:
            lengths = lengths.to(device=waveforms.device, dtype=torch.long, non_blocking=True)
            if lengths.shape != (batch,):
                raise ValueError(f"lengths must have shape [{batch}], got {tuple(lengths.shape)}")
        # The official input: the clip zero-padded to clip_samples (its data loader), padded again by the STFT's
        # centring (reflect, n_fft // 2 a side). Built here in one buffer, written once, then an STFT without
        # centring over it: the same frames, bit for bit, for one pass over the samples where a mask, a pad and
        # the STFT's own pad took three (on the CPU those passes cost as much as the STFT at Fshift x4).
        half, clip = self.cfg.n_fft // 2, self.cfg.clip_samples
        x = torch.empty(batch, clip + 2 * half, device=waveforms.device)
        x[:, half:half + samples] = waveforms
        traced = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        if lengths is not None and x.device.type == "cpu" and not traced:  # samples past a clip's length are
            for row in torch.nonzero(lengths < samples).flatten().tolist():  # padding: on the host, zeroed
                x[row, half + int(lengths[row]):half + samples] = 0.0  # where they are only
        elif lengths is not None:  # on an accelerator (or in a graph) without reading the lengths: no host sync
            x[:, half:half + samples].masked_fill_(
                torch.arange(samples, device=x.device)[None, :] >= lengths[:, None], 0.0)
        x[:, half + samples:half + clip] = 0.0
        x[:, :half] = x[:, half + 1:2 * half + 1].flip(-1)  # reflect: x[half], ..., x[1] of the padded clip
        x[:, half + clip:] = x[:, clip - 1:clip + half - 1].flip(-1)  # and x[clip - 2], ..., x[clip - 1 - half]
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.stft(x, self.cfg.n_fft, hop_length=self.geom.hop_length, win_length=self.cfg.n_fft,
                              window=self.window, center=False, return_complex=True)
            power = spec.real.square() + spec.imag.square()  # [B, n_fft // 2 + 1, T]
            mel = torch.matmul(power.transpose(1, 2), self.melW)  # [B, T, F]
            return 10.0 * torch.log10(mel.clamp(min=1e-10))

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Compute the model input.

        Args:
            waveforms: ``[B, S]`` float waveforms, ``S <= cfg.clip_samples`` (shorter clips are zero-padded).
            lengths: optional ``[B]`` valid samples per clip; samples past them are treated as padding.
            generator: CPU generator for SpecAugment; ``None`` (evaluation) draws no stripes.

        Returns:
            ``[B, 1, T, F]`` log-mel in dB, or with a generator ``[B, 2, T, F]``: log-mel and keep mask.
        """
        x = self.logmel(waveforms, lengths).unsqueeze(1)
        if generator is None:
            return x
        batch, _, frames, bins = x.shape
        keep_t = _keep_mask(batch, frames, self.time_width, self.stripes.time_stripes, generator)
        keep_f = _keep_mask(batch, bins, self.stripes.freq_width, self.stripes.freq_stripes, generator)
        # [B, T] and [B, F]; the product on the device
        keep_t, keep_f = to_device(keep_t, x.device), to_device(keep_f, x.device)
        keep = (keep_t[:, :, None] & keep_f[:, None, :]).to(dtype=x.dtype)
        return torch.cat([x, keep.unsqueeze(1)], dim=1)
