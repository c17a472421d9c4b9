"""Kaldi-compatible log-mel filterbank front end, batched and device-agnostic.

The features equal what AST and SSAST compute per clip on the CPU::

    torchaudio.compliance.kaldi.fbank(w - w.mean(), htk_compat=True, sample_frequency=16000,
        use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=S)

but for a whole batch at once, on whatever device the waveforms live on. The filterbank itself is
Lhotse's ``Wav2LogFilterBank`` with ``snip_edges=True, high_freq=0.0`` (the two settings where Lhotse's
defaults differ from Kaldi's); ``tests/audio/test_frontend.py`` checks the match against torchaudio itself.

Padded batches: when ``lengths`` is given, each waveform is centred on the mean of its own samples and
every frame that reaches past its end is set to 0, exactly as if the clip had been featurised alone and
then zero-padded along time (what the reference data loaders do).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lhotse.features.kaldi.layers import Wav2LogFilterBank
from torch import nn

__all__ = [
    "Fbank",
    "check_waveforms",
    "check_lengths",
    "NormStats",
    "NORM_STATS",
    "resolve_norm_stats",
    "check_norm_name",
    "normalize",
    "pad_or_crop",
    "num_frames",
    "samples_for_frames",
]


def num_frames(num_samples: int | torch.Tensor, frame_length: int, frame_shift: int) -> int | torch.Tensor:
    """Frames a Kaldi front end with ``snip_edges=True`` makes from ``num_samples`` samples."""
    if isinstance(num_samples, torch.Tensor):
        return torch.where(
            num_samples >= frame_length,
            1 + torch.div(num_samples - frame_length, frame_shift, rounding_mode="floor"),
            torch.zeros_like(num_samples),
        )
    return 0 if num_samples < frame_length else 1 + (num_samples - frame_length) // frame_shift


def samples_for_frames(frames: int, frame_length: int, frame_shift: int) -> int:
    """Fewest samples that give ``frames`` frames (inverse of :func:`num_frames`)."""
    if frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    return frame_length + (frames - 1) * frame_shift


MAX_CHANNELS = 8  # a 2-D input this narrow but longer is taken for [samples, channels], not a batch of clips


def check_waveforms(waveforms, where: str = "Fbank") -> torch.Tensor:
    """``waveforms`` (a tensor or a numpy array) as a floating-point tensor ``[B, S]`` or ``[S]``, or a
    ``ValueError`` naming what is wrong and what to do.

    Refused: integer or boolean samples (PCM that a plain cast would leave at +-32767: log-mel ~20 higher
    everywhere), complex samples, more than 2 dimensions, and a 2-D input whose last axis is at most
    :data:`MAX_CHANNELS` long while its first is longer (soundfile's ``[S, C]`` layout: taken as a batch it makes
    every sample a clip, a second of 16 kHz stereo ~8 GB of features). Only the dtype and the shape are read, never
    the samples: the trainer calls :class:`Fbank` on the GPU every step, and this adds no wait for the device.

    Args:
        waveforms: the samples, float in [-1, 1].
        where: who asks, for the message (``Fbank``, ``Embedder.embed``, ...).
    """
    if not isinstance(waveforms, torch.Tensor):
        array = np.asarray(waveforms)
        if array.dtype.kind not in "fc":  # before torch: it has no uint16/uint32 tensors to convert into
            raise ValueError(f"{where}: waveforms of dtype {array.dtype} are not float samples in [-1, 1]: scale "
                             f"integer PCM first, e.g. w / 32768 for int16 (w / 2**31 for int32)")
        waveforms = torch.as_tensor(array)
    if waveforms.is_complex():
        raise ValueError(f"{where}: waveforms of dtype {waveforms.dtype} are complex; pass the real signal (float "
                         f"samples in [-1, 1])")
    if not waveforms.is_floating_point():
        raise ValueError(f"{where}: waveforms of dtype {waveforms.dtype} are not float samples in [-1, 1]: scale "
                         f"integer PCM first, e.g. w / 32768 for int16 (w / 2**31 for int32)")
    shape = tuple(waveforms.shape)
    if waveforms.dim() not in (1, 2):
        raise ValueError(f"{where} expects waveforms [B, S] or [S], got shape {shape}; a multi-channel clip: pass "
                         f"one channel or their mean")
    if waveforms.dim() == 2 and shape[1] <= MAX_CHANNELS < shape[0]:
        raise ValueError(f"{where}: waveforms of shape {shape} look like [samples, channels] (soundfile's layout), "
                         f"not [B, S] clips; pass one channel, w[:, 0], or w.mean(1)")
    return waveforms


def check_lengths(lengths, batch: int, samples: int, where: str = "Fbank", read: bool = False) -> torch.Tensor:
    """``lengths`` (a tensor, a list or a numpy array) as a ``[batch]`` tensor of valid samples per clip, or a
    ``ValueError`` naming what is wrong.

    The values must lie in ``1..samples``. They are checked where reading them waits for no device: lengths given
    as a list or an array (on the host), and a tensor only with ``read`` (the inference entries, which read their
    results anyway); the trainer's lengths, a tensor on its device every step, are not read.
    """
    host = not isinstance(lengths, torch.Tensor)
    if host:
        lengths = torch.as_tensor(np.asarray(lengths))
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"{where}: lengths must have shape [{batch}] (one per clip), got {tuple(lengths.shape)}")
    if host or read:
        bad = (lengths < 1) | (lengths > samples)
        if bad.any():
            raise ValueError(f"{where}: lengths are the valid samples of each clip, 1..{samples} (the waveforms' "
                             f"length), got {lengths[bad].tolist()[:5]} (clips {bad.nonzero().flatten().tolist()[:5]})")
    return lengths


class Fbank(nn.Module):
    """Batched Kaldi log-mel filterbank: waveforms ``[B, S]`` -> features ``[B, T, F]``.

    Args:
        frame_shift_ms: hop between frames in milliseconds (10 in AST; ``10 * C`` for Fshift x C).
        num_mel_bins: number of mel filters F.
        sample_rate: sampling rate of the input waveforms in Hz.
        frame_length_ms: analysis window length in milliseconds.
    """
    def __init__(
        self,
        frame_shift_ms: float = 10.0,
        num_mel_bins: int = 128,
        sample_rate: int = 16000,
        frame_length_ms: float = 25.0,
    ) -> None:
        super().__init__()
        self.frame_shift_ms = float(frame_shift_ms)
        self.frame_length_ms = float(frame_length_ms)
        self.num_mel_bins = int(num_mel_bins)
        self.sample_rate = int(sample_rate)
        # Kaldi rounds the window and hop to whole samples.
        self.frame_shift = int(round(sample_rate * frame_shift_ms / 1000.0))
        self.frame_length = int(round(sample_rate * frame_length_ms / 1000.0))
        if min(self.frame_shift, self.frame_length, self.num_mel_bins) < 1:  # a ZeroDivisionError further on
            raise ValueError(f"Fbank: frame_shift_ms={frame_shift_ms} and frame_length_ms={frame_length_ms} must be at "
                             f"least one sample at {sample_rate} Hz, num_mel_bins={num_mel_bins} positive")
        with warnings.catch_warnings():
            # Lhotse warns that snip_edges=True may mismatch its own duration bookkeeping; we do our
            # own bookkeeping (num_frames) and need Kaldi's framing.
            warnings.filterwarnings("ignore", message=".*snip_edges.*")
            self.layer = Wav2LogFilterBank(
                sampling_rate=sample_rate,
                frame_length=frame_length_ms / 1000.0,
                frame_shift=frame_shift_ms / 1000.0,
                window_type="hanning",
                dither=0.0,
                snip_edges=True,
                high_freq=0.0,
                low_freq=20.0,
                num_filters=num_mel_bins,
                use_energy=False,
            )

    def extra_repr(self) -> str:
        return (
            f"frame_shift_ms={self.frame_shift_ms}, frame_length_ms={self.frame_length_ms}, "
            f"num_mel_bins={self.num_mel_bins}, sample_rate={self.sample_rate}"
        )

    def num_frames(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        """Frames produced for ``num_samples`` samples (an int or a tensor of lengths)."""
        return num_frames(num_samples, self.frame_length, self.frame_shift)

    def samples_for_frames(self, frames: int) -> int:
        """Fewest samples that give ``frames`` frames at this frame shift."""
        return samples_for_frames(frames, self.frame_length, self.frame_shift)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Compute features.

        Args:
            waveforms: ``[B, S]`` (or ``[S]``) float waveforms in [-1, 1] at ``sample_rate`` (a tensor or a numpy
                array; :func:`check_waveforms` says what is refused).
            lengths: optional ``[B]`` numbers of valid samples, ``1..S`` (a tensor, a list or a numpy array);
                samples past them are padding. A tensor's values are not read (:func:`check_lengths`).

        Returns:
            ``[B, T, F]`` log-mel features, ``T = num_frames(S)``, at least 1: waveforms shorter than one window
            (``frame_length_ms``) give one frame of zeros. Frames past a clip's end are 0.

        Raises:
            ValueError: integer or complex samples, more than 2 dimensions, channels last (``[S, C]``), lengths of
                another shape or (given as a list or an array) outside ``1..S``.
        """
        waveforms = check_waveforms(waveforms, "Fbank")
        if waveforms.dim() == 1:
            waveforms = waveforms.unsqueeze(0)
        waveforms = waveforms.float()
        batch, samples = waveforms.shape
        if lengths is None:
            centred = waveforms - waveforms.mean(dim=1, keepdim=True)
        else:
            lengths = check_lengths(lengths, batch, samples, "Fbank")
            lengths = lengths.to(device=waveforms.device, dtype=torch.long, non_blocking=True)
            valid = torch.arange(samples, device=waveforms.device)[None, :] < lengths[:, None]
            mean = (waveforms * valid).sum(dim=1, keepdim=True) / lengths.clamp(min=1)[:, None]
            centred = (waveforms - mean) * valid
        if samples < self.frame_length:  # too short for one window: pad, then drop the frame below
            centred = nn.functional.pad(centred, (0, self.frame_length - samples))
            if lengths is None:
                lengths = torch.full((batch,), samples, device=waveforms.device, dtype=torch.long)
        with torch.autocast(device_type=centred.device.type, enabled=False):
            feats = self.layer(centred)
        if lengths is not None:
            frames_ok = self.num_frames(lengths)
            keep = torch.arange(feats.shape[1], device=feats.device)[None, :] < frames_ok[:, None]
            feats = feats * keep[..., None]
        return feats


