"""The report command: coarse-to-fine runs against their baseline, the paper's savings tables and a metric-vs-FLOPs
plot.

Reads the runs (``common.reports.runs``; a cross-validation run's root is the mean of its folds), refuses those
that have not finished, are of another kind than the baseline (pretraining, fine-tuning) or were validated on
other manifests or with other evaluation settings than the baseline (what both ledgers record), naming the
difference, unless ``--accept-baseline-differences`` (then listed in ``report.md``); compares them with the
baseline by the paper's rule (``common.reports.compare``, which says how; ``--stop-epoch N`` stops every run
at epoch N of its final phase instead) and writes the tables (``common.reports.tables``) to ``report.md``
and the figure (``common.reports.figure``) to ``report.png``.

    python common/reports/report.py --baseline runs/base --runs runs/fshift4 runs/fshift421 --out reports/
    python common/reports/report.py --baseline runs/as_base --runs runs/as_fshift4 --stop-epoch 3 --out reports/as
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from common.system.atomic import atomic_write_text
from common.system.disk import output_folder
from common.system.prog import error_line, prog, whole_number
from common.system.signals import piped
from common.system.version import same_code

# Imports the command alone needs are inside its functions: --help answers without loading torch.

if TYPE_CHECKING:
    from common.reports.runs import Run

__all__ = ["main"]


def _fold_text(run: Run) -> str:
    """report.md's paragraph on a cross-validation run: what its numbers are, and what was left out."""
    if not run.folds:
        return ""
    text = (f"\n{run.label}: a cross-validation run ({run.source}); each evaluation is the mean over its "
            f"{len(run.folds)} folds (metric, cumulative FLOPs and time), the whole-run columns are the sums over "
            f"the folds.")
    if run.left_out:
        text += f" Left out (not scored by every fold): {'; '.join(run.left_out)}."
    return text + "\n"


