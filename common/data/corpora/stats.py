"""Normalisation statistics of a corpus: the fbank mean and std, as AST's ``get_norm_stats``.

Clips are read as in training (first channel, 16 kHz, cut from the start / zero-padded to the clip
length) and featurised with the full-resolution ``Fbank``; the statistics are over every cell of the
padded features, like AST's (whose loader pads with zeros too). They are written beside the manifest as
``NAME.stats.json``; a recipe uses them with ``audio.norm: path/to/NAME.stats.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.audio.fbank import Fbank, pad_or_crop, samples_for_frames
from common.data.bad_audio import BadAudioTracker
from common.data.clips import ClipDataset
from common.data.loader import ClipLoader
from common.data.manifests import count_clips, open_cuts
from common.system.atomic import atomic_write_text
from common.system.logger import progress

__all__ = ["stats_path", "compute_stats"]


def stats_path(manifest: str | Path) -> Path:
    manifest = Path(manifest)
    name = manifest.name.removesuffix(".gz").removesuffix(".jsonl")
    return manifest.with_name(f"{name}.stats.json")


def compute_stats(manifest: str | Path, target_frames: int = 1024, num_mel_bins: int = 128,
                  max_clips: int | None = None, workers: int = 2, batch_size: int = 16) -> dict:
    """Compute and write the statistics of ``manifest``; returns them (with the output path)."""
    fbank = Fbank(num_mel_bins=num_mel_bins)
    cuts = open_cuts([manifest])
    if max_clips is not None:
        cuts = cuts.subset(first=max_clips)
    dataset = ClipDataset(samples_for_frames(target_frames, fbank.frame_length, fbank.frame_shift), crop="start")
    tracker = BadAudioTracker(max_fraction=1.0, split=Path(manifest).name.split(".jsonl")[0])  # said in its warnings
    loader = ClipLoader(cuts, dataset, batch_size, shuffle=False, drop_last=False, rank=0, world_size=1,
                        num_workers=workers, tracker=tracker)
    total, total_sq, cells, clips = 0.0, 0.0, 0, 0
    expected = count_clips(manifest)
    if expected is not None and max_clips is not None:
        expected = min(expected, max_clips)
    bar = progress(expected, 0, f"statistics of {Path(manifest).name}", True, unit="clip")
    with torch.no_grad(), bar:
        for batch in loader.batches(epochs=1):
            bar.update(len(batch) + len(batch.bad))
            if not len(batch):
                continue
            feats = pad_or_crop(fbank(batch.waveforms, batch.lengths), target_frames).double()
            total += feats.sum().item()
            total_sq += feats.pow(2).sum().item()
            cells += feats.numel()
            clips += len(batch)
    if not clips:
        raise ValueError(f"{manifest}: no readable clip to compute statistics from")
    mean = total / cells
    std = max(total_sq / cells - mean**2, 0.0) ** 0.5
    out = stats_path(manifest)
    result = {"mean": mean, "std": std, "clips": clips, "bad_clips": loader.tracker.bad,
              "target_frames": target_frames, "num_mel_bins": num_mel_bins, "manifest": str(manifest)}
    atomic_write_text(out, json.dumps(result, indent=1))  # a killed run leaves the old file or none
    return {**result, "path": str(out)}