@dataclass(frozen=True)
class NormStats:
    """Dataset statistics of the fbank; inputs are normalised to ``(x - mean) / (2 * std)`` as in AST."""
    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std)) or self.std <= 0:
            raise ValueError(f"invalid normalisation statistics: mean={self.mean}, std={self.std}")


# Published statistics (AST / SSAST repositories; VGGSound and VoxCeleb from the paper authors' FlexiAST
# recipes, egs/vggsound and egs/voxceleb). SSAST normalises LibriSpeech with the AudioSet statistics, so
# "librispeech" is an alias. Corpora without a published value get theirs from
# `python -m common.data.corpora stats MANIFEST`.
NORM_STATS: dict[str, NormStats] = {
    "audioset": NormStats(-4.2677393, 4.5689974),
    "librispeech": NormStats(-4.2677393, 4.5689974),
    "esc50": NormStats(-6.6268077, 5.358466),
    "speechcommands": NormStats(-6.845978, 5.5654526),
    "vggsound": NormStats(-5.0767093, 4.4533687),
    "voxceleb": NormStats(-3.7614744, 4.2011642),
}


def resolve_norm_stats(spec: str | NormStats | dict) -> NormStats:
    """Turn a recipe's ``norm`` entry into statistics.

    Args:
        spec: a name from :data:`NORM_STATS`, the path of a JSON file with ``mean`` and ``std`` (what
            ``python -m common.data.corpora stats`` writes), a ``{"mean": .., "std": ..}`` mapping, or
            ``NormStats``.
    """
    if isinstance(spec, NormStats):
        return spec
    if isinstance(spec, dict):
        missing = [k for k in ("mean", "std") if spec.get(k) is None]
        if missing:
            raise ValueError(f"normalisation statistics need 'mean' and 'std', got keys {sorted(map(str, spec))}")
        try:
            return NormStats(float(spec["mean"]), float(spec["std"]))
        except (TypeError, ValueError):  # a string, a list: not a number
            raise ValueError(f"normalisation statistics: mean and std must be numbers, got mean={spec['mean']!r}, "
                             f"std={spec['std']!r}") from None
    if spec in NORM_STATS:
        return NORM_STATS[spec]
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(
                f"normalisation statistics file {path} {'is a folder' if path.is_dir() else 'does not exist'}; "
                f"compute it with `python -m common.data.corpora stats MANIFEST`"
            )
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not a mapping with 'mean' and 'std'")
            return resolve_norm_stats(data)  # (its own keys said where mean or std is missing)
        except (ValueError, OSError, UnicodeDecodeError) as err:  # json's errors are ValueErrors
            raise ValueError(f"normalisation statistics file {path}: {err}") from None
    raise ValueError(
        f"unknown normalisation statistics {spec!r}: use one of {sorted(NORM_STATS)} or a stats JSON file"
    )


