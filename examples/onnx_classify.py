"""Classify audio files with an exported ONNX model: numpy, onnxruntime and soundfile (or the wave module), no PyTorch.

    python -m finetune.onnx_export runs/finetune/esc50-baseline/fold1 --out esc50.onnx
    python examples/onnx_classify.py esc50.onnx dog.wav street.flac
    python examples/onnx_classify.py esc50.onnx --json long_recording.wav > scores.json

The graph holds the whole model, front end included: it takes waveforms ``[batch, clip_samples]`` at the
model's sample rate, each row zero-padded to ``clip_samples``, with the valid samples of each row in
``lengths``, and returns the class scores. Everything else it needs is in the model's metadata (key
``coarse2fine_ast``): the labels, the sample rate, the clip length and how windows aggregate. As in
``finetune/predict.py``, a file longer than one clip is cut into windows half a clip apart (the last one
ending with the file), and its score per class is the max over windows (BCE / multi-label models) or the
mean (softmax models; the last window weighted by the share of a hop it moves on). Files must already be at the
model's sample rate (this script does not resample).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnxruntime

META_KEY = "coarse2fine_ast"


def read_audio(path: str, mix: str = "first") -> tuple[np.ndarray, int]:
    """``path`` as float32 in [-1, 1], its first channel or (``mix="mean"``: the model's metadata ``channels`` says
    which) the mean of its channels, and its sample rate."""
    try:
        import soundfile
    except ImportError:  # the standard library reads PCM WAV
        import wave

        with wave.open(path, "rb") as handle:
            width, channels, rate = handle.getsampwidth(), handle.getnchannels(), handle.getframerate()
            raw = handle.readframes(handle.getnframes())
        if width not in (2, 4):
            raise ValueError(f"{path}: {8 * width}-bit WAV; install soundfile to read it")
        data = np.frombuffer(raw, dtype=np.int16 if width == 2 else np.int32).reshape(-1, channels)
        data = (data / float(2 ** (8 * width - 1))).astype(np.float32)
    else:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return (data.mean(axis=1) if mix == "mean" else data[:, 0]).astype(np.float32), rate


def windows(num_samples: int, clip: int, hop: int) -> list[int]:
    """Start offsets of the windows covering ``num_samples`` samples (one window if it fits)."""
    if num_samples <= clip:
        return [0]
    starts = list(range(0, num_samples - clip + 1, hop))
    if starts[-1] != num_samples - clip:
        starts.append(num_samples - clip)
    return starts


def classify(session: onnxruntime.InferenceSession, info: dict, wave: np.ndarray, batch_size: int = 16) -> dict:
    """Scores of one waveform at the model's rate: per window and aggregated."""
    clip = info["clip_samples"]
    hop = max(1, clip // 2)
    starts = windows(wave.size, clip, hop)
    rows = []
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        waves = np.zeros((len(chunk), clip), dtype=np.float32)
        lengths = np.zeros(len(chunk), dtype=np.int64)
        for j, start in enumerate(chunk):
            piece = wave[start : start + clip]
            if info.get("pad") == "repeat" and 0 < piece.size < clip:  # a short file, as the model was validated
                piece = np.tile(piece, -(-clip // piece.size))[:clip]
            waves[j, : piece.size] = piece
            lengths[j] = piece.size
        rows.append(session.run(["scores"], {"waveforms": waves, "lengths": lengths})[0])
    per_window = np.concatenate(rows)
    weights = np.ones(len(starts))
    if len(starts) > 1 and starts[-1] - starts[-2] < hop:  # the last window moves on less than a hop: it counts
        weights[-1] = min(starts[-1] - starts[-2], clip) / min(hop, clip)  # for the new audio it covers
    scores = per_window.max(0) if info["aggregate"] == "max" else np.average(per_window, 0, weights)
    rate = info["sample_rate"]
    return {"duration": wave.size / rate, "aggregate": info["aggregate"], "scores": scores,
            "windows": [(s / rate, min(s + clip, wave.size) / rate, row) for s, row in zip(starts, per_window)]}


def labels_to_show(text: str) -> int:
    """``--top-k``: a whole number >= 1, refused in the words of the package's commands
    (``common.system.prog.whole_number``; this script imports nothing of the package)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of labels >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Top-k labels of audio files with an ONNX model exported by "
                                                 "python -m finetune.onnx_export (no PyTorch needed).")
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("audio", nargs="+", help="audio files at the model's sample rate")
    parser.add_argument("--top-k", type=labels_to_show, default=5, help="labels per file (default 5)")
    parser.add_argument("--json", action="store_true", help="print every class's score per file and window")
    args = parser.parse_args(argv)

    try:
        session = onnxruntime.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for a missing or broken file
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        print(f"error: {args.model}: cannot be loaded as an ONNX model ({reason})", file=sys.stderr)
        return 2
    meta = session.get_modelmeta().custom_metadata_map
    if META_KEY not in meta:
        print(f"error: {args.model} has no {META_KEY!r} metadata: export it with python -m finetune.onnx_export",
              file=sys.stderr)
        return 2
    info = json.loads(meta[META_KEY])
    classes, names = info["classes"], info["class_names"]
    results, failed = [], 0
    for path in args.audio:
        try:
            wave, rate = read_audio(path, info.get("channels", "first"))
            if rate != info["sample_rate"]:
                raise ValueError(f"{rate} Hz audio; the model takes {info['sample_rate']} Hz: resample it first "
                                 f"(e.g. sox {path} -r {info['sample_rate']} out.wav)")
            if wave.size == 0:
                raise ValueError("empty audio (0 samples)")
        except Exception as err:  # noqa: BLE001 - report the file and go on with the others
            print(f"error: {path}: {err}", file=sys.stderr)
            results.append({"file": path, "error": str(err)})
            failed += 1
            continue
        result = classify(session, info, wave)
        top = np.argsort(-result["scores"], kind="stable")[: args.top_k]
        warning = {}
        if wave.size < 0.1 * info["clip_samples"]:  # as predict.py: mostly zero padding
            warning = {"warning": f"{result['duration']:.3g} s of audio, shorter than a tenth of the model's "
                                  f"{info['clip_samples'] / info['sample_rate']:.3g} s clip: unreliable scores"}
            print(f"warning: {path}: {warning['warning']}", file=sys.stderr)
        results.append({"file": path, "duration": result["duration"], "aggregate": result["aggregate"], **warning,
                        "labels": [{"label": classes[i], "name": names.get(classes[i], classes[i]),
                                    "score": float(result["scores"][i])} for i in top],
                        "scores": {c: float(s) for c, s in zip(classes, result["scores"])},
                        "windows": [{"start": a, "end": b, "scores": {c: float(s) for c, s in zip(classes, row)}}
                                    for a, b, row in result["windows"]]})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            if "error" in r:
                continue
            print(f"{r['file']}  ({r['duration']:.2f} s, {len(r['windows'])} window(s))")
            for item in r["labels"]:
                print(f"  {item['score']:.3f}  {item['name']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
