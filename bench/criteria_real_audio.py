"""Do the ``until:`` criteria end a coarse phase on evidence, not on noise? Real audio (not a test).

The setting of the failure this answers: short clips, ten classes, a few hundred validation clips, a
200-step learning-rate warm-up, a small model whose first epochs are a majority-class guess. The corpus
is the sampled instruments of ``bench/real_audio.py`` (800 training and 300 validation clips, 10 classes,
3 s; cropped to 2.56 s so that Fshift x4 divides the token grid), the model a small AST trained from
scratch (64-dim, 4 blocks, 4 heads; Adam at 5e-4, batch 8 = 100 steps per epoch, warm-up 200 steps =
2 epochs, then constant). The coarse phase is what ``--coarse fshift:4`` derives from a 40-epoch baseline:
10 epochs at Fshift x4 (the paper's 25 %). Per seed:

- ``coarse-only``: 24 epochs at Fshift x4: the coarse phase's own validation curve, to see its noise
  (the accuracy's standard error on 300 clips, ``acc_se``), when learning shows and where it plateaus;
- ``fixed 25 %``: the 10 coarse epochs;
- ``plateau``, ``efficiency``, ``loss``: ``until: {criterion: NAME, max: 20}`` on the coarse phase with
  the criteria's defaults (10 epochs planned, up to 20);

each coarse-to-fine run then trains 6 epochs at full resolution (not the derived 30: the question is
when the coarse phase ends; the final accuracy after the same short full-resolution phase is context).

The coarse phase of a coarse-to-fine run is the coarse-only run's first epochs (same seed, data order,
initialisation and schedule), so the live switch can be read against the coarse-only curve; the script
checks that the curves agree. It also replays the coarse-only curve through the score criteria as they
stand and, with ``--before REV``, as they stood at a git revision (the rule before this change), to show
where that rule would have ended the phase.

Where the coarse-only curve plateaus: the first epoch whose 3-epoch running mean of accuracy comes within
one standard error of the plateau level (the mean of its last 5 epochs). Learning "shows" from the epoch
after the last one whose accuracy lies within 2 standard errors of the difference of epoch 1's: a phase
that ends before it has ended on noise.

    python -m bench.real_audio --out /tmp/real_audio        # once (FluidSynth), then prepare it:
    python -m common.data.corpora prepare custom --src /tmp/real_audio --unlabeled /tmp/real_audio/pool \\
        --name instruments --out data/instruments
    python -m bench.criteria_real_audio --data data/instruments [--out runs/bench_criteria] [--seeds 0 1] \\
        [--before c043fff]

Writes ``OUT/results.json`` and ``OUT/table.md``. One thread per run (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]

PLANNED, MAX, FINE, COARSE_ONLY = 10, 20, 6, 24  # epochs: coarse planned (25 % of 40) and max, then fine
WARMUP, STEPS_PER_EPOCH = 200, 100  # 800 clips / batch 8
COMMON = ["model.size=custom", "model.embed_dim=64", "model.depth=4", "model.num_heads=4", "optim.lr=5e-4",
          f"optim.warmup_steps={WARMUP}", "optim.schedule=constant", "data.batch_size=8", "data.num_workers=0",
          "data.cache=memory", "train.log_every=1000", "train.keep_checkpoints=1"]
SCHEDULES = {"fixed 25 %": None, "plateau": "{criterion: plateau, max: %d}" % MAX,
             "efficiency": "{criterion: efficiency, max: %d}" % MAX, "loss": "{criterion: loss, max: %d}" % MAX}


def phases(until: str | None) -> str:
    """The coarse-to-fine phases: ``PLANNED`` coarse epochs (ending by ``until`` if given), ``FINE`` fine."""
    coarse = f"compression: fshift, factor: 4, epochs: {PLANNED}" + (f", until: {until}" if until else "")
    return f"phases=[{{{coarse}}}, {{compression: none, epochs: {FINE}}}]"


def _sets(items) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def task_file(data: Path, out: Path) -> Path:
    """The task file of the prepared corpus (``instruments_{train,valid,test}.jsonl.gz``, its class list)."""
    path = out / "instruments.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([
        "name: instruments",
        *(f"{split}: [{(data / f'instruments_{split}.jsonl.gz').resolve()}]" for split in ("train", "valid", "test")),
        f"classes: {(data / 'instruments_classes.json').resolve()}",
        "target_frames: 256", ""]))
    return path


def train(task: Path, run_dir: Path, seed: int, phases_set: str) -> Path:
    """One fine-tuning run from scratch (finds itself complete when run again)."""
    from finetune.run import main as finetune

    argv = ["--task", str(task), "--init", "none", "--run-dir", str(run_dir),
            *_sets([*COMMON, f"train.seed={seed}", phases_set])]
    if finetune(argv) != 0:
        raise RuntimeError(f"{run_dir} failed; see {run_dir / 'train.log'}")
    return run_dir


def _ledger(run_dir: Path) -> dict:
    return json.loads((run_dir / "ledger.json").read_text())


def curve(ledger: dict, phase: int = 0) -> list[dict]:
    """Per validation of ``phase``: epoch, cumulative FLOPs, accuracy and its standard error."""
    return [{"epoch": e["epoch"], "flops": e["train_flops"], "acc": e["metrics"]["acc"],
             "se": e["metrics"].get("acc_se")} for e in ledger["evals"] if e["phase"] == phase]


def landmarks(points: list[dict]) -> dict:
    """Where the warm-up ends, from where learning shows (every later epoch more than 2 errors of the
    difference above epoch 1) and where the curve plateaus (its 3-epoch running mean within one error of the
    mean of its last 5 epochs)."""
    first = points[0]
    noise = [p["epoch"] for p in points if p["acc"] - first["acc"] <= 2 * math.hypot(p["se"], first["se"])]
    shows = max(noise) + 1
    level = sum(p["acc"] for p in points[-5:]) / 5
    error = sum(p["se"] for p in points[-5:]) / 5
    running = [sum(p["acc"] for p in points[max(0, i - 1):i + 2]) / len(points[max(0, i - 1):i + 2])
               for i in range(len(points))]
    plateau = next(points[i]["epoch"] for i, m in enumerate(running) if m >= level - error)
    return {"warmup_epochs": math.ceil(WARMUP / STEPS_PER_EPOCH), "learning_shows": shows, "plateau": plateau,
            "plateau_level": level, "error": error}


# the modules that end a phase, lowest first (before they were split, common/phases/criteria.py held them all)
PHASE_END_MODULES = ("until", "criteria", "phase_end")


def criteria_module(rev: str | None) -> SimpleNamespace:
    """``UntilConfig`` and ``PhaseEnd`` as they stand, or as they stood at git revision ``rev``."""
    if rev is None:
        from common.phases.phase_end import PhaseEnd
        from common.phases.until import UntilConfig

        return SimpleNamespace(UntilConfig=UntilConfig, PhaseEnd=PhaseEnd)
    loaded = {}
    for name in PHASE_END_MODULES:
        shown = subprocess.run(["git", "show", f"{rev}:common/phases/{name}.py"], cwd=ROOT, capture_output=True,
                               text=True)
        if shown.returncode != 0:  # not at that revision
            continue
        path = Path(tempfile.mkdtemp()) / f"{name}_{rev}.py"
        path.write_text(shown.stdout)
        spec = importlib.util.spec_from_file_location(f"{name}_{rev}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # (dataclasses look their module up)
        own = {f"common.phases.{done}": m for done, m in loaded.items()}  # its imports of the others: the rev's
        saved = {key: sys.modules.get(key) for key in own}
        sys.modules.update(own)
        try:
            spec.loader.exec_module(module)
        finally:
            for key, was in saved.items():
                if was is None:
                    del sys.modules[key]
                else:
                    sys.modules[key] = was
        loaded[name] = module
    found = {attr: getattr(module, attr) for module in loaded.values() for attr in ("UntilConfig", "PhaseEnd")
             if hasattr(module, attr)}
    return SimpleNamespace(**found)


# the score criteria replayed on the coarse-only curves: the defaults, and a longer patience / window
REPLAYS = {"plateau": {"criterion": "plateau"}, "efficiency": {"criterion": "efficiency"},
           "plateau, patience 4": {"criterion": "plateau", "patience": 4},
           "efficiency, window 4": {"criterion": "efficiency", "window": 4}}


def replay(module, until: dict, points: list[dict], cost_ratio: float) -> tuple:
    """Where a score criterion of ``module`` (``until``: its section) ends a coarse phase that follows
    ``points``: (epoch, reason)."""
    criterion = until["criterion"]
    until = module.UntilConfig(**until, max=MAX)
    kwargs = {"warmup_steps": WARMUP} if "warmup_steps" in module.PhaseEnd.__init__.__code__.co_varnames else {}
    end = module.PhaseEnd(until, PLANNED, "epochs", cost_ratio if criterion == "efficiency" else None, **kwargs)
    for p in points:
        extra = {"score_se": p["se"], "step": p["epoch"] * STEPS_PER_EPOCH} if kwargs else {}
        decision = end.observe(p["epoch"], score=p["acc"], flops=p["flops"], **extra)
        if decision is not None:
            return decision.at, decision.reason
        if p["epoch"] == MAX:
            break
    return MAX, "cap"


def summarise(runs: dict, before: str | None) -> dict:
    """Per seed: the coarse-only curve and its landmarks; per schedule where the coarse phase ended, the
    accuracy there and at the end, FLOPs; the replays."""
    now, old = criteria_module(None), criteria_module(before) if before else None
    seeds = sorted({seed for _, seed in runs})
    out = {}
    for seed in seeds:
        long = curve(_ledger(runs[("coarse-only", seed)]))
        marks = landmarks(long)
        rows = []
        for name in SCHEDULES:
            ledger = _ledger(runs[(name, seed)])
            coarse, fine = ledger["phases"][0], ledger["phases"][1]
            ratio = coarse["flops_per_sample"] / fine["flops_per_sample"]
            points = curve(ledger, 0)
            agrees = all(abs(p["acc"] - q["acc"]) < 1e-9 for p, q in zip(points, long))
            last = [e for e in ledger["evals"] if e["phase"] == 1]
            row = {"schedule": name, "ended": coarse["epochs"], "reason": coarse["ended_by"],
                   "note": coarse["end_note"], "coarse_acc": points[-1]["acc"], "final_acc": last[-1]["metrics"]["acc"],
                   "best_final_acc": max(e["metrics"]["acc"] for e in last),
                   "train_flops": ledger["total"]["train_flops"] if "total" in ledger else None,
                   "coarse_curve_agrees": agrees, "cost_ratio": ratio}
            rows.append(row)
        replays = {name: {"now": replay(now, until, long, ratio),
                          **({"before": replay(old, until, long, ratio)} if old is not None else {})}
                   for name, until in REPLAYS.items()}
        out[seed] = {"coarse_only": long, "landmarks": marks, "schedules": rows, "replays": replays}
    return out


def table(summary: dict, before: str | None) -> str:
    """Markdown: the live runs per seed, the replays on the coarse-only curves, the curves themselves."""
    lines = ["| seed | coarse-only: warm-up ends / learning shows / plateau (epoch, level) | schedule | coarse phase "
             "ended (epoch, reason) | acc there (%) | final acc (%) | training FLOPs | coarse curve = coarse-only |",
             "|---:|---|---|---|---:|---:|---:|---|"]
    for seed, s in summary.items():
        m = s["landmarks"]
        marks = f"{m['warmup_epochs']} / {m['learning_shows']} / {m['plateau']} ({100 * m['plateau_level']:.1f} %)"
        for r in s["schedules"]:
            flops = f"{r['train_flops']:.3g}" if r["train_flops"] else "-"
            lines.append(f"| {seed} | {marks} | {r['schedule']} | {r['ended']} ({r['reason']}) | "
                         f"{100 * r['coarse_acc']:.1f} | {100 * r['final_acc']:.1f} | {flops} | "
                         f"{'yes' if r['coarse_curve_agrees'] else 'no'} |")
    lines += ["", f"The coarse-only curves replayed through the score criteria (planned {PLANNED}, max {MAX} epochs):",
              "", "| seed | criterion | ends now (epoch, reason) |" + (f" ended at {before} |" if before else ""),
              "|---:|---|---|" + ("---|" if before else "")]
    for seed, s in summary.items():
        for name, r in s["replays"].items():
            lines.append(f"| {seed} | {name} | {r['now'][0]} ({r['now'][1]}) |"
                         + (f" {r['before'][0]} ({r['before'][1]}) |" if before else ""))
    lines += ["", "Coarse-only validation accuracy (%) per epoch, ± its standard error:", ""]
    for seed, s in summary.items():
        lines.append(f"- seed {seed}: " + ", ".join(f"{100 * p['acc']:.1f}" for p in s["coarse_only"])
                     + f" (± {100 * min(p['se'] for p in s['coarse_only']):.1f} to "
                       f"{100 * max(p['se'] for p in s['coarse_only']):.1f})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/criteria_real_audio.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/instruments"),
                        help="the prepared instruments corpus (instruments_*.jsonl.gz, instruments_classes.json)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_criteria"), help="runs and results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--before", default=None, help="a git revision whose criteria to replay for comparison")
    args = parser.parse_args(argv)
    task = task_file(args.data, args.out)
    start = time.perf_counter()
    runs = {}
    for seed in args.seeds:
        runs[("coarse-only", seed)] = train(task, args.out / f"coarse-only-seed{seed}", seed,
                                            f"phases=[{{compression: fshift, factor: 4, epochs: {COARSE_ONLY}}}]")
        for name, until in SCHEDULES.items():
            runs[(name, seed)] = train(task, args.out / f"{name.split()[0]}-seed{seed}", seed, phases(until))
    summary = summarise(runs, args.before)
    text = table(summary, args.before)
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    (args.out / "table.md").write_text(text)
    print(f"\n{text}\n{len(runs)} runs in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
