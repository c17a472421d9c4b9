"""The report's figure: the metric against cumulative training FLOPs, one line per run."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from common.reports.compare import Row
from common.reports.runs import Run, points
from common.reports.tables import metric_name, report_title, shown
from common.system.atomic import atomic_path

__all__ = ["figure", "plot"]

PHASE_MARKERS = "osD^vPpX"


def _limits(values: Sequence[float], scale: float) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = max(0.08 * (hi - lo), scale / 200)  # half a point in percent
    return lo - pad, hi + pad


def figure(runs: Sequence[Run], rows: Sequence[Row], metric: str, title: str | None = None) -> Figure:
    """The metric against cumulative training FLOPs, one line per run (the drawing :func:`plot` saves).

    The y-range is that of the final phases and the baseline: a coarse phase's values (hollow markers,
    dashed line) are on another token grid and, for SSAST's masked-patch accuracy, on another scale; those
    outside the range sit on its edge as triangles. Each run's stop (the first final-phase evaluation
    above the baseline's best, or ``--stop-epoch``) is a star; a run's weight average, evaluated at its end,
    is a diamond off its line (not an epoch); the legend, outside the axes, lists only what is drawn.
    """
    fig = Figure(figsize=(10, 5.2), dpi=120, layout="constrained")  # no pyplot: no display, no global backend
    ax = fig.subplots()
    scale = shown(metric)  # percent for a fraction
    final_values = [scale * rows[0].value]
    series = []
    for run in runs:
        pts = points(run, metric)
        final = len(run.ledger.phases) - 1 if run.ledger.phases else max(p.phase for p in pts)  # a hand-written
        # baseline's ledger may list evaluations only
        series.append((pts, final))
        final_values += [scale * p.value for p in pts if p.phase == final]
    lo, hi = _limits(final_values, scale)
    handles = []
    coarse_shown: dict[int, bool] = {}
    stop_label = averaged_shown = None
    colors = itertools.cycle(rcParams["axes.prop_cycle"].by_key()["color"])
    for run, row, (pts, final), color in zip(runs, rows, series, colors):
        fine = [p for p in pts if p.phase == final and not p.averaged]
        averaged = [p for p in pts if p.averaged]
        if averaged:
            ax.scatter([p.flops for p in averaged], [min(max(scale * p.value, lo), hi) for p in averaged], marker="d",
                       s=70, color=color, edgecolors="black", zorder=4)
            averaged_shown = True
        line, = ax.plot([p.flops for p in fine], [scale * p.value for p in fine], color=color, marker="o",
                        markersize=4, label=run.label)
        handles.append(line)
        coarse = [p for p in pts if p.phase != final and not p.averaged]
        if coarse:
            ax.plot([p.flops for p in coarse] + [fine[0].flops], [min(max(scale * p.value, lo), hi) for p in coarse]
                    + [scale * fine[0].value], color=color, linestyle="--", linewidth=0.8, alpha=0.6)
            for phase in sorted({p.phase for p in coarse}):
                sel = [p for p in coarse if p.phase == phase]
                inside = [p for p in sel if lo <= scale * p.value <= hi]
                above = [p for p in sel if scale * p.value > hi]
                below = [p for p in sel if scale * p.value < lo]
                marker = PHASE_MARKERS[phase % len(PHASE_MARKERS)]
                ax.scatter([p.flops for p in inside], [scale * p.value for p in inside], facecolors="none",
                           edgecolors=color, marker=marker, s=30, zorder=3)
                for group, edge, arrow in ((above, hi, "^"), (below, lo, "v")):
                    if group:
                        ax.scatter([p.flops for p in group], [edge] * len(group), facecolors="none",
                                   edgecolors=color, marker=arrow, s=40, zorder=3, clip_on=False)
                        coarse_shown[-1] = True
                if inside:
                    coarse_shown[phase] = True
        if row.stop is not None:
            ax.scatter([row.stop.flops], [scale * row.stop.value], marker="*", s=220, color=color, edgecolors="black",
                       zorder=4)
            stop_label = f"stop: epoch {row.stop.epoch} of the final phase" if row.fixed else \
                "first to surpass the baseline"
    ax.axhline(scale * rows[0].value, color="gray", linestyle=":", linewidth=1)
    ax.set_ylim(lo, hi)
    handles.append(Line2D([], [], color="gray", linestyle=":", label=f"baseline best ({scale * rows[0].value:.2f})"))
    for phase in sorted(p for p in coarse_shown if p >= 0):
        handles.append(Line2D([], [], color="gray", linestyle="", marker=PHASE_MARKERS[phase % len(PHASE_MARKERS)],
                              markerfacecolor="none", label=f"phase {phase + 1} (coarse)"))
    if -1 in coarse_shown:
        handles.append(Line2D([], [], color="gray", linestyle="", marker="^", markerfacecolor="none",
                              label="coarse value off this scale"))
    if stop_label:
        handles.append(Line2D([], [], color="gray", linestyle="", marker="*", markersize=12, markeredgecolor="black",
                              label=stop_label))
    if averaged_shown:
        handles.append(Line2D([], [], color="gray", linestyle="", marker="d", markersize=8, markeredgecolor="black",
                              label="weight average (end of run)"))
    fig.legend(handles=handles, fontsize=8, loc="outside right upper")
    ax.set_xlabel("cumulative training compute (FLOPs)")
    ax.set_ylabel(f"validation {metric_name(runs, metric)}" + (" (%)" if scale == 100 else ""))
    ax.set_title(title or report_title(runs, metric), fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig


def plot(runs: Sequence[Run], rows: Sequence[Row], metric: str, path: str | Path, title: str | None = None) -> Figure:
    """Writes :func:`figure` as a PNG and returns it.

    Args:
        runs: the baseline then the other runs, in the order of ``rows``.
        rows: :func:`compare`'s rows.
        metric: the metric name.
        path: where the PNG goes.
        title: the plot's title (default: :func:`report_title`).
    """
    fig = figure(runs, rows, metric, title)
    with atomic_path(path) as tmp:  # a killed report leaves the last whole plot, not a truncated one
        fig.savefig(tmp, format="png")
    return fig
