"""A batch of waveforms (:class:`Batch`) and the dataset that makes it from a batch of cuts in the loader's worker
processes (:class:`ClipDataset`): decoded (``common.data.decode``), cropped or zero-padded to the model's clip
length, with multi-hot targets (:class:`LabelEncoder`).

Random crops are drawn from ``(seed, epoch, cut id)``, so a resumed run crops exactly as an uninterrupted one.
Features are made later, on the training device (``common.audio.pipeline``), so one loader serves every
compression method.

Resampling up. A clip recorded below the model's rate (16 kHz VGGSound clips into HTS-AT's 32 kHz front end)
holds nothing above its own Nyquist frequency, so the model's upper mel bins stay empty for it. Such clips
are counted per batch (``Batch.upsampled``, in the loader workers); the bad-audio tracker says so once per run,
with the rates, and keeps the counts, which the trainer adds up over ranks into ``ledger.json`` (``upsampled``).
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Sequence

import numpy as np
import torch

from common.data.audio_file import repeat_to
from common.data.cache import ClipCache
from common.data.decode import CHANNELS, BadClip, load_clip, source_path
from common.data.shared_memory import share

__all__ = ["CROPS", "LabelEncoder", "Batch", "ClipDataset"]


CROPS = ("random", "start", "center")


class LabelEncoder:
    """Class ids -> multi-hot target vectors, in the order of the class list."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.index = {c: i for i, c in enumerate(self.classes)}
        if len(self.index) != len(self.classes):
            raise ValueError("class list has duplicates")

    def __len__(self) -> int:
        return len(self.classes)

    def encode(self, labels: Iterable[str], cut_id: str = "?") -> torch.Tensor:
        target = torch.zeros(len(self.classes))
        for label in labels:
            if label not in self.index:
                raise ValueError(f"clip {cut_id} has label {label!r}, which is not in the task's class list")
            target[self.index[label]] = 1.0
        return target


@dataclass
class Batch:
    """A batch of clips, zero-padded to the clip length.

    Attributes:
        waveforms: ``[B, S]`` float32.
        lengths: ``[B]`` valid samples per clip.
        targets: ``[B, K]`` multi-hot targets, or None for unlabeled data.
        ids: cut ids.
        bad: ``(path, reason)`` of the clips of this batch that were left out.
        epoch, index: position of the batch in the stream (index within the epoch).
        upsampled: ``{(clip rate, target rate): clips}`` for the clips resampled up to a higher rate.
    """
    waveforms: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor | None
    ids: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)
    epoch: int = 0
    index: int = 0
    upsampled: dict[tuple[int, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def pin_memory(self) -> "Batch":
        self.waveforms = self.waveforms.pin_memory()
        self.lengths = self.lengths.pin_memory()
        if self.targets is not None:
            self.targets = self.targets.pin_memory()
        return self


class ClipDataset(torch.utils.data.Dataset):
    """Turns a batch of cuts into a :class:`Batch` (runs in DataLoader workers).

    Args:
        clip_samples: every clip is cropped / zero-padded to this many samples.
        sample_rate: target sampling rate.
        classes: class list for targets (None: unlabeled).
        crop: where a longer clip is cut: ``start`` (AST and SSAST, training and evaluation), ``random``
            (a window drawn from ``(seed, epoch, clip id)``) or ``center``.
        seed: seed of the random crops.
        pad: ``zeros`` (a shorter clip is zero-padded) or ``repeat`` (it is repeated to the clip length).
        cache: decoded clips kept between epochs (``common.data.cache``), or None.
        channels: ``first`` or ``mean`` (:func:`load_clip`).
    """

    def __init__(self, clip_samples: int, sample_rate: int = 16000, classes: Sequence[str] | None = None,
                 crop: str = "start", seed: int = 0, pad: str = "zeros", cache: ClipCache | None = None,
                 channels: str = "first") -> None:
        if crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}; choose one of {list(CROPS)}")
        if pad not in ("zeros", "repeat"):
            raise ValueError(f"unknown pad {pad!r}; choose 'zeros' or 'repeat'")
        if channels not in CHANNELS:
            raise ValueError(f"unknown channels {channels!r}; choose one of {list(CHANNELS)}")
        self.channels = channels
        self._decode = partial(load_clip, channels=channels)  # and the clip cache's name for it (first: none)
        self._variant = "" if channels == "first" else channels
        self.pad = pad
        self.clip_samples = clip_samples
        self.sample_rate = sample_rate
        self.encoder = LabelEncoder(classes) if classes is not None else None
        self.crop = crop
        self.seed = seed
        self.cache = cache

    def _crop(self, wave: np.ndarray, cut_id: str, epoch: int) -> np.ndarray:
        extra = wave.size - self.clip_samples
        if extra < 0 and self.pad == "repeat":
            return repeat_to(wave, self.clip_samples)
        if extra <= 0:
            return wave
        if self.crop == "start":
            start = 0
        elif self.crop == "center":
            start = extra // 2
        else:
            rng = np.random.default_rng([self.seed, epoch, zlib.crc32(cut_id.encode())])
            start = int(rng.integers(0, extra + 1))
        return wave[start : start + self.clip_samples]

    def __getitem__(self, item) -> Batch:
        epoch, index, cuts = item
        waves, lengths, targets, ids, bad, upsampled = [], [], [], [], [], Counter()
        for cut in cuts:
            try:
                wave = self._decode(cut, self.sample_rate) if self.cache is None else \
                    self.cache.load(cut, self.sample_rate, self._decode, self._variant)
                wave = self._crop(wave, cut.id, epoch)
            except BadClip as err:
                bad.append((source_path(cut), str(err)))
                continue
            if self.encoder is not None:
                targets.append(self.encoder.encode(cut.custom.get("labels", []), cut.id))
            waves.append(wave)
            lengths.append(wave.size)
            ids.append(cut.id)
            if cut.sampling_rate < self.sample_rate:
                upsampled[(int(cut.sampling_rate), int(self.sample_rate))] += 1
        out = torch.zeros(len(waves), self.clip_samples)
        for i, wave in enumerate(waves):
            out[i, : wave.size] = torch.from_numpy(wave)
        target = None
        if self.encoder is not None:
            target = torch.stack(targets) if targets else torch.zeros(0, len(self.encoder))
        lengths = torch.tensor(lengths, dtype=torch.long)
        if torch.utils.data.get_worker_info() is not None:  # a full /dev/shm is this worker's error, not a hang
            share(out, lengths, target)
        return Batch(out, lengths, target, ids, bad, epoch, index, dict(upsampled))

    def batch_bytes(self, batch_size: int) -> int:
        """The tensors of a batch of ``batch_size`` clips, in bytes (what a worker hands over in shared memory)."""
        per_clip = self.clip_samples * 4 + 8 + (len(self.encoder) * 4 if self.encoder is not None else 0)
        return batch_size * per_clip
