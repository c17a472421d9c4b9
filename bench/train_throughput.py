"""Training throughput per phase of ``recipes/ssast_fshift4.yaml``, and the wall-time saving of a short
2-phase run against its baseline next to its FLOPs saving.

1. Per phase: training clips/s and tokens/s of fbank + SSAST (both objectives) forward/backward + Adam.
2. A short run through the real trainer (``pretrain/run.py``: data loader, DeepSpeed engine, phases) in
   the paper's proportions: baseline B steps at full resolution; coarse to fine B/8 steps at Fshift x4,
   then 5B/8 at full resolution. The ledgers give training FLOPs and training wall time (the loop with
   its data waits; validation and checkpoints excluded). Goal: wall-time saving >= 0.95 x FLOPs saving.

    python -m bench.train_throughput [--model tiny|base] [--steps 128] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def short_runs(manifest: Path, size: str, steps: int, batch: int, workers: int, out: Path, repeats: int = 1) -> dict:
    """Baseline and coarse-to-fine runs, alternated ``repeats`` times; savings from the median wall times."""
    from pretrain.run import main as pretrain

    common = [f"data.train=[{{path: {manifest}}}]", "data.valid=[]", f"model.size={size}",
              f"data.batch_size={batch}", f"data.num_workers={workers}", "train.save_every=100000",
              "train.eval_every=100000", "train.log_every=100000", "baseline=null", "train.zero_stage=0"]
    runs = {"baseline": ("ssast_baseline.yaml", [f"phases.0.steps={steps}"]),
            "fshift4": ("ssast_fshift4.yaml", [f"phases.0.steps={steps // 8}", f"phases.1.steps={5 * steps // 8}"])}
    totals: dict[str, list[dict]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, (recipe, phases) in runs.items():
            run_dir = out / f"{name}_{repeat}"
            argv = ["--recipe", str(RECIPES / recipe), "--run-dir", str(run_dir)]
            for item in common + phases:
                argv += ["--set", item]
            if pretrain(argv) != 0:
                raise RuntimeError(f"{name} run failed")
            totals[name].append(json.loads((run_dir / "ledger.json").read_text())["total"])
    median = {name: {"train_flops": runs_[0]["train_flops"], "steps": runs_[0]["steps"],
                     "wall_seconds": statistics.median(r["wall_seconds"] for r in runs_),
                     "all_wall_seconds": [r["wall_seconds"] for r in runs_]} for name, runs_ in totals.items()}
    base, c2f = median["baseline"], median["fshift4"]
    flops = 1 - c2f["train_flops"] / base["train_flops"]
    wall = 1 - c2f["wall_seconds"] / base["wall_seconds"]
    return {"flops_saving": flops, "wall_saving": wall, "ratio": wall / flops, "baseline": base, "fshift4": c2f}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/train_throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, choices=["tiny", "small", "base"],
                        help="encoder size (default: base on GPU, tiny on CPU)")
    parser.add_argument("--steps", type=int, default=128, help="baseline steps of the short runs (default 128)")
    parser.add_argument("--batch", type=int, default=None, help="clips per step (default 4 on CPU, 24 on GPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers of the short runs (default: 0 on CPU, where workers would compete with "
                             "the training compute for the same cores; 4 on GPU)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate the two runs this many times and use the median wall times (default 1)")
    parser.add_argument("--dir", type=Path, default=Path("runs/bench_train"), help="work folder")
    args = parser.parse_args(argv)
    from bench.clips import make_clips
    from bench.ssast_step import phase_step_rate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.model or ("base" if device.type == "cuda" else "tiny")
    batch = args.batch or (24 if device.type == "cuda" else 4)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, torch {torch.__version__}; "
          f"SSAST-{size}, batch {batch}")
    print("| phase of ssast_fshift4 | tokens/clip | clips/s | tokens/s |\n|---|---:|---:|---:|")
    for index in (0, 1):
        r = phase_step_rate(size, index, batch, device)
        print(f"| {r['phase']} | {r['tokens']} | {r['clips_per_s']:.2f} | {r['tokens_per_s']:.0f} |")
    manifest = make_clips(args.dir / "clips", max(48, 2 * batch), rate=16000)
    result = short_runs(manifest, size, args.steps, batch, workers, args.dir, args.repeats)
    b, c = result["baseline"], result["fshift4"]
    print(f"\nshort runs, {args.steps} baseline steps vs {args.steps // 8} + {5 * args.steps // 8} (Fshift x4 + full):")
    print("| run | steps | training FLOPs | training wall time (s), median | all runs |\n|---|---:|---:|---:|---|")
    for label, r in (("baseline", b), ("Fshift 4->1", c)):
        print(f"| {label} | {r['steps']} | {r['train_flops']:.3g} | {r['wall_seconds']:.1f} | "
              f"{', '.join(f'{x:.1f}' for x in r['all_wall_seconds'])} |")
    print(f"FLOPs saving {result['flops_saving']:.1%}, wall-time saving {result['wall_saving']:.1%}: "
          f"ratio {result['ratio']:.2f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
