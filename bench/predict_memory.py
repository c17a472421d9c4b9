"""Peak memory of ``finetune/predict.py`` on one long recording: read a window at a time, or decoded whole.

Writes a stereo 16-bit WAV of ``--minutes`` at ``--rate`` Hz, exports a tiny AST classifier (16 kHz, 64-frame
clips), and runs ``predict.py --json`` on the file in a fresh process, reporting the process's peak resident
memory and its wall time (median of ``--repeats``), and the peak for a 10 s file of the same kind (what the
process takes whatever the file: Python, torch, Lhotse, the model). ``--code DIR`` runs another checkout's
``predict.py`` beside this one's (a "before").

    python -m bench.predict_memory [--minutes 20] [--rate 48000] [--repeats 3] [--code DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _write_wav(path: Path, minutes: float, rate: int) -> None:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", rate, 2, subtype="PCM_16") as out:
        for _ in range(int(minutes * 60)):  # a second at a time: the writer holds no more
            t = np.arange(rate) / rate
            second = 0.2 * np.sin(2 * np.pi * 440 * t)[:, None] + 0.05 * rng.standard_normal((rate, 2))
            out.write(second.astype(np.float32))


def _export(path: Path) -> None:
    import torch

    from common.models.ast.encoder import ASTEncoder, EncoderConfig
    from finetune.classifier import Classifier, save_classifier

    torch.manual_seed(0)
    model = Classifier(ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=64)), 3)
    audio = {"sample_rate": 16000, "num_mel_bins": 128, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
             "target_frames": 64, "norm": "audioset"}
    save_classifier(model, path, ["a", "b", "c"], {"audio": audio, "phase": {"compression": "none", "factor": 1},
                                                   "loss": "bce"})


def _run(code: Path, model: Path, audio: Path, hop: float) -> tuple[float, float, int]:
    """``(peak resident MiB, seconds, windows)`` of one ``predict.py`` process from checkout ``code``."""
    script = ("import resource, runpy, sys\n"
              "sys.argv = sys.argv[1:]\n"
              "try:\n"
              "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
              "finally:\n"
              "    print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, str(code / "finetune" / "predict.py"), "--ckpt", str(model),
                           "--json", "--hop", str(hop), str(audio)], capture_output=True, text=True, env=env,
                          cwd=code)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"predict.py of {code} failed:\n{done.stderr[-2000:]}")
    peak = int(done.stderr.rsplit("PEAK_KIB", 1)[1].split()[0])
    return peak / 1024, seconds, len(json.loads(done.stdout)[0]["windows"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.predict_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the recording (default 20)")
    parser.add_argument("--rate", type=int, default=48000, help="its sampling rate, resampled to 16 kHz (48000)")
    parser.add_argument("--hop", type=float, default=10.0, help="seconds between windows (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per checkout (default 3)")
    parser.add_argument("--code", type=Path, default=None, help="another checkout to run beside this one")
    args = parser.parse_args(argv)  # --help answers without loading torch

    with tempfile.TemporaryDirectory() as tmp:
        audio, short, model = Path(tmp) / "long.wav", Path(tmp) / "short.wav", Path(tmp) / "model.safetensors"
        _write_wav(audio, args.minutes, args.rate)
        _write_wav(short, 10 / 60, args.rate)
        _export(model)
        decoded = args.minutes * 60 * args.rate * 2 * 4 / 2**20
        print(f"{args.minutes:g} min at {args.rate} Hz, stereo ({audio.stat().st_size / 2**20:.0f} MiB on disk, "
              f"{decoded:.0f} MiB as float32), --hop {args.hop:g}")
        print("| code | peak resident memory | seconds | windows | peak for a 10 s file |")
        print("|---|---:|---:|---:|---:|")
        for label, code in [("this checkout", ROOT)] + ([("--code", args.code.resolve())] if args.code else []):
            runs = [_run(code, model, audio, args.hop) for _ in range(args.repeats)]
            peak = statistics.median(r[0] for r in runs)
            floor = statistics.median(_run(code, model, short, args.hop)[0] for _ in range(args.repeats))
            print(f"| {label} ({code.name}) | {peak:.0f} MiB | {statistics.median(r[1] for r in runs):.1f} | "
                  f"{runs[0][2]} | {floor:.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
