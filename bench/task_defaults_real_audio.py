"""A task file's defaults on real audio: the package's bare defaults against the published recipe they follow.

The corpus is ``bench/real_audio.py``'s sampled instruments (10 classes, 3 s clips: 300 frames; 800 train /
300 valid / 300 test clips and 1000 unlabeled pool clips). The same small SSAST encoder, pretrained here on
the pool, is fine-tuned from the same task file twice per seed:

- ``package``: ``defaults: package``, the defaults a task file had before (Adam at 1e-4, plateau schedule,
  warm-up of half the first epoch, no augmentation);
- ``recipe``: the defaults now (``finetune.task_recipes``): for a single-label task of 300 frames from
  an SSAST-pretrained encoder, SSAST's ESC-50 recipe (Adam at 1e-4, x0.85 every epoch from epoch 6, no
  warm-up, SpecAugment 24 / 96 -> 56 for 300 frames, SSAST's noise);

with the same number of epochs (and, with ``--own-epochs``, each for its own: 10 and 50), and the floor: a
logistic regression on the mean and standard deviation over time of each log-mel bin. ``--ablate`` adds the
recipe without its augmentation (SpecAugment, noise) and without its learning-rate decay. The score is the
test accuracy of the epoch with the best validation accuracy.

Usage::

    python -m bench.task_defaults_real_audio --data /work/realaudio/data --out runs/bench_task_defaults
        [--epochs 12] [--seeds 0 1] [--pretrain-steps 400] [--ablate] [--own-epochs]

One thread per process (``OMP_NUM_THREADS=1``); runs one after the other. The results land in
``OUT/results.json`` and as a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = "instruments"
FRAMES = 300  # 3 s clips

# a small SSAST (4 blocks of width 128) that pretrains in minutes on a CPU core
MODEL = {"size": "custom", "embed_dim": 128, "depth": 4, "num_heads": 4, "patch": [16, 16]}


# --ablate: the recipe-following defaults with one part of the recipe taken out
ABLATIONS = {"recipe_noaug": ("augment.freqm=0", "augment.timem=0", "augment.noise=false"),
             "recipe_nodecay": ("optim.schedule=constant",)}


def pretrain_recipe(data: Path, steps: int) -> dict:
    return {
        "description": f"SSAST pretraining on the {CORPUS} pool (bench)",
        "model": MODEL,
        "audio": {"target_frames": FRAMES, "norm": "audioset"},
        "data": {"train": [{"path": str(data / f"{CORPUS}_pool.jsonl.gz")}],
                 "valid": [str(data / f"{CORPUS}_valid.jsonl.gz")], "batch_size": 16, "num_workers": 0},
        "phases": [{"compression": "none", "factor": 1, "steps": steps}],
        "optim": {"lr": 1.0e-3, "warmup_steps": 50, "schedule": "cosine"},
        "train": {"seed": 0, "log_every": 50, "eval_every": steps, "save_every": steps, "eval_batches": 4},
    }


def task_file(data: Path, epochs: int | None, defaults: str) -> str:
    text = (f"name: {CORPUS}\ntrain: [{data / f'{CORPUS}_train.jsonl.gz'}]\n"
            f"valid: [{data / f'{CORPUS}_valid.jsonl.gz'}]\n"
            f"test: [{data / f'{CORPUS}_test.jsonl.gz'}]\nclasses: {data / f'{CORPUS}_classes.json'}\n"
            f"target_frames: {FRAMES}\n")
    if epochs is not None:
        text += f"epochs: {epochs}\n"
    return text + ("defaults: package\n" if defaults == "package" else "")  # recipe*: the defaults now


def run(argv: list[str], log: Path, code: Path = ROOT) -> float:
    """Run a command of checkout ``code`` (this one by default) with one thread; its output goes to ``log``.
    Returns the wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(code)}
    start = time.time()
    with open(log, "w") as out:
        status = subprocess.call([sys.executable, *argv], cwd=code, env=env, stdout=out, stderr=subprocess.STDOUT)
    if status:
        raise SystemExit(f"failed ({status}): {' '.join(argv)}; see {log}")
    return time.time() - start


