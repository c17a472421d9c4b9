"""A folder of 10 s clips for the benchmarks: the built-in generator's sounds, back to back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def make_clips(out: Path, count: int, seconds: float = 10.0, rate: int = 16000, fmt: str = "flac") -> Path:
    """Write ``count`` clips of ``seconds`` at ``rate`` Hz into ``out`` and a manifest beside them."""
    from lhotse import CutSet, MonoCut, Recording

    from common.corpora.synth import CLASSES, SAMPLE_RATE, generate_clip

    out.mkdir(parents=True, exist_ok=True)
    manifest = out / f"clips_{count}_{rate}.jsonl.gz"
    if manifest.is_file():
        return manifest
    labels = list(CLASSES)
    cuts = []
    for i in range(count):
        rng = np.random.default_rng([7, i])
        parts, total = [], 0
        while total < seconds * SAMPLE_RATE:
            parts.append(generate_clip(labels[int(rng.integers(len(labels)))], rng))
            total += parts[-1].size
        wave = np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]
        if rate != SAMPLE_RATE:
            import torch
            import torchaudio

            wave = torchaudio.functional.resample(torch.from_numpy(wave), SAMPLE_RATE, rate).numpy()
        path = out / f"clip{i:04d}_{rate}.{fmt}"
        sf.write(str(path), wave, rate)
        rec = Recording.from_file(path, recording_id=path.stem)
        cuts.append(MonoCut(path.stem, 0, rec.duration, 0, recording=rec, custom={"labels": []}))
    CutSet.from_cuts(cuts).to_file(manifest)
    return manifest
