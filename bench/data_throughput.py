"""Data throughput: can the loader and the front end keep the encoder busy in the cheapest phase?

Measures, for 10 s clips:
  - clips/s through the loader (decode + resample + crop + batching) per worker count, for
    16 kHz FLAC and for 44.1 kHz WAV (which must be resampled);
  - clips/s through ``Fbank`` on the device at 10 ms and 40 ms frame shift (batched);
  - clips/s the SSAST encoder consumes in the cheapest phase of ``recipes/ssast_fshift4.yaml``
    (forward + backward of both objectives + Adam step), with the model size given.
The target (issue "Data"): the loader sustains at least twice what the encoder consumes.

    python -m bench.data_throughput [--workers 0,1,2] [--clips 48] [--model tiny|base]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch


def loader_rate(manifest: Path, workers: int, batch: int, clip_samples: int, clips_to_time: int = 960) -> float:
    from common.data.bad_audio import BadAudioTracker
    from common.data.clips import ClipDataset
    from common.data.loader import ClipLoader
    from common.data.manifests import open_cuts

    loader = ClipLoader(open_cuts([manifest]), ClipDataset(clip_samples, 16000), batch, shuffle=True, drop_last=True,
                        rank=0, world_size=1, num_workers=workers, tracker=BadAudioTracker(1.0))
    per_epoch = sum(1 for _ in open_cuts([manifest])) // batch * batch
    stream = loader.batches(epochs=1 + -(-clips_to_time // per_epoch))
    next(stream)  # start-up (worker spawn) is not throughput
    start, clips = time.perf_counter(), 0
    for batch in stream:
        clips += len(batch)
    return clips / (time.perf_counter() - start)


def fbank_rate(shift_ms: float, batch: int, clip_samples: int, device: torch.device, repeats: int = 20) -> float:
    from common.audio.fbank import Fbank

    fb = Fbank(frame_shift_ms=shift_ms).to(device)
    waves = torch.randn(batch, clip_samples, device=device) * 0.1
    fb(waves)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fb(waves)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/data_throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (default 0,1,2)")
    parser.add_argument("--clips", type=int, default=48, help="10 s clips to generate (default 48)")
    parser.add_argument("--batch", type=int, default=24, help="clips per batch (default 24, SSAST's)")
    parser.add_argument("--model", default="tiny", choices=["tiny", "small", "base"], help="encoder size")
    parser.add_argument("--dir", type=Path, default=Path("runs/bench_clips"), help="where the clips go")
    args = parser.parse_args(argv)
    from bench.clips import make_clips
    from common.audio.pipeline import AudioConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip_samples = AudioConfig().clip_samples
    flac = make_clips(args.dir, args.clips, rate=16000, fmt="flac")
    wav44 = make_clips(args.dir, args.clips, rate=44100, fmt="wav")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, torch {torch.__version__}")
    print("| stage | setting | clips/s |\n|---|---|---:|")
    for workers in (int(w) for w in args.workers.split(",")):
        rate = loader_rate(flac, workers, args.batch, clip_samples)
        print(f"| loader, 16 kHz FLAC | {workers} worker(s) | {rate:.1f} |")
        print(f"| loader, 44.1 kHz WAV (resampled) | {workers} worker(s) | "
              f"{loader_rate(wav44, workers, args.batch, clip_samples):.1f} |")
    for shift in (10, 40):
        print(f"| Fbank on {device.type} | {shift} ms shift, batch {args.batch} | "
              f"{fbank_rate(shift, args.batch, clip_samples, device):.1f} |")
    from bench.ssast_step import phase_step_rate

    rate = phase_step_rate(args.model, 0, min(args.batch, 8) if device.type == "cpu" else args.batch, device)
    print(f"| SSAST-{args.model} training, cheapest phase of ssast_fshift4 ({rate['phase']}) | fbank + fwd + bwd + "
          f"Adam | {rate['clips_per_s']:.1f} |")


if __name__ == "__main__":
    main()
