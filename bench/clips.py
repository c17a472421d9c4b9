"""Clips for the benchmarks: the built-in generator's sounds back to back, unlabeled or as a labeled task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf


def _clip(rng: np.random.Generator, seconds: float, labels: list[str] | None, fixed: str | None) -> np.ndarray:
    from common.data.corpora.synth import SAMPLE_RATE, generate_clip

    parts, total = [], 0
    while total < seconds * SAMPLE_RATE:
        parts.append(generate_clip(fixed or labels[int(rng.integers(len(labels)))], rng))
        total += parts[-1].size
    return np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]


def make_clips(out: Path, count: int, seconds: float = 10.0, rate: int = 16000, fmt: str = "flac",
               labeled: bool = False) -> Path:
    """Write ``count`` clips of ``seconds`` at ``rate`` Hz into ``out`` and a manifest beside them.

    Unlabeled clips mix the generator's classes; ``labeled`` clips repeat one class each (cycling through
    the classes) and carry it as their label.
    """
    from lhotse import CutSet, MonoCut, Recording

    from common.data.corpora.synth import CLASSES, SAMPLE_RATE

    out.mkdir(parents=True, exist_ok=True)
    tag = f"{count}_{rate}" + ("" if seconds == 10.0 else f"_{seconds:g}s") + ("_labeled" if labeled else "")
    manifest = out / f"clips_{tag}.jsonl.gz"
    if manifest.is_file():
        return manifest
    labels = list(CLASSES)
    cuts = []
    for i in range(count):
        label = labels[i % len(labels)] if labeled else None
        wave = _clip(np.random.default_rng([7, i]), seconds, labels, label)
        if rate != SAMPLE_RATE:
            import torch
            import torchaudio

            wave = torchaudio.functional.resample(torch.from_numpy(wave), SAMPLE_RATE, rate).numpy()
        path = out / f"clip{i:04d}_{tag}.{fmt}"
        sf.write(str(path), wave, rate)
        rec = Recording.from_file(path, recording_id=path.stem)
        cuts.append(MonoCut(path.stem, 0, rec.duration, 0, recording=rec, custom={"labels": [label] if label else []}))
    CutSet.from_cuts(cuts).to_file(manifest)
    return manifest


def make_task(out: Path, count: int, seconds: float = 4.0) -> Path:
    """A fine-tuning task file (``finetune/run.py --task``) over ``count`` labeled clips of ``seconds``: the
    generator's classes, training and validation on the same clips (the benchmarks time, they do not score)."""
    from common.data.corpora.synth import CLASSES

    manifest = make_clips(out, count, seconds=seconds, labeled=True)
    classes = out / "classes.json"
    classes.write_text(json.dumps({"classes": list(CLASSES)}))
    task = out / f"task_{count}_{seconds:g}s.yaml"
    frames = int(round(seconds * 100)) // 64 * 64  # a time grid of 16-frame patches that Fshift x4 divides
    task.write_text(f"name: bench\ntrain: [{manifest}]\nvalid: [{manifest}]\nclasses: {classes}\n"
                    f"target_frames: {frames}\nnorm: audioset\nmetric: acc\nloss: ce\n")
    return task
