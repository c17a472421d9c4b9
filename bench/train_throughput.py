"""Training throughput per phase, compiled and not, and the wall-time saving of short coarse-to-fine runs
against their baselines next to their FLOPs saving.

1. Per phase of ``recipes/ssast_fshift4.yaml``: training clips/s and tokens/s of fbank + SSAST (both
   objectives) forward/backward + Adam, eager and (``--compile``) with ``train.compile``.
2. Pretraining through the real trainer (``pretrain/run.py``: loader, DeepSpeed engine, phases) in the
   paper's proportions: baseline B steps at full resolution; coarse to fine B/8 steps at Fshift x4, then
   5B/8 at full resolution.
3. Fine-tuning through ``finetune/run.py`` on 4 s labeled clips in ``recipes/ft_fshift4.yaml``'s
   proportions: baseline E epochs at full resolution; coarse to fine E/4 epochs at Fshift x4 + 3E/4 full.

The ledgers give training FLOPs and training wall time (the loop with its data waits; validation and
checkpoints excluded). Goal: wall-time saving >= 0.95 x FLOPs saving.

    python -m bench.train_throughput [--model tiny|base] [--steps 128] [--batch 4] [--repeats 3] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Sequence

import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _savings(totals: dict[str, list[dict]], baseline: str, c2f: str) -> dict:
    median = {name: {"train_flops": runs[0]["train_flops"], "steps": runs[0]["steps"],
                     "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
                     "all_wall_seconds": [r["wall_seconds"] for r in runs],
                     "phase_seconds": [statistics.median(r["phase_seconds"][i] for r in runs)
                                       for i in range(len(runs[0]["phase_seconds"]))],
                     "phase_peak_bytes": [max((r["phase_peak_bytes"][i] or 0) for r in runs) or None
                                          for i in range(len(runs[0]["phase_peak_bytes"]))],
                     "left_allocated": runs[-1].get("left_allocated")}
              for name, runs in totals.items()}
    base, c = median[baseline], median[c2f]
    flops = 1 - c["train_flops"] / base["train_flops"]
    wall = 1 - c["wall_seconds"] / base["wall_seconds"]
    return {"flops_saving": flops, "wall_saving": wall, "ratio": wall / flops, "baseline": base, c2f: c}


def _left_allocated() -> int | None:
    """CUDA memory still allocated once a run has returned (and garbage was collected): what a run leaves
    behind for the next one in the same process (None on the CPU)."""
    if not torch.cuda.is_available():
        return None
    import gc

    gc.collect()
    return int(torch.cuda.memory_allocated())


def _totals(run_dir: Path) -> dict:
    ledger = json.loads((run_dir / "ledger.json").read_text())
    return {**ledger["total"], "phase_seconds": [p["wall_seconds"] for p in ledger["phases"]],
            "phase_peak_bytes": [p.get("peak_memory_bytes") for p in ledger["phases"]]}


def short_runs(manifest: Path, size: str, steps: int, batch: int, workers: int, out: Path, repeats: int = 1,
               extra: Sequence[str] = ()) -> dict:
    """Pretraining baseline and coarse-to-fine runs, alternated ``repeats`` times; savings from the median wall
    times. ``extra``: more recipe overrides (``key=value``)."""
    from pretrain.run import main as pretrain

    common = [f"data.train=[{{path: {manifest}}}]", "data.valid=[]", f"model.size={size}",
              f"data.batch_size={batch}", f"data.num_workers={workers}", "train.save_every=100000",
              "train.eval_every=100000", "train.log_every=100000", "baseline=null", "train.zero_stage=0", *extra]
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
            totals[name].append({**_totals(run_dir), "left_allocated": _left_allocated()})
    return _savings(totals, "baseline", "fshift4")


def finetune_runs(task: Path, size: str, epochs: int, batch: int, workers: int, out: Path, repeats: int = 1,
                  extra: Sequence[str] = ()) -> dict:
    """Fine-tuning baseline (``epochs`` full) and coarse-to-fine (``epochs/4`` at Fshift x4 + the rest full) runs,
    alternated ``repeats`` times; savings from the median wall times."""
    from finetune.run import main as finetune

    coarse = epochs // 4
    common = [f"model.size={size}", f"data.batch_size={batch}", f"data.num_workers={workers}", "train.eval_batches=1",
              "train.log_every=100000", *extra]
    runs = {"baseline": [f"phases=[{{compression: none, epochs: {epochs}}}]"],
            "fshift4": [f"phases=[{{compression: fshift, factor: 4, epochs: {coarse}}}, "
                        f"{{compression: none, epochs: {epochs - coarse}}}]"]}
    totals: dict[str, list[dict]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, phases in runs.items():
            run_dir = out / f"ft_{name}_{repeat}"
            argv = ["--init", "none", "--task", str(task), "--run-dir", str(run_dir),
                    "--recipe", str(RECIPES / "ft_fshift4.yaml")]
            for item in common + phases:
                argv += ["--set", item]
            if finetune(argv) != 0:
                raise RuntimeError(f"fine-tuning {name} run failed")
            totals[name].append({**_totals(run_dir), "left_allocated": _left_allocated()})
    return _savings(totals, "baseline", "fshift4")


def _print_runs(title: str, result: dict, unit: str) -> None:
    b, c = result["baseline"], result["fshift4"]
    print(f"\n{title}\n| run | {unit} | training FLOPs | wall time (s), median | per phase (s), median | all runs |"
          "\n|---|---:|---:|---:|---|---|")
    for label, r in (("baseline", b), ("Fshift 4->1", c)):
        print(f"| {label} | {r['steps']} | {r['train_flops']:.3g} | {r['wall_seconds']:.1f} | "
              f"{' + '.join(f'{x:.1f}' for x in r['phase_seconds'])} | "
              f"{', '.join(f'{x:.1f}' for x in r['all_wall_seconds'])} |")
    print(f"FLOPs saving {result['flops_saving']:.1%}, wall-time saving {result['wall_saving']:.1%}: "
          f"ratio {result['ratio']:.2f} (goal >= 0.95)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/train_throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, choices=["tiny", "small", "base"],
                        help="encoder size (default: base on GPU, tiny on CPU)")
    parser.add_argument("--steps", type=int, default=128, help="baseline steps of the pretraining runs (default 128)")
    parser.add_argument("--epochs", type=int, default=8, help="baseline epochs of the fine-tuning runs (default 8)")
    parser.add_argument("--batch", type=int, default=None, help="clips per step (default 4 on CPU, 24 on GPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers of the short runs (default: 0 on CPU, where the loader runs in a "
                             "background thread of the training process; 4 on GPU)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate the two runs this many times and use the median wall times (default 1)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each phase with train.compile (inductor; the first step compiles)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: phases, pretrain, finetune")
    parser.add_argument("--dir", type=Path, default=Path("runs/bench_train"), help="work folder")
    args = parser.parse_args(argv)
    from bench.clips import make_clips, make_task
    from bench.ssast_step import phase_step_rate

    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.model or ("base" if device.type == "cuda" else "tiny")
    batch = args.batch or (24 if device.type == "cuda" else 4)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, torch {torch.__version__}; "
          f"SSAST-{size}, batch {batch}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if "phases" not in skip:
        print("| phase of ssast_fshift4 | tokens/clip | mode | clips/s | tokens/s | first step (s) |"
              "\n|---|---:|---|---:|---:|---:|")
        for index in (0, 1):
            rates = {}
            for compiled in (False, True) if args.compile else (False,):
                r = phase_step_rate(size, index, batch, device, steps=5 if compiled else 3, compile=compiled)
                rates[compiled] = r["clips_per_s"]
                print(f"| {r['phase']} | {r['tokens']} | {'compiled' if compiled else 'eager'} | "
                      f"{r['clips_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['first_step_s']:.1f} |")
            if args.compile:
                print(f"compiled / eager: {rates[True] / rates[False]:.2f}x")
    if "pretrain" not in skip:
        manifest = make_clips(args.dir / "clips", max(48, 2 * batch), rate=16000)
        result = short_runs(manifest, size, args.steps, batch, workers, args.dir, args.repeats)
        _print_runs(f"pretraining, {args.steps} baseline steps vs {args.steps // 8} + {5 * args.steps // 8} "
                    f"(Fshift x4 + full):", result, "steps")
    if "finetune" not in skip:
        task = make_task(args.dir / "ft_clips", max(48, 6 * batch), seconds=4.0)
        result = finetune_runs(task, size, args.epochs, 2 * batch, workers, args.dir, args.repeats)
        _print_runs(f"fine-tuning on 4 s clips, batch {2 * batch}, {args.epochs} baseline epochs vs "
                    f"{args.epochs // 4} + {args.epochs - args.epochs // 4} (Fshift x4 + full):", result, "steps")


if __name__ == "__main__":
    main()