def check_norm_name(spec: str) -> None:
    """Raise ``ValueError`` (starting with ``norm``) unless ``spec`` is a known name or names a file.

    The cheap check a config makes when it loads; whether the file exists and holds statistics is
    :func:`resolve_norm_stats`'s job (``common.data.preflight`` calls it before a run starts).
    """
    path = Path(spec)
    if spec in NORM_STATS or path.suffix == ".json" or len(path.parts) > 1 or path.exists():
        return
    raise ValueError(f"norm {spec!r} is neither a known name ({', '.join(sorted(NORM_STATS))}) nor a stats "
                     f"JSON file (`python -m common.data.corpora stats MANIFEST` writes one)")


def normalize(fbank: torch.Tensor, stats: NormStats | str | dict) -> torch.Tensor:
    """``(fbank - mean) / (2 * std)``: roughly zero mean and standard deviation 0.5.

    Args:
        stats: :class:`NormStats`, or what :func:`resolve_norm_stats` takes (a :data:`NORM_STATS` name, a
            ``{"mean": .., "std": ..}`` mapping such as an export's ``norm_stats``, a stats JSON file).
    """
    stats = resolve_norm_stats(stats)
    return (fbank - stats.mean) / (2.0 * stats.std)


def pad_or_crop(fbank: torch.Tensor, target_frames: int, pad_value: float = 0.0) -> torch.Tensor:
    """Zero-pad or cut ``[B, T, F]`` features along time to ``target_frames`` (cut keeps the start)."""
    if target_frames < 1:
        raise ValueError(f"pad_or_crop: target_frames must be positive, got {target_frames}")
    frames = fbank.shape[-2]
    if frames == target_frames:
        return fbank
    if frames > target_frames:
        return fbank[..., :target_frames, :]
    return nn.functional.pad(fbank, (0, 0, 0, target_frames - frames), value=pad_value)
