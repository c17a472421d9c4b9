"""Do schedules that decide for themselves beat the paper's fixed split? (issue 13; not a test)

The paper's setting in miniature: a small SSAST encoder is pretrained once at full resolution on the
built-in corpus (``recipes/synth_pretrain_baseline.yaml``: 400 steps, 64-dim, 4 layers), then fine-tuned on
the ``synth`` task (480 training clips, 120 validation clips, 12 classes; the task's published recipe:
8 epochs, batch 24, multistep decay) with four schedules, each with three seeds:

- ``baseline``: 8 epochs at full resolution;
- ``fixed 25 %``: ``--coarse fshift:4``, the paper's rule: 2 epochs at Fshift x4, then 6 at full resolution;
- ``plateau``: the coarse phase ends at the first epoch whose validation accuracy does not improve on the
  best so far (``patience: 1``; between 1 and 4 epochs), then 6 at full resolution;
- ``efficiency``: the coarse phase ends when its accuracy gained per FLOP over the last epoch
  (``window: 1``) falls below what the same FLOPs are expected to buy at full resolution (the phase's
  steepest slope x the FLOPs ratio, about 0.24 here; between 1 and 4 epochs), then 6.

Both adaptive schedules can switch as early as the fixed one (after epoch 2) or as late as epoch 4.

Every run trains to its end; "FLOPs to the baseline's best" applies the paper's rule offline
(``common/reports/compare.py``): the cumulative training FLOPs at the first final-phase epoch whose accuracy
strictly surpasses the best epoch of the baseline of the same seed (what ``train.stop_when_surpassing``
would have spent). FLOPs are counted, not timed, so the figures do not depend on the shared machine.

    python -m bench.schedules [--out runs/bench_schedules] [--seeds 0 1 2]

Writes ``OUT/results.json``, ``OUT/table.md`` and the plot ``bench/results/schedules.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMON = ["data.num_workers=0", "train.log_every=100", "train.keep_checkpoints=1"]
SCHEDULES = {
    "baseline": ([], None),
    "fixed 25 %": ([], "fshift:4"),
    "plateau": (["coarse.until={criterion: plateau, patience: 1, min: 1, max: 4}"], "fshift:4"),
    "efficiency": (["coarse.until={criterion: efficiency, window: 1, min: 1, max: 4}"], "fshift:4"),
}


def _sets(items) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def pretrain(out: Path, data: Path) -> Path:
    """The encoder every fine-tuning run starts from (full-resolution SSAST pretraining, once)."""
    from pretrain.run import main as ssast

    run_dir = out / "pretrain"
    argv = ["--recipe", str(ROOT / "recipes" / "synth_pretrain_baseline.yaml"), "--run-dir", str(run_dir),
            *_sets([f"data.train=[{{path: {data / 'synth' / 'synth_pool.jsonl.gz'}}}]",
                    f"data.valid=[{data / 'synth' / 'synth_valid.jsonl.gz'}]", *COMMON])]
    if ssast(argv) != 0:
        raise RuntimeError(f"pretraining failed; see {run_dir / 'train.log'}")
    return run_dir


def train(out: Path, data: Path, init: Path, name: str, seed: int) -> Path:
    """One fine-tuning run (resumes or finds itself complete when run again)."""
    from finetune.run import main as finetune

    extra, coarse = SCHEDULES[name]
    run_dir = out / "runs" / f"{name.split()[0]}-seed{seed}"
    argv = ["--init", str(init), "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
            *_sets([*COMMON, f"train.seed={seed}", *extra])]
    if coarse:
        argv += ["--coarse", coarse]
    if finetune(argv) != 0:
        raise RuntimeError(f"{name} (seed {seed}) failed; see {run_dir / 'train.log'}")
    return run_dir


def summarise(runs: dict[tuple[str, int], Path]) -> list[dict]:
    """Per run: final and best accuracy, training FLOPs, where the coarse phase ended, FLOPs to the
    baseline's best (same seed, the paper's rule)."""
    from common.reports.compare import compare
    from common.reports.runs import load_run

    rows = []
    for (name, seed), run_dir in runs.items():
        run = load_run(run_dir, name)
        ledger = run.ledger
        final = len(ledger.phases) - 1
        last = [e for e in ledger.evals if e["phase"] == final]
        row = {"schedule": name, "seed": seed, "final_acc": last[-1]["metrics"]["acc"],
               "best_acc": max(e["metrics"]["acc"] for e in last), "train_flops": ledger.totals()["train_flops"]}
        if final > 0:
            coarse = ledger.phases[0]
            row.update(switch_epoch=coarse.epochs, switch_reason=coarse.ended_by, switch_flops=coarse.train_flops)
        base = load_run(runs[("baseline", seed)], "baseline")
        if name == "baseline":
            best = max(ledger.evals, key=lambda e: e["metrics"]["acc"])
            row["flops_to_base_best"] = best["train_flops"]
        else:
            stop = compare(base, [run], "acc")[1].stop
            row["flops_to_base_best"] = stop.flops if stop else None
        row["evals"] = [(e["phase"], e["train_flops"], e["metrics"]["acc"]) for e in ledger.evals]
        rows.append(row)
    return rows


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def table(rows: list[dict]) -> str:
    """The Markdown tables: per schedule (mean ± sd over seeds), then per run."""
    base_flops = statistics.mean(r["train_flops"] for r in rows if r["schedule"] == "baseline")
    out = ["| schedule | final acc (%) | best final-phase acc (%) | training FLOPs | FLOPs to the baseline's best "
           "(runs that got there) | coarse phase (epochs) |", "|---|---:|---:|---:|---:|---|"]
    for name in SCHEDULES:
        sel = [r for r in rows if r["schedule"] == name]
        reached = [r["flops_to_base_best"] for r in sel if r["flops_to_base_best"] is not None]
        flops = statistics.mean(r["train_flops"] for r in sel)
        switch = "-" if name == "baseline" else ", ".join(str(r["switch_epoch"]) for r in sel)
        out.append(f"| {name} | {_mean_sd([100 * r['final_acc'] for r in sel])} | "
                   f"{_mean_sd([100 * r['best_acc'] for r in sel])} | {flops:.3g} ({flops / base_flops - 1:+.0%}) | "
                   f"{_mean_sd(reached)} ({len(reached)}/{len(sel)}) | {switch} |")
    out += ["", "| schedule | seed | final acc (%) | training FLOPs | coarse phase ended | FLOPs to the baseline's "
            "best |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        ended = "-" if r["schedule"] == "baseline" else f"epoch {r['switch_epoch']} ({r['switch_reason']})"
        reach = f"{r['flops_to_base_best']:.3g}" if r["flops_to_base_best"] is not None else "not reached"
        out.append(f"| {r['schedule']} | {r['seed']} | {100 * r['final_acc']:.1f} | {r['train_flops']:.3g} | {ended} | "
                   f"{reach} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Validation accuracy against cumulative training FLOPs, every run; circles mark the phase change."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colors = dict(zip(SCHEDULES, rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = dict(zip(SCHEDULES, ["-", "-", "--", ":"]))  # runs that switched alike overlap: dashes show both
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.subplots()
    for r in rows:
        xs, ys = [e[1] for e in r["evals"]], [100 * e[2] for e in r["evals"]]
        ax.plot(xs, ys, color=colors[r["schedule"]], linestyle=styles[r["schedule"]], alpha=0.8, linewidth=1.4)
        coarse = [(x, y) for (phase, _, _), x, y in zip(r["evals"], xs, ys) if phase == 0]
        if r["schedule"] != "baseline" and coarse:
            ax.scatter([coarse[-1][0]], [coarse[-1][1]], color=colors[r["schedule"]], s=30, zorder=3)
    ax.legend(handles=[Line2D([], [], color=c, linestyle=styles[n], label=n) for n, c in colors.items()]
              + [Line2D([], [], color="gray", marker="o", linestyle="", label="end of the coarse phase")],
              fontsize=8, loc="lower right")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("synth fine-tuning of a pretrained encoder: four schedules x three seeds")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/schedules.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_schedules"), help="runs and results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "schedules.png")
    args = parser.parse_args(argv)
    data = args.out / "data"
    if not (data / "synth" / "synth_classes.json").is_file():
        from common.data.corpora import get_corpus

        get_corpus("synth").prepare(None, data / "synth", size="demo")
    start = time.perf_counter()
    init = pretrain(args.out, data)
    runs = {}
    for seed in args.seeds:
        for name in SCHEDULES:
            runs[(name, seed)] = train(args.out, data, init, name, seed)
    rows = summarise(runs)
    text = table(rows)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "table.md").write_text(text)
    plot(rows, args.plot)
    print(f"\n{text}\npretraining and {len(runs)} fine-tuning runs in {time.perf_counter() - start:.0f} s; "
          f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
