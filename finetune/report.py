"""Compare coarse-to-fine runs with their baseline: the paper's savings tables and a metric-vs-FLOPs plot.

The rule is that of the paper's sections 3.3-3.4 (Tables 2-5). The baseline reference is the baseline's
evaluation with the highest validation metric (its best epoch), with the cumulative training FLOPs and wall
time at that evaluation. A coarse-to-fine run is stopped at the earliest evaluation *of its final phase*
whose metric strictly surpasses that reference; its savings are ``100 * (1 - F_run / F_base)`` for FLOPs and
``100 * (1 - T_run / T_base)`` for training time (evaluation excluded). A run whose final phase never
surpasses the baseline gets no savings. The "no budget" column (Tables 3 and 5) is the best metric of the
final phase. Every metric is a fraction (accuracy, mAP, masked accuracy) and is shown in percent. Runs that
applied the rule live (``train.stop_when_surpassing``) are marked, and so are those whose cap ended the
final phase before it surpassed (:func:`end_note`).

    python finetune/report.py --baseline runs/base --runs runs/fshift4 runs/fshift421 --out reports/
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from common.ledger import Ledger

__all__ = ["ReportError", "Run", "Point", "Row", "load_run", "resolve_metric", "run_label", "points",
           "compare", "end_note", "markdown_table", "plot", "main"]

METHOD_NAMES = {"fshift": "Fshift", "avgpool": "Avg Pool", "maxpool": "Max Pool", "patch": "Patch"}
PATCH_TRANSFER_NAMES = {"pi": "PI", "bilinear": "BL"}  # the paper's labels
PHASE_MARKERS = "osD^vPpX"


class ReportError(ValueError):
    """Bad input for the report; the message names the file and the problem."""


@dataclass(frozen=True)
class Run:
    """A run to report: where its ledger came from, its row label and the ledger."""

    source: str
    label: str
    ledger: Ledger


@dataclass(frozen=True)
class Point:
    """One evaluation: 0-based phase, cumulative training FLOPs and seconds, metric value."""

    phase: int
    flops: float
    seconds: float
    value: float


@dataclass(frozen=True)
class Row:
    """One table row: deltas, savings and ``stop`` are None for the baseline; savings, ``stop`` when never surpassed;
    ``note``: how the run's final phase ended, when a rule ended it (:func:`end_note`)."""

    label: str
    value: float
    delta: float | None
    flops_save: float | None
    time_save: float | None
    best: float
    best_delta: float | None
    stop: Point | None
    note: str | None = None


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Reads ``ledger.json`` from a run directory (or the file itself).

    Args:
        path: the run directory or its ``ledger.json``.
        label: the row label; default :func:`run_label` of the ledger.

    Raises:
        ReportError: the ledger is missing or is not valid JSON.
    """
    try:
        ledger = Ledger.read(path)
    except FileNotFoundError as err:
        raise ReportError(str(err)) from None
    except ValueError as err:
        raise ReportError(f"{path}: ledger is not valid JSON ({err})") from None
    return Run(str(path), label or run_label(ledger), ledger)


def resolve_metric(runs: Sequence[Run], metric: str | None = None) -> str:
    """The metric to compare: ``metric`` if given, else the ``score`` all ledgers agree on.

    Raises:
        ReportError: a ledger names no score, or the ledgers name different ones.
    """
    if metric:
        return metric
    for run in runs:
        if not run.ledger.score:
            raise ReportError(f"{run.source}: ledger names no score metric; pass --metric")
    names = {run.ledger.score for run in runs}
    if len(names) > 1:
        listing = ", ".join(f"{run.source}: {run.ledger.score}" for run in runs)
        raise ReportError(f"runs are ranked by different metrics ({listing}); pass --metric to choose one")
    return names.pop()


def run_label(ledger: Ledger) -> str:
    """A label from the phases, e.g. ``Fshift 4→1`` or ``Avg Pool 4→2→1`` (``Full resolution`` if none)."""
    if any(p.compression is None or p.factor is None for p in ledger.phases):
        return " → ".join(str(p.name or i + 1) for i, p in enumerate(ledger.phases))
    methods = dict.fromkeys(p.compression for p in ledger.phases if p.compression != "none")
    if not methods:
        return "Full resolution"
    transfers = {p.compression: p.patch_transfer for p in ledger.phases if p.patch_transfer}
    names = "/".join(METHOD_NAMES.get(m, m) + (f" {PATCH_TRANSFER_NAMES.get(transfers[m], transfers[m])}"
                                                 if m in transfers else "") for m in methods)
    return f"{names} {'→'.join(str(p.factor) for p in ledger.phases)}"


def points(run: Run, metric: str) -> list[Point]:
    """The run's evaluations in order, checked.

    Raises:
        ReportError: no evaluations, or an evaluation lacks a field or the metric.
    """
    if not run.ledger.evals:
        raise ReportError(f"{run.source}: no evaluations in the ledger")
    out = []
    for i, ev in enumerate(run.ledger.evals):
        missing = [k for k in ("phase", "train_flops", "wall_seconds", "metrics") if k not in ev]
        if missing:
            raise ReportError(f"{run.source}: evaluation {i} lacks {', '.join(missing)}")
        if metric not in ev["metrics"]:
            raise ReportError(f"{run.source}: evaluation {i} (phase {ev['phase']}) has no metric {metric!r}; "
                              f"it has {sorted(ev['metrics'])}")
        try:
            out.append(Point(int(ev["phase"]), float(ev["train_flops"]), float(ev["wall_seconds"]),
                             float(ev["metrics"][metric])))
        except (TypeError, ValueError):
            raise ReportError(f"{run.source}: evaluation {i} holds a non-numeric phase, FLOPs, time or "
                              f"{metric!r}") from None
    return out


def _saving(used: float, reference: float) -> float | None:
    return 100.0 * (1.0 - used / reference) if reference > 0 else None


def end_note(run: Run) -> str | None:
    """How the run's final phase ended when a rule ended it: stopped live on surpassing its baseline
    (``train.stop_when_surpassing``), by a criterion, or by its cap before it surpassed; None otherwise."""
    if not run.ledger.phases:
        return None
    final = run.ledger.phases[-1]
    at = final.ended_at or {}
    where = f"epoch {at['epoch']}" if "epoch" in at else f"step {at.get('step', '?')}"
    if final.ended_by == "surpassed":
        return f"stopped live on surpassing its baseline ({where} of the final phase)"
    if final.ended_by == "cap" and run.ledger.stop_target:
        return f"the cap ended it ({where} of the final phase) before it surpassed its baseline"
    if final.ended_by not in (None, "length", "cap"):
        return f"final phase ended by {final.ended_by} ({where})"
    return None


def compare(baseline: Run, runs: Sequence[Run], metric: str) -> list[Row]:
    """The Table 2/3 rows (Tables 4/5 for 3-phase runs): the baseline's row, then one per run.

    Args:
        baseline: the full-resolution baseline run.
        runs: the coarse-to-fine runs.
        metric: the metric name in the evaluations (higher is better).

    Raises:
        ReportError: as :func:`points`, or a run has no evaluation in its final phase.
    """
    base = max(points(baseline, metric), key=lambda p: p.value)  # the first of equal maxima
    rows = [Row(baseline.label, base.value, None, None, None, base.value, None, None)]
    for run in runs:
        final = len(run.ledger.phases) - 1
        if final < 0:
            raise ReportError(f"{run.source}: no phases in the ledger")
        last = [p for p in points(run, metric) if p.phase == final]
        if not last:
            raise ReportError(f"{run.source}: no evaluation in the final phase (phase index {final})")
        stop = next((p for p in last if p.value > base.value), None)
        best = max(p.value for p in last)
        value = stop.value if stop else best
        rows.append(Row(run.label, value, value - base.value,
                        _saving(stop.flops, base.flops) if stop else None,
                        _saving(stop.seconds, base.seconds) if stop else None,
                        best, best - base.value, stop, end_note(run)))
    return rows


def _percent(value: float, delta: float | None) -> str:
    text = f"{100 * value:.2f}"
    if delta is None:
        return text
    diff = f"{100 * delta:+.2f}"
    return f"{text} ({'=' if diff in ('+0.00', '-0.00') else diff})"


def markdown_table(rows: Sequence[Row], metric: str) -> str:
    """The rows as a Markdown table (metrics in percent, differences to the baseline in parentheses)."""
    lines = [f"| Setting | {metric} | FLOPs save (%) | Time save (%) | Best {metric} (no budget) |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        value = _percent(row.value, row.delta)
        if row.delta is not None and row.stop is None:
            value += ", not surpassed"
        saves = ["-" if s is None else f"{s:.2f}" for s in (row.flops_save, row.time_save)]
        label = f"{row.label} ({row.note})" if row.note else row.label
        lines.append(f"| {label} | {value} | {saves[0]} | {saves[1]} | {_percent(row.best, row.best_delta)} |")
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[Run], rows: Sequence[Row], metric: str, path: str | Path) -> None:
    """Plots the metric against cumulative training FLOPs, one line per run, one marker per phase.

    Args:
        runs: the baseline then the other runs, in the order of ``rows``.
        rows: :func:`compare`'s rows; each run's stopping evaluation is starred.
        metric: the metric name.
        path: where the PNG goes.
    """
    fig = Figure(figsize=(8, 5), dpi=120)  # no pyplot: no display, no global backend
    ax = fig.subplots()
    phases = 0
    for run, row, color in zip(runs, rows, itertools.cycle(rcParams["axes.prop_cycle"].by_key()["color"])):
        pts = points(run, metric)
        ax.plot([p.flops for p in pts], [100 * p.value for p in pts], color=color, label=run.label)
        for phase in sorted({p.phase for p in pts}):
            sel = [p for p in pts if p.phase == phase]
            ax.scatter([p.flops for p in sel], [100 * p.value for p in sel], color=color, s=22,
                       marker=PHASE_MARKERS[phase % len(PHASE_MARKERS)], zorder=3)
            phases = max(phases, phase + 1)
        if row.stop is not None:
            ax.scatter([row.stop.flops], [100 * row.stop.value], marker="*", s=220, color=color,
                       edgecolors="black", zorder=4)
    ax.axhline(100 * rows[0].value, color="gray", linestyle=":", linewidth=1)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="gray", linestyle="", marker=PHASE_MARKERS[i % len(PHASE_MARKERS)],
                       label=f"phase {i + 1}") for i in range(phases)]
    handles += [Line2D([], [], color="gray", linestyle=":", label="baseline best"),
                Line2D([], [], color="gray", linestyle="", marker="*", markersize=12, markeredgecolor="black",
                       label="first to surpass baseline")]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set_xlabel("cumulative training compute (FLOPs)")
    ax.set_ylabel(f"validation {metric} (%)")
    ax.set_title(f"{metric} against training FLOPs")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune/report.py",
        description="Compare coarse-to-fine runs with a baseline as in the paper's Tables 2-5 (fine-tuning or\n"
                    "pretraining runs). Each run stops at the earliest evaluation of its final phase that\n"
                    "surpasses the baseline's best; FLOPs and time savings are against the baseline's best\n"
                    "evaluation. Prints the Markdown table and writes report.md and report.png.",
        epilog="example:\n  python finetune/report.py --baseline runs/esc50_base \\\n"
               "      --runs runs/esc50_fshift4 runs/esc50_fshift421 --names 'Fshift 4→1' 'Fshift 4→2→1' \\\n"
               "      --out reports/esc50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--baseline", type=Path, required=True, metavar="RUN_DIR",
                        help="the baseline's run directory (or its ledger.json)")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, metavar="RUN_DIR",
                        help="coarse-to-fine run directories (or their ledger.json)")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="row labels, one per --runs entry (default: from the phases, e.g. 'Fshift 4→1')")
    parser.add_argument("--metric", metavar="NAME",
                        help="the metric to compare, e.g. mAP (default: the 'score' the ledgers agree on)")
    parser.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                        help="where report.md and report.png go (default: the current directory)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.names is not None and len(args.names) != len(args.runs):
            raise ReportError(f"--names has {len(args.names)} labels for {len(args.runs)} --runs")
        baseline = load_run(args.baseline, "Baseline")
        runs = [load_run(path, name) for path, name in zip(args.runs, args.names or [None] * len(args.runs))]
        metric = resolve_metric([baseline, *runs], args.metric)
        rows = compare(baseline, runs, metric)
        table = markdown_table(rows, metric)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(
            f"# Coarse-to-fine report ({metric})\n\n{table}\nEach run stops at the earliest evaluation of its final "
            f"phase whose {metric} surpasses the baseline's best; savings are against the baseline's best "
            f"evaluation.\n\n![{metric} against training FLOPs](report.png)\n", encoding="utf-8")
        plot([baseline, *runs], rows, metric, args.out / "report.png")
    except (ReportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
