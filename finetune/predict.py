"""Tag audio files with a fine-tuned model: the top-k classes and their scores for each file.

    python finetune/predict.py --ckpt runs/finetune/vggsound-baseline dog.wav street.flac
    python finetune/predict.py --ckpt model.safetensors --top-k 3 --json long_recording.wav

Audio of any sampling rate is resampled to the model's; audio longer than the model's clip length is
cut into windows (``--hop`` seconds apart, the last one aligned with the end) whose scores are averaged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["windows", "predict_file", "main"]


def windows(num_samples: int, clip: int, hop: int) -> list[int]:
    """Start offsets of the windows covering ``num_samples`` samples (one window if it fits)."""
    if num_samples <= clip:
        return [0]
    starts = list(range(0, num_samples - clip + 1, hop))
    if starts[-1] != num_samples - clip:
        starts.append(num_samples - clip)
    return starts


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """First channel of ``path`` at ``sample_rate`` (Lhotse decodes and resamples)."""
    from lhotse import Recording

    try:
        rec = Recording.from_file(path)
        if rec.sampling_rate != sample_rate:
            rec = rec.resample(sample_rate)
        audio = rec.load_audio()
    except Exception as err:  # noqa: BLE001 - any decoder failure
        raise ValueError(f"cannot read audio {path}: {str(err).splitlines()[0] if str(err) else err}") from None
    wave = np.asarray(audio[0], dtype=np.float32)
    if wave.size == 0 or not np.isfinite(wave).all():
        raise ValueError(f"audio {path} is empty or holds non-finite samples")
    return wave


def predict_file(model, meta: dict, path: str | Path, hop_seconds: float | None = None,
                 batch_size: int = 16, device: torch.device = torch.device("cpu")) -> np.ndarray:
    """Per-class scores of one file, averaged over its windows."""
    from finetune.evaluate import clip_for_export, predict_scores

    sample_rate, clip = clip_for_export(meta)
    wave = load_audio(path, sample_rate)
    hop = max(1, int(round(hop_seconds * sample_rate))) if hop_seconds else max(1, clip // 2)
    starts = windows(wave.size, clip, hop)
    scores = []
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        batch = torch.zeros(len(chunk), clip)
        lengths = torch.zeros(len(chunk), dtype=torch.long)
        for j, start in enumerate(chunk):
            piece = wave[start : start + clip]
            batch[j, : piece.size] = torch.from_numpy(piece)
            lengths[j] = piece.size
        scores.append(predict_scores(model, meta, batch.to(device), lengths.to(device)).cpu())
    return torch.cat(scores).mean(0).numpy()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune/predict.py",
                                     description="Top-k labels with scores for audio files, from a fine-tuned model.",
                                     epilog="example: python finetune/predict.py --ckpt runs/finetune/synth-baseline "
                                            "data/synth/synth_audio/test/*.flac")
    parser.add_argument("--ckpt", required=True, help="a fine-tuning run directory or a classifier export")
    parser.add_argument("audio", nargs="+", help="audio files (any format libsndfile reads, any sampling rate)")
    parser.add_argument("--top-k", type=int, default=5, help="labels to show per file (default 5)")
    parser.add_argument("--hop", type=float, default=None, help="seconds between windows (default: half a clip)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from finetune.classifier import load_classifier

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, meta = load_classifier(args.ckpt)
        model.to(device)
        classes = meta["classifier"]["classes"]
        names = meta.get("class_names", {})
        results = []
        for path in args.audio:
            scores = predict_file(model, meta, path, args.hop, device=device)
            top = np.argsort(-scores)[: args.top_k]
            results.append({"file": path, "labels": [{"label": classes[i], "name": names.get(classes[i], classes[i]),
                                                      "score": float(scores[i])} for i in top]})
        if args.json:
            print(json.dumps(results, indent=1))
        else:
            for r in results:
                print(r["file"])
                for item in r["labels"]:
                    print(f"  {item['score']:.3f}  {item['name']}")
        return 0

    from common.cli import run_main

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