def pooled_logmel(manifest: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per clip: the mean and standard deviation over time of each of 128 log-mel bins; and the class index."""
    import gzip

    import soundfile as sf
    import torch

    from common.audio.fbank import Fbank

    fbank = Fbank()
    features, labels = [], []
    with gzip.open(manifest, "rt") as lines:
        for line in lines:
            cut = json.loads(line)
            wave, _ = sf.read(cut["recording"]["sources"][0]["source"], dtype="float32")
            mel = fbank(torch.from_numpy(wave))[0].numpy()[:FRAMES]
            features.append(np.concatenate([mel.mean(0), mel.std(0)]))
            labels.append(classes.index(cut["custom"]["labels"][0]))
    return np.stack(features), np.array(labels)


def floor(data: Path) -> dict:
    """Log-mel mean / std + logistic regression: C chosen on valid, scored on test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from common.data.corpora.base import read_classes

    classes, _ = read_classes(str(data / f"{CORPUS}_classes.json"))
    split = {s: pooled_logmel(data / f"{CORPUS}_{s}.jsonl.gz", classes) for s in ("train", "valid", "test")}
    best = None
    for c in (0.01, 0.1, 1.0, 10.0):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(*split["train"])
        valid = model.score(*split["valid"])
        if best is None or valid > best[0]:
            best = (valid, c, model.score(*split["test"]))
    return {"valid": best[0], "C": best[1], "test": best[2]}


def scores(run_dir: Path) -> dict:
    ledger = json.loads((run_dir / "ledger.json").read_text())
    valid = [e["metrics"]["acc"] for e in ledger["evals"]]
    test = json.loads((run_dir / "test_metrics.json").read_text())
    return {"valid_best": max(valid), "best_epoch": int(np.argmax(valid)) + 1, "epochs": len(valid),
            "test": test["acc"], "valid_curve": valid}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/realaudio/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_task_defaults"))
    parser.add_argument("--epochs", type=int, default=12, help="epochs of every fine-tuning run (both defaults)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1],
                        help="fine-tuning seeds (none: the floor and the encoder only)")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--ablate", action="store_true",
                        help="also run the recipe without its augmentation, and without its lr decay")
    parser.add_argument("--own-epochs", action="store_true",
                        help="also run both defaults for their own epochs (the package's 10, the recipe's 50)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=1))

    if "floor" not in results:
        start = time.time()
        results["floor"] = {**floor(args.data), "seconds": round(time.time() - start, 1)}
        save()
    print(f"floor (log-mel mean/std + logistic regression): test {results['floor']['test']:.4f}", flush=True)

    encoder = out / "pretrain"
    if not (encoder / "model.safetensors").is_file():
        from common.config.recipe import dump_yaml

        dump_yaml(pretrain_recipe(args.data, args.pretrain_steps), out / "pretrain.yaml")
        seconds = run(["pretrain/run.py", "--recipe", str(out / "pretrain.yaml"), "--run-dir", str(encoder)],
                      out / "pretrain.log")
        results["pretrain"] = {"steps": args.pretrain_steps, "seconds": round(seconds, 1)}
        save()

    plan = [("package", args.epochs), ("recipe", args.epochs)]
    plan += [("recipe_noaug", args.epochs), ("recipe_nodecay", args.epochs)] if args.ablate else []
    plan += [("package", None), ("recipe", None)] if args.own_epochs else []
    for seed in args.seeds:
        for defaults, epochs in plan:
            key = f"{defaults}-{'own' if epochs is None else epochs}-seed{seed}"
            if key in results:
                continue
            task = out / f"{key}.yaml"
            task.write_text(task_file(args.data, epochs, defaults))
            run_dir = out / key
            cmd = ["finetune/run.py", "--init", str(encoder), "--task", str(task), "--run-dir", str(run_dir),
                   "--set", f"train.seed={seed}", "--set", "data.num_workers=0", "--set", "data.batch_size=24"]
            for item in ABLATIONS.get(defaults, ()):
                cmd += ["--set", item]
            plan_text = subprocess.run([sys.executable, *cmd, "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}).stdout
            (out / f"{key}.plan.txt").write_text(plan_text)
            seconds = run(cmd, out / f"{key}.log")
            results[key] = {**scores(run_dir), "seconds": round(seconds, 1),
                            "defaults": next((line for line in plan_text.splitlines() if "task file" in line), "")}
            save()
            print(f"{key}: test {results[key]['test']:.4f} (best valid {results[key]['valid_best']:.4f} at epoch "
                  f"{results[key]['best_epoch']}), {seconds:.0f} s", flush=True)

    print("\n| defaults | epochs | seed | best valid acc (epoch) | test acc |\n|---|---:|---:|---:|---:|")
    print(f"| floor: log-mel mean/std + logistic regression (C={results['floor']['C']}) | - | - | "
          f"{results['floor']['valid']:.4f} | {results['floor']['test']:.4f} |")
    for key, r in results.items():
        if key in ("floor", "pretrain"):
            continue
        defaults, epochs, seed = key.split("-")
        print(f"| {defaults} | {r['epochs']} | {seed[4:]} | {r['valid_best']:.4f} ({r['best_epoch']}) | "
              f"{r['test']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