def _code_text(runs: Sequence[Run]) -> str:
    """report.md's caution where the runs were not all trained by the same code (``ledger.json``'s ``code``, a
    resume's ``code`` intervention): an upgrade can change what is computed (SSAST's validation masks), so two
    identical models could score apart."""

    def codes(run: Run) -> list:
        ledgers = [fold.ledger for fold in run.folds] or [run.ledger]
        return [c for ledger in ledgers for c in
                [*(i["changes"]["code"]["from"] for i in ledger.interventions if "code" in i.get("changes", {})),
                 ledger.code]]

    said = {run.label: codes(run) for run in runs}
    every = [c for found in said.values() for c in found]
    known = [c for c in every if c is not None]
    if len(known) == len(every) and all(same_code(a, b) for a in known for b in known) or not known:
        return ""  # one code, or none recorded (nothing to tell)
    def named(code: dict | None) -> str:
        return "unknown (not recorded)" if code is None else \
            " ".join(f"{k} {str(v)[:12] if k == 'commit' else v}" for k, v in code.items())

    words = "; ".join(f"{label}: " + ", then ".join(map(named, found)) for label, found in said.items())
    return (f"\nNot every run was trained by the same code ({words}; ledger.json's code and its interventions). An "
            f"upgrade can change what is computed, the validation scores included (SSAST's masks did): compare "
            f"these scores with care.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("common/reports/report.py"),
        description="Compare coarse-to-fine runs with a baseline as in the paper's Tables 2-5 (fine-tuning or\n"
                    "pretraining runs). Each run stops at the earliest evaluation of its final phase that\n"
                    "surpasses the baseline's best per-epoch evaluation (a weight average is compared only with\n"
                    "a weight average); FLOPs and time savings are against the baseline's best evaluation.\n"
                    "Prints the Markdown table and writes report.md and report.png.",
        epilog="example:\n  python common/reports/report.py --baseline runs/esc50_base \\\n"
               "      --runs runs/esc50_fshift4 runs/esc50_fshift421 --names 'Fshift 4→1' 'Fshift 4→2→1' \\\n"
               "      --out reports/esc50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--baseline", type=Path, required=True, metavar="RUN_DIR",
                        help="the baseline's run directory (or its ledger.json); a cross-validation run's root "
                             "(fold1/ ... foldK/) is the mean of its folds")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, metavar="RUN_DIR",
                        help="coarse-to-fine run directories (or their ledger.json), cross-validation roots as "
                             "for --baseline")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="row labels, one per --runs entry (default: from the phases, e.g. 'Fshift 4→1', and the "
                             "run directory's name after those that two runs share)")
    parser.add_argument("--metric", metavar="NAME",
                        help="the score to compare: acc, mAP, mAUC or dprime (default: the 'score' the ledgers agree "
                             "on)")
    parser.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                        help="where report.md and report.png go (default: the current directory)")
    parser.add_argument("--stop-epoch", type=whole_number(1, ">= 1 (epochs count from 1)"), default=None,
                        metavar="N",
                        help="stop every run at epoch N of its final phase instead of at the first evaluation that "
                             "surpasses the baseline (the paper's AudioSet rows: --stop-epoch 3)")
    parser.add_argument("--title", default=None, help="title of the plot (default: the task and the run directories)")
    parser.add_argument("--accept-baseline-differences", action="store_true",
                        help="compare runs validated on other manifests or with other evaluation settings than the "
                             "baseline (refused otherwise); the differences are listed in report.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 on bad input, 141 when the output's reader went away)."""
    args = build_parser().parse_args(argv)
    return piped(lambda: _report(args))


def _report(args: argparse.Namespace) -> int:
    # lazy: the runs' ledgers, the comparison and the figure load the training stack and matplotlib, which --help
    # does without
    from common.reports.compare import baseline_differences, compare
    from common.reports.figure import plot
    from common.reports.runs import (
        ReportError,
        distinct_labels,
        load_run,
        other_precision,
        require_finished,
        resolve_metric,
        run_kind,
    )
    from common.reports.tables import markdown_table, metric_name, whole_run_table

    try:
        if args.names is not None and len(args.names) != len(args.runs):
            raise ReportError(f"--names has {len(args.names)} labels for {len(args.runs)} --runs")
        baseline = load_run(args.baseline, "Baseline")
        runs = [load_run(path, name) for path, name in zip(args.runs, args.names or [None] * len(args.runs))]
        if args.names is None:  # labels from the phases: runs with the same phases get their directories' names
            runs = distinct_labels(runs)
        for run in runs:  # SSAST pretraining's masked-patch accuracy is no fine-tuning accuracy
            if Path(run.source).resolve() == Path(baseline.source).resolve():
                raise ReportError(f"--runs {run.source} is the baseline itself; --runs names the runs compared "
                                  f"with it")
            if run_kind(run) != run_kind(baseline):
                raise ReportError(f"{run.source} is a {run_kind(run)} run and the baseline {baseline.source} a "
                                  f"{run_kind(baseline)} run: compare runs of one kind")
        for run in (baseline, *runs):  # before the differences, which an unfinished run's may only seem to have
            require_finished(run)
        metric = resolve_metric([baseline, *runs], args.metric)
        found = baseline_differences(baseline, runs)
        if found and not args.accept_baseline_differences:
            listed = "; ".join(f"{label}: {', '.join(d)}" for label, d in found.items())
            raise ReportError(f"the runs' scores do not compare with the baseline's ({listed}); compare runs validated "
                              f"alike, or pass --accept-baseline-differences (listed in report.md)")
        rows = compare(baseline, runs, metric, args.stop_epoch)
        table = markdown_table(rows, metric)
        accepted = "".join(f"\nAccepted differences from the baseline (--accept-baseline-differences), {label}: "
                           f"{'; '.join(d)}.\n" for label, d in found.items())
        averaged = "" if all(row.averaged is None for row in rows) else \
            (f" The weight-averaged {metric} is the score of each run's weight average, against the baseline's "
             f"average where it has one; the tables above compare epochs with epochs only.")
        averaged += "" if all(row.test is None for row in rows) else \
            (f" The test {metric} is the run's test split scored once, with its best final-phase model (or its weight "
             f"average): test_metrics.json.")
        folds = "".join(_fold_text(run) for run in (baseline, *runs)) + _code_text([baseline, *runs])
        folds += "".join(f"\n{row.label} trained on {row.hardware}: its time saving is not computed (wall times on "
                         f"other devices, another number of ranks or a mix of them do not compare); its FLOPs saving "
                         f"is.\n"
                         for row in rows if row.hardware)
        folds += "".join(f"\n{row.label} trained in {other}: the precision moves scores a little and times much "
                         f"(bf16 against fp32).\n"
                         for row, other in zip(rows[1:], (other_precision(baseline, run) for run in runs)) if other)
        output_folder(args.out)
        rule = (f"Each run stops at epoch {args.stop_epoch} of its final phase (a fixed stop, whatever its {metric})"
                if args.stop_epoch is not None else
                f"Each run stops at the earliest evaluation of its final phase whose {metric} surpasses the "
                f"baseline's best (epochs with epochs: a weight average is not an epoch)")
        plot([baseline, *runs], rows, metric, args.out / "report.png", args.title)  # the plot first: the text names it
        atomic_write_text(  # a killed report leaves the last whole report, never part of one
            args.out / "report.md",
            f"# Coarse-to-fine report ({metric_name([baseline, *runs], metric)})\n\n{table}\n{rule}; savings are "
            f"against the baseline's best evaluation. Every {metric} here but the test column is a validation score "
            f"(the split each run validated on, its ledger).\n\n## Whole runs\n\n{whole_run_table(rows, metric)}\n"
            f"All the training FLOPs of each run against all of the baseline's, the device time it held (training "
            f"and validation seconds times the ranks: GPU-hours on GPUs), and the best {metric} of the final "
            f"phase (difference to the baseline's best).{averaged}\n{folds}{accepted}\n"
            f"![{metric} against training FLOPs](report.png)\n")
    except (ReportError, OSError, ValueError) as err:  # ValueError: --out names a file (output_folder)
        print(f"error: {error_line(str(err))}", file=sys.stderr)
        return 2
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
