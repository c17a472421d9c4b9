"""HTS-AT coarse to fine on real audio: the whole run's wall-time saving against its FLOPs saving (issue 21.6).

The corpus is ``bench/real_audio.py``'s sampled instruments (10 classes, 3 s clips at 16 kHz; 800 train / 300
valid / 300 test clips). A small HTS-AT (the official front end at 32 kHz: 1024-point FFT, hop 320; 32 mel
bins folded into a 128 x 128 image; embed 32, depths 1-1-2-1, window 8) is fine-tuned from scratch twice per
seed: the baseline, ``E`` epochs at full resolution, and coarse to fine, ``E/4`` epochs at Fshift x4 then
``3E/4`` at full resolution (HTS-AT's share in the paper's Table 6 is 0.28 of the epochs; 0.25 here).

From each run's ``ledger.json`` (training time: the loop and its data waits; validation and checkpoints not):

- ``wall / FLOPs``: (1 - c2f wall / baseline wall) / (1 - c2f FLOPs / baseline FLOPs), per seed;
- ``in-run``: the same ratio from the coarse-to-fine run alone, its full phase standing for the baseline
  (seconds per clip of each phase; both phases ran under the same load, so the neighbours of a shared
  machine weigh less);
- ``r``: seconds per clip of the coarse phase over the full phase's, beside the FLOPs ratio.

Usage::

    python -m bench.htsat_c2f_real_audio [--data /work/realaudio/data] [--out runs/bench_htsat_c2f]
        [--epochs 8] [--seeds 0 1] [--batch 16] [--workers 0] [--code DIR] [--set key=value ...]

``--code DIR`` runs another checkout's ``finetune/run.py`` (a "before"). One thread per run
(``OMP_NUM_THREADS=1``), one run at a time. Results land in ``OUT/results.json`` and as a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench.task_defaults_real_audio import CORPUS, ROOT, run, task_file

RECIPE = """description: small HTS-AT on {corpus}, full resolution ({epochs} epochs)
model:
  arch: htsat
  htsat: {{sample_rate: 32000, clip_samples: 96000, n_fft: 1024, hop_length: 320, mel_bins: 32, fmax: 14000,
          spec_size: 128, embed_dim: 32, depths: [1, 1, 2, 1], num_heads: [1, 2, 4, 8], window_size: 8,
          drop_path_rate: 0.0}}
phases:
  - {{compression: none, factor: 1, epochs: {epochs}}}
augment: {{freqm: 4, timem: 32, freq_stripes: 2, time_stripes: 2, mixup: 0.0, noise: false}}
optim: {{optimizer: adamw, lr: 1.0e-3, betas: [0.9, 0.999], weight_decay: 0.05, warmup_steps: 20,
         schedule: multistep, decay_start: 5, decay_every: 1, decay: 0.7, grad_clip: 1.0}}
"""

C2F = """description: small HTS-AT on {corpus}, Fshift x4 then full resolution
extends: baseline.yaml
coarse: {{method: fshift, factors: [4]}}
"""


def ledger_numbers(run_dir: Path) -> dict:
    ledger = json.loads((run_dir / "ledger.json").read_text())
    phases = [{"name": p["name"], "seconds": p["wall_seconds"], "samples": p["samples"],
               "flops_per_sample": p["flops_per_sample"]} for p in ledger["phases"]]
    return {"wall": ledger["total"]["wall_seconds"], "flops": ledger["total"]["train_flops"], "phases": phases}


def in_run(c2f: dict) -> dict:
    """The saving the coarse-to-fine run implies against a baseline stepping at its own full phase's pace."""
    coarse, full = c2f["phases"][0], c2f["phases"][-1]
    per_clip = [p["seconds"] / p["samples"] for p in (coarse, full)]
    samples = sum(p["samples"] for p in c2f["phases"])
    wall = 1 - c2f["wall"] / (samples * per_clip[1])
    flops = 1 - sum(p["samples"] * p["flops_per_sample"] for p in c2f["phases"]) / (samples * full["flops_per_sample"])
    return {"r": per_clip[0] / per_clip[1], "flops_r": coarse["flops_per_sample"] / full["flops_per_sample"],
            "wall_saving": wall, "flops_saving": flops, "ratio": wall / flops}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.htsat_c2f_real_audio", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/realaudio/data"), help="the instruments manifests")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_htsat_c2f"), help="work folder")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of every run (default 8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default 0 1)")
    parser.add_argument("--batch", type=int, default=16, help="clips per step (default 16)")
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes (default 0)")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose finetune/run.py runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more recipe overrides for every run")
    parser.add_argument("--label", default="", help="a name for this set of runs in the results")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "task.yaml").write_text(task_file(args.data.resolve(), None, "package"))  # the package's bare defaults
    (out / "baseline.yaml").write_text(RECIPE.format(corpus=CORPUS, epochs=args.epochs))
    (out / "c2f.yaml").write_text(C2F.format(corpus=CORPUS))
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    label = args.label or args.code.resolve().name
    rows = results.setdefault(label, {})
    for seed in args.seeds:
        numbers = {}
        for name in ("baseline", "c2f"):  # alternated per seed: a change of load hits both alike
            run_dir = out / f"{label}_{name}_{seed}"
            cmd = [str(args.code / "finetune" / "run.py"), "--init", "none", "--task", str(out / "task.yaml"),
                   "--recipe", str(out / f"{name}.yaml"), "--run-dir", str(run_dir),
                   "--set", f"train.seed={seed}", "--set", f"data.batch_size={args.batch}",
                   "--set", f"data.num_workers={args.workers}"]
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
            for item in args.overrides:
                cmd += ["--set", item]
            seconds = run(cmd, out / f"{label}_{name}_{seed}.log", args.code.resolve())
            numbers[name] = {**ledger_numbers(run_dir), "process_seconds": seconds}
        base, c2f = numbers["baseline"], numbers["c2f"]
        wall, flops = 1 - c2f["wall"] / base["wall"], 1 - c2f["flops"] / base["flops"]
        rows[str(seed)] = {**numbers, "wall_saving": wall, "flops_saving": flops, "ratio": wall / flops,
                           "in_run": in_run(c2f)}
        results_file.write_text(json.dumps(results, indent=1))
    print(f"\n{label}: | seed | baseline s | c2f s | wall saving | FLOPs saving | wall / FLOPs | in-run wall / FLOPs "
          f"| r (FLOPs r) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for seed, row in rows.items():
        i = row["in_run"]
        print(f"| {seed} | {row['baseline']['wall']:.1f} | {row['c2f']['wall']:.1f} | {100 * row['wall_saving']:.1f} % "
              f"| {100 * row['flops_saving']:.1f} % | {row['ratio']:.2f} | {i['ratio']:.2f} | {i['r']:.3f} "
              f"({i['flops_r']:.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
