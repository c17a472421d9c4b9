"""Tag audio files with a fine-tuned model: the top-k classes of each file, and of each window of a long one.

    python finetune/predict.py --ckpt runs/finetune/vggsound-baseline dog.wav street.flac
    python finetune/predict.py --ckpt runs/finetune/vggsound-baseline --windows long_recording.flac
    python finetune/predict.py --ckpt runs/finetune/vggsound-baseline --json recordings/ > scores.json
    python finetune/predict.py --ckpt model.safetensors --json *.wav > scores.json
    python finetune/predict.py --ckpt my_hf_ast_dir clip.wav          # a Hugging Face AST directory

A folder stands for its audio files (``common.data.audio_file.AUDIO_SUFFIXES``: .wav, .flac, .aiff, .aif, .w64,
.rf64, .caf, .ogg, .mp3, .opus), at any depth, sorted.
Audio of any sampling rate is resampled to the model's. A file longer than the model's clip is cut into
windows of one clip, ``--hop`` seconds apart (default: half a clip), the last one ending with the file; a
shorter file is one window, zero-padded as in training. A WAV, FLAC, AIFF, W64, RF64 or CAF file is read a
window at a time (``common.data.audio_file``): a recording of hours takes no more memory than a few windows;
other formats are decoded whole. A file's scores aggregate its windows'
(``--aggregate``):

- ``max`` (the default for models trained with BCE, i.e. multi-label tasks): each class's highest window
  score, so an event heard in one window of a long recording keeps its score instead of being averaged away;
- ``mean`` (the default for softmax / cross-entropy models, one class per clip): the mean of the windows'
  class probabilities, which is still a distribution over the classes; the last window, placed to end with the
  file, counts for the share of a hop it moves on (10 ms of new audio is not a whole window more).

``--windows`` also lists each window's start and end time with its top classes; ``--json`` prints, per
file, every class's aggregated score and, per window, its start, end and every class's score (the output
scripts and the Hugging Face exactness test read). A file shorter than a tenth of the model's clip is
scored, but with a warning (on stderr, and as ``warning`` in its JSON entry): the model then sees mostly
zero padding and its scores are unreliable. A file that cannot be read (missing, not audio,
corrupt) is reported with its full reason and the other files are still tagged; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.data.audio_file import (
    AudioFile,
    AudioReadError,
    audio_suffixes,
    folder_audio,
    hop_samples,
    hop_seconds,
    pad_windows,
    repeat_to,
    window_weights,
    windows,
)
from common.system.prog import DEVICE_HELP, error_line, prog, whole_number

if TYPE_CHECKING:
    import torch

# Imports the command alone needs are inside its functions: --help answers without loading torch.

__all__ = ["AGGREGATIONS", "SHORT_FRACTION", "FilePrediction", "aggregate_rule", "short_warning", "predict_file",
           "main"]

AGGREGATIONS = ("auto", "max", "mean")
SHORT_FRACTION = 0.1  # a file shorter than this share of the model's clip is scored with a warning


@dataclass(frozen=True)
class FilePrediction:
    """Scores of one file.

    Args:
        file: the path as given.
        duration: seconds of audio.
        starts, ends: each window's start and end in seconds (the end is the file's end for the last one).
        window_scores: ``[windows, classes]`` scores (sigmoid for BCE models, softmax otherwise).
        scores: ``[classes]``, the windows aggregated by ``aggregate``.
        aggregate: ``max`` or ``mean``.
        warning: why the scores are unreliable (a file much shorter than the model's clip), or None.
    """

    file: str
    duration: float
    starts: list[float]
    ends: list[float]
    window_scores: np.ndarray
    scores: np.ndarray
    aggregate: str
    warning: str | None = None


def short_warning(num_samples: int, clip: int, rate: int, repeat: bool = False) -> str | None:
    """The warning for a file of ``num_samples`` shorter than :data:`SHORT_FRACTION` of a ``clip``, or None
    (``repeat``: the model fills a short clip by repeating it, ``data.pad: repeat``)."""
    if num_samples >= SHORT_FRACTION * clip:
        return None
    sees = "the file repeated more than ten times" if repeat else "mostly zero padding"
    return (f"{num_samples / rate:.3g} s of audio, shorter than {SHORT_FRACTION * clip / rate:.3g} s (a tenth of the "
            f"model's {clip / rate:.3g} s clip): the model sees {sees} and the scores are unreliable")


def aggregate_rule(meta: dict, choice: str = "auto") -> str:
    """The rule combining a file's windows: ``choice``, or for ``auto`` ``max`` for BCE (multi-label) models
    and ``mean`` for softmax models."""
    if choice not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {choice!r}; choose one of {', '.join(AGGREGATIONS)}")
    if choice != "auto":
        return choice
    return "max" if meta.get("loss") == "bce" else "mean"


def predict_file(model: torch.nn.Module, meta: dict, path: str | Path, hop_seconds: float | None = None,
                 batch_size: int = 16, device: str | torch.device | None = None,
                 aggregate: str = "auto") -> FilePrediction:
    """Score every window of one file and aggregate them (see the module docstring), on ``device``: the model's
    (the default; move the model with ``model.to(device)`` to score elsewhere).

    Raises:
        AudioReadError: the file cannot be read; its message is ``"PATH: reason"``, its ``path`` and ``reason``
            attributes the two parts (a caller looping over files knows which one failed).
        ValueError: a ``device`` that is not the model's.
    """
    import torch

    from finetune.inference import clip_for_export, clip_handling, predict_scores

    held, wanted = next(model.parameters()).device, torch.device(device or "cpu")
    if device is not None and (wanted.type != held.type or wanted.index not in (None, held.index)):  # "cuda": any
        raise ValueError(f"predict_file: device {device}, but the model is on {held}: move it first "
                         f"(model.to({str(device)!r}))")
    device = held
    rate, clip = clip_for_export(meta)
    handling = clip_handling(meta)
    repeat = handling["pad"] == "repeat"  # a file shorter than the clip, repeated as in validation
    rule = aggregate_rule(meta, aggregate)
    hop = hop_samples(hop_seconds, rate, max(1, clip // 2))
    scores = []
    try:
        with AudioFile(path, rate, handling["channels"]) as audio:  # a window at a time: a long file is never whole
            size = audio.num_samples
            starts = windows(size, clip, hop)
            for i in range(0, len(starts), batch_size):
                pieces = []
                for start in starts[i : i + batch_size]:
                    piece = audio.read(start, clip)
                    pieces.append(repeat_to(piece, clip) if repeat else piece)
                batch, lengths = pad_windows(pieces, clip)
                scores.append(predict_scores(model, meta, batch.to(device), lengths.to(device)).cpu())
    except AudioReadError as err:  # the reader's message is the reason alone (the commands print the path)
        failed = AudioReadError(f"{path}: {err}")
        failed.path, failed.reason = str(path), str(err)
        raise failed from None
    per_window = torch.cat(scores).numpy()
    combined = per_window.max(0) if rule == "max" else np.average(per_window, 0, window_weights(starts, hop, clip))
    return FilePrediction(str(path), size / rate, [s / rate for s in starts],
                          [min(s + clip, size) / rate for s in starts], per_window, combined, rule,
                          short_warning(size, clip, rate, repeat))


def expand_folders(paths: list[str]) -> list[str]:
    """The files to tag: each path as given, a folder's audio files (any depth, sorted) in its place (a folder
    without any stays, to be reported)."""
    files = []
    for path in paths:
        found = [str(p) for p in folder_audio(path)] if Path(path).is_dir() else []
        files += found or [path]
    return files


def _top(scores: np.ndarray, classes: list[str], names: dict, k: int) -> list[dict]:
    return [{"label": classes[i], "name": names.get(classes[i], classes[i]), "score": float(scores[i])}
            for i in np.argsort(-scores, kind="stable")[:k]]


def _entry(pred: FilePrediction, classes: list[str], names: dict, top_k: int) -> dict:
    return {"file": pred.file, "duration": pred.duration, "aggregate": pred.aggregate,
            **({"warning": pred.warning} if pred.warning else {}),
            "labels": _top(pred.scores, classes, names, top_k),
            "scores": {c: float(s) for c, s in zip(classes, pred.scores)},
            "windows": [{"start": start, "end": end, "scores": {c: float(s) for c, s in zip(classes, row)}}
                        for start, end, row in zip(pred.starts, pred.ends, pred.window_scores)]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("finetune/predict.py"),
        description="Top-k labels with scores for audio files, from a fine-tuned model. Files longer than the "
                    "model's clip are cut into windows; a file's score per class is the MAX over its windows for "
                    "models trained with BCE (multi-label: an event in one window stays visible) and the MEAN "
                    "of the windows' probabilities for softmax models (--aggregate changes it). Unreadable files "
                    "are reported and skipped; the exit status is then 1.",
        epilog="example: python finetune/predict.py --ckpt runs/finetune/synth-baseline --windows "
               "data/synth/synth_audio/test/*.flac")
    parser.add_argument("--ckpt", required=True,
                        help="a fine-tuning run directory, a classifier export, or a Hugging Face AST directory")
    parser.add_argument("audio", nargs="+", help="audio files (any format libsndfile reads, any sampling rate) or "
                                                 f"folders (their {audio_suffixes()} files, any depth)")
    parser.add_argument("--top-k", type=whole_number(1, "of labels >= 1"), default=5,
                        help="labels to show per file and window (default 5)")
    parser.add_argument("--hop", type=hop_seconds, default=None, help="seconds between windows (default: half a clip)")
    parser.add_argument("--aggregate", choices=AGGREGATIONS, default="auto",
                        help="how a file's windows combine: max, mean, or auto (default: max for BCE / multi-label "
                             "models, mean for softmax models)")
    parser.add_argument("--windows", action="store_true",
                        help="also list every window's start and end time (s) with its top-k labels")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--json", action="store_true",
                        help="print JSON: per file its duration, aggregation, top-k labels, every class's score and "
                             "per window its start, end and every class's score; unreadable files as "
                             "{file, error}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from common.system.distributed import single_process

        single_process("c2f-predict")
        import torch

        from common.cli import command_device
        from finetune.classifier import load_classifier

        device = torch.device(command_device(args.device))
        model, meta = load_classifier(args.ckpt)
        model.to(device)
        classes = list(meta["classifier"]["classes"])
        names = meta.get("class_names", {})
        results, folders = [], set()  # (folders: the indices of empty folders' entries)
        for path in expand_folders(args.audio):
            if Path(path).is_dir():  # an empty folder: named, but no file of it failed to be read
                results.append({"file": path, "error": f"a folder holding no audio files ({audio_suffixes()})"})
                folders.add(len(results) - 1)
                continue
            try:
                pred = predict_file(model, meta, path, args.hop, device=device, aggregate=args.aggregate)
            except AudioReadError as err:
                results.append({"file": path, "error": err.reason})
                continue
            results.append(_entry(pred, classes, names, args.top_k))
        if args.json:
            print(json.dumps(results, indent=1))
        else:
            for r in results:
                if "error" in r:
                    print(f"{r['file']}\n  error: {r['error']}")
                    continue
                count = len(r["windows"])
                how = f"{count} windows, {r['aggregate']} over windows" if count > 1 else "1 window"
                short = "; too short: unreliable scores" if "warning" in r else ""
                print(f"{r['file']}  ({r['duration']:.2f} s, {how}{short})")
                for item in r["labels"]:
                    print(f"  {item['score']:.3f}  {item['name']}")
                if args.windows:
                    for w in r["windows"]:
                        top = _top(np.array(list(w["scores"].values())), classes, names, args.top_k)
                        print(f"    {w['start']:.2f}-{w['end']:.2f} s  "
                              + ", ".join(f"{t['score']:.3f} {t['name']}" for t in top))
        for r in results:
            if "warning" in r:
                print(f"warning: {error_line(r['file'] + ': ' + r['warning'])}", file=sys.stderr)
        failed = [r for r in results if "error" in r]
        for r in failed:
            print(f"error: {error_line(r['file'] + ': ' + r['error'])}", file=sys.stderr)
        files = [r for i, r in enumerate(results) if i not in folders]
        unread = [r for r in files if "error" in r]
        if unread:
            print(f"error: {len(unread)} of {len(files)} files could not be read", file=sys.stderr)
        return 1 if failed else 0

    from common.cli import run_main

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
