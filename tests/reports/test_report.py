"""The report (common/reports/) on hand-made ledgers: the paper's savings rule, labels, errors, the CLI's files."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from common.reports.compare import compare
from common.reports.report import main
from common.reports.runs import ReportError, load_run, resolve_metric, run_label
from common.reports.tables import markdown_table, whole_run_table
from common.training.ledger import Ledger

# Baseline: 20 epochs at 10 FLOPs and 5 s each; accuracy climbs to 0.45 at epoch 15, then falls.
# Reference: F_base = 150, T_base = 75.
BASE_ACC = [0.31, 0.32, 0.33, 0.34, 0.35, 0.36, 0.37, 0.38, 0.39, 0.40, 0.41, 0.42, 0.43, 0.44, 0.45,
            0.44, 0.43, 0.43, 0.42, 0.41]
BASE_EVALS = [(0, 10.0 * k, 5.0 * k, acc) for k, acc in enumerate(BASE_ACC, 1)]
# Fshift 4→1: phase 0 (3 FLOPs, 2 s per epoch) beats the baseline and must be ignored; in the final phase
# (15 FLOPs, 7 s per epoch) 0.45 only equals it, and the first to surpass is 0.46 at 75 FLOPs, 38 s.
C2F_EVALS = ([(0, 3.0 * k, 2.0 * k, 0.50) for k in range(1, 6)]
             + [(1, 15.0 + 15.0 * k, 10.0 + 7.0 * k, acc)
                for k, acc in enumerate([0.40, 0.44, 0.45, 0.46, 0.48, 0.47, 0.49, 0.485], 1)])
NEVER_EVALS = [(0, 5.0, 3.0, 0.50), (1, 20.0, 10.0, 0.40), (1, 35.0, 17.0, 0.44), (1, 50.0, 24.0, 0.43)]


def write_run(root: Path, name: str, phases, evals, score="acc", metric="acc", epochs=True) -> Path:
    """A run directory whose ledger.json has ``phases`` [(compression, factor)] and ``evals``
    [(phase, cumulative FLOPs, cumulative seconds, value)]."""
    run_dir = root / name
    run_dir.mkdir()
    records = []
    for i, (phase, flops, seconds, value) in enumerate(evals):
        where = {"epoch": i + 1} if epochs else {}
        records.append({"phase": phase, **where, "total_step": 10 * (i + 1), "phase_step": 10 * (i + 1),
                        "train_flops": flops, "wall_seconds": seconds, "samples": 16 * (i + 1),
                        "metrics": {metric: value, "loss": 1.0 - value}})
    ledger = Ledger.from_dict({
        "score": score, "evals": records,
        "phases": [{"name": f"phase{i + 1}", "compression": c, "factor": f, "steps": 0, "samples": 0,
                    "train_flops": 0, "wall_seconds": 0.0, "eval_seconds": 0.0} for i, (c, f) in enumerate(phases)],
    })
    ledger.write(run_dir / "ledger.json")
    (run_dir / "model.safetensors").write_bytes(b"")  # a finished run (what the report checks for)
    return run_dir


@pytest.fixture
def runs(tmp_path):
    return {
        "base": write_run(tmp_path, "base", [("none", 1)], BASE_EVALS),
        "c2f": write_run(tmp_path, "c2f", [("fshift", 4), ("none", 1)], C2F_EVALS),
        "never": write_run(tmp_path, "never", [("avgpool", 2), ("none", 1)], NEVER_EVALS),
    }


def test_savings_follow_the_paper_rule(runs):
    base, c2f, never = load_run(runs["base"], "Baseline"), load_run(runs["c2f"]), load_run(runs["never"])
    rows = compare(base, [c2f, never], resolve_metric([base, c2f, never]))
    assert rows[0].value == pytest.approx(0.45) and rows[0].flops_save is None and rows[0].stop is None
    row = rows[1]
    assert row.label == "Fshift 4→1"
    assert (row.stop.phase, row.stop.flops, row.stop.seconds) == (1, 75.0, 38.0)
    assert row.value == pytest.approx(0.46) and row.delta == pytest.approx(0.01)
    assert row.flops_save == pytest.approx(100 * (1 - 75 / 150))
    assert row.time_save == pytest.approx(100 * (1 - 38 / 75))
    assert row.best == pytest.approx(0.49) and row.best_delta == pytest.approx(0.04)
    row = rows[2]
    assert row.label == "Avg Pool 2→1" and row.stop is None and row.flops_save is None and row.time_save is None
    assert row.value == pytest.approx(0.44) and row.best == pytest.approx(0.44)


def test_markdown_rows(runs):
    base, c2f, never = load_run(runs["base"], "Baseline"), load_run(runs["c2f"]), load_run(runs["never"])
    table = markdown_table(compare(base, [c2f, never], "acc"), "acc")
    assert table.splitlines()[0] == "| Setting | acc | FLOPs save (%) | Time save (%) | Best acc (no budget) |"
    assert "| Baseline | 45.00 | - | - | 45.00 |" in table
    assert "| Fshift 4→1 | 46.00 (+1.00) | 50.00 | 49.33 | 49.00 (+4.00) |" in table
    assert "| Avg Pool 2→1 | 44.00 (-1.00), not surpassed | - | - | 44.00 (-1.00) |" in table


def test_d_prime_is_shown_as_it_is_and_fractions_in_percent(tmp_path):
    """d' is not a fraction: a d' of 2.71 read '271.00' in the tables and on the plot's axis (with a '%')."""
    from common.reports.figure import figure

    base = write_run(tmp_path, "base", [("none", 1)], [(0, 10.0 * k, 5.0 * k, d) for k, d in
                                                      enumerate([2.5, 2.7, 2.6], 1)], score="dprime", metric="dprime")
    c2f = write_run(tmp_path, "c2f", [("fshift", 4), ("none", 1)], [(0, 3.0, 2.0, 1.0), (1, 12.0, 6.0, 2.75)],
                    score="dprime", metric="dprime")
    runs = [load_run(base, "Baseline"), load_run(c2f)]
    rows = compare(runs[0], runs[1:], resolve_metric(runs))
    assert "| Baseline | 2.70 | - | - | 2.70 |" in markdown_table(rows, "dprime")
    assert "| Fshift 4→1 | 2.75 (+0.05) | 40.00 | 40.00 | 2.75 (+0.05) |" in markdown_table(rows, "dprime")
    assert "| 2.75 (+0.05) |" in whole_run_table(rows, "dprime")
    ax = figure(runs, rows, "dprime").axes[0]
    low, high = ax.get_ylim()
    assert ax.get_ylabel() == "validation dprime" and 2.4 < low <= 2.5 and 2.75 <= high < 2.9


@pytest.mark.parametrize("phases, label", [
    ([("fshift", 4), ("fshift", 2), ("none", 1)], "Fshift 4→2→1"),
    ([("maxpool", 4), ("none", 1)], "Max Pool 4→1"),
    ([("patch", 2), ("none", 1)], "Patch 2→1"),
    ([("none", 1)], "Full resolution"),
])
def test_labels_from_phases(phases, label):
    ledger = Ledger.from_dict({"phases": [{"compression": c, "factor": f} for c, f in phases]})
    assert run_label(ledger) == label


def test_three_phase_run_uses_its_last_phase_only(tmp_path, runs):
    evals = [(0, 5.0, 2.0, 0.6), (1, 20.0, 8.0, 0.6), (2, 60.0, 30.0, 0.44), (2, 90.0, 45.0, 0.451)]
    run = load_run(write_run(tmp_path, "three", [("fshift", 4), ("fshift", 2), ("none", 1)], evals))
    row = compare(load_run(runs["base"]), [run], "acc")[1]
    assert row.label == "Fshift 4→2→1" and row.stop.flops == 90.0
    assert row.flops_save == pytest.approx(40.0) and row.time_save == pytest.approx(40.0)


def test_mismatched_metrics_are_an_error(tmp_path, runs):
    other = load_run(write_run(tmp_path, "audioset", [("fshift", 4), ("none", 1)], C2F_EVALS,
                               score="mAP", metric="mAP"))
    base = load_run(runs["base"])
    with pytest.raises(ReportError, match=r"different metrics.*base: acc.*audioset: mAP"):
        resolve_metric([base, other])
    with pytest.raises(ReportError, match=r"audioset.*evaluation 0 .*no metric 'acc'"):
        compare(base, [other], resolve_metric([base, other], "acc"))


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(ReportError, match="no ledger at .*missing"):
        load_run(tmp_path / "missing")
    empty = load_run(write_run(tmp_path, "empty", [("none", 1)], []))
    with pytest.raises(ReportError, match="empty: no evaluations"):
        compare(empty, [], "acc")
    base = load_run(write_run(tmp_path, "base", [("none", 1)], BASE_EVALS))
    unfinished = load_run(write_run(tmp_path, "unfinished", [("fshift", 4), ("none", 1)], C2F_EVALS[:5]))
    with pytest.raises(ReportError, match="unfinished: no evaluation in the final phase"):
        compare(base, [unfinished], "acc")


def test_pretraining_ledgers(tmp_path):
    # Iteration-based: no "epoch" in the evals; masked accuracy every 100 steps.
    base = write_run(tmp_path, "pt_base", [("none", 1)],
                     [(0, 100.0 * k, 10.0 * k, acc) for k, acc in enumerate([0.2, 0.3, 0.35, 0.34], 1)],
                     epochs=False)
    c2f = write_run(tmp_path, "pt_c2f", [("fshift", 4), ("none", 1)],
                    [(0, 30.0, 4.0, 0.1), (1, 130.0, 14.0, 0.3), (1, 230.0, 24.0, 0.36), (1, 330.0, 34.0, 0.38)],
                    epochs=False)
    base_run, c2f_run = load_run(base, "Baseline"), load_run(c2f)
    row = compare(base_run, [c2f_run], resolve_metric([base_run, c2f_run]))[1]
    assert row.stop.flops == 230.0
    assert row.flops_save == pytest.approx(100 * (1 - 230 / 300)) and row.time_save == pytest.approx(20.0)


def test_cli_writes_report_files(tmp_path, runs, capsys):
    out = tmp_path / "out"
    rc = main(["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), str(runs["never"]),
               "--names", "Fshift C=4", "Avg Pool C=2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| Fshift C=4 | 46.00 (+1.00) | 50.00 | 49.33 | 49.00 (+4.00) |" in printed
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| Baseline | 45.00 | - | - | 45.00 |" in report
    assert "| Avg Pool C=2 | 44.00 (-1.00), not surpassed | - | - | 44.00 (-1.00) |" in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_says_its_scores_are_validation_scores_and_gives_the_test_splits(tmp_path, runs, capsys):
    """The tables rank validation scores; a task with a test split (SpeechCommands, VoxCeleb) has its runs' test
    scores in a column of the whole-run table, against the baseline's (a run without one: '-')."""
    out = tmp_path / "out"
    assert main(["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), "--out", str(out)]) == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "Every acc here but the test column is a validation score" in report and "test acc" not in report
    (runs["base"] / "test_metrics.json").write_text(json.dumps({"model": "best.safetensors", "acc": 0.40}))
    (runs["c2f"] / "test_metrics.json").write_text(json.dumps({"model": "best.safetensors", "acc": 0.425}))
    assert main(["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), str(runs["never"]), "--out",
                 str(out)]) == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert rows[4].endswith(" test acc |") and rows[5].endswith("| 40.00 |"), rows
    assert rows[6].endswith("| 42.50 (+2.50) |") and rows[7].endswith("| - |"), rows
    assert "The test acc is the run's test split scored once" in report
    (runs["c2f"] / "test_metrics.json").write_text("[1]")
    assert main(["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), "--out", str(out)]) == 2
    assert capsys.readouterr().err.endswith(f"{runs['c2f'] / 'test_metrics.json'}: not the test metrics a "
                                            f"fine-tuning run writes (a JSON object)\n")


def test_a_reader_that_goes_away_ends_the_report_quietly(tmp_path, runs):
    """``c2f-report ... | head``: the files are written, then the table meets a closed pipe: status 141 as for a
    process SIGPIPE ended, nothing on stderr (the training commands' rule, ``common.system.signals.piped``)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "common.reports", "--baseline", str(runs["base"]), "--runs",
                             str(runs["c2f"]), "--out", str(out)], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(root)})
    proc.stdout.close()  # gone before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err
    assert (out / "report.md").is_file()


def test_cli_errors_exit_2(tmp_path, runs, capsys):
    assert main(["--baseline", str(runs["base"]), "--runs", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and "Traceback" not in err
    assert main(["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), "--names", "a", "b"]) == 2
    assert "--names has 2 labels for 1 --runs" in capsys.readouterr().err
    (tmp_path / "notes.md").write_text("mine\n")
    for out, said in ((tmp_path / "notes.md", "is a file, not a folder"),
                      (tmp_path / "notes.md" / "report", f"is not a folder ({tmp_path / 'notes.md'} on its way is a file)")):
        assert main(["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"error: --out {out} {said}; name a new folder or an existing one\n"
    assert (tmp_path / "notes.md").read_text() == "mine\n"
    # a loss falls as a model improves: ranked as a score, its worst would be called the best
    assert main(["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), "--out", str(tmp_path / "r"),
                 "--metric", "loss"]) == 2
    assert capsys.readouterr().err == ("error: --metric loss: the report ranks runs by a score that grows as the model "
                                       "improves (acc, mAP, mAUC, dprime), the highest taken as the best; loss is not "
                                       "one\n")
    assert not (tmp_path / "r").exists()


def test_patch_runs_are_labelled_with_their_transfer():
    from common.reports.runs import run_label
    from common.training.ledger import Ledger

    ledger = Ledger.from_dict({"score": "acc", "phases": [
        {"compression": "patch", "factor": 4, "patch_transfer": "bilinear"}, {"compression": "none", "factor": 1}]})
    assert run_label(ledger) == "Patch BL 4→1"


# ------------------------------------------------------------------- the plot (issue 9 item 9)
def _pretext(run_dir: Path) -> Path:
    """Make a hand-written ledger look like SSAST pretraining's (masked accuracy next to nce / mse)."""
    ledger = Ledger.read(run_dir)
    for ev in ledger.evals:
        ev["metrics"].update(nce=2.0, mse=1.0)
    ledger.write(run_dir / "ledger.json")
    return run_dir


@pytest.fixture
def pretraining(tmp_path):
    # the coarse phase's masked accuracy (over 16 tokens) is far above the full-resolution one (over 64)
    base = _pretext(write_run(tmp_path, "pt_base", [("none", 1)],
                              [(0, 100.0 * k, 10.0 * k, a) for k, a in enumerate([0.03, 0.05, 0.066, 0.0697], 1)],
                              epochs=False))
    c2f = _pretext(write_run(tmp_path, "pt_c2f", [("fshift", 4), ("none", 1)],
                             [(0, 10.0, 2.0, 0.35), (0, 20.0, 4.0, 0.41), (1, 120.0, 14.0, 0.05),
                              (1, 220.0, 24.0, 0.0672)], epochs=False))
    return base, c2f


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.legends[0].get_texts()]


def _stars(ax) -> list:
    return [c for c in ax.collections if len(c.get_sizes()) and c.get_sizes()[0] == 220]


def test_plot_puts_the_final_phases_on_one_scale_and_names_the_metric(pretraining):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from common.reports.figure import figure

    base, c2f = load_run(pretraining[0], "Baseline"), load_run(pretraining[1])
    rows = compare(base, [c2f], "acc")
    fig = figure([base, c2f], rows, "acc")
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert low <= 3.0 and 6.97 <= high < 10  # the final phases and the baseline, not the coarse 35-41 %
    assert ax.get_ylabel() == "validation masked-patch accuracy (%)"
    assert "pretraining" in ax.get_title() and "pt_base" in ax.get_title() and "pt_c2f" in ax.get_title()
    legend = _legend(fig)
    assert legend[:3] == ["Baseline", "Fshift 4→1", "baseline best (6.97)"]
    assert "coarse value off this scale" in legend  # the coarse points are drawn apart, on the edge
    assert "first to surpass the baseline" not in legend and not _stars(ax)  # not surpassed: nothing listed
    edge = [c for c in ax.collections if c.get_offsets().shape[0] and (c.get_offsets()[:, 1] == high).all()]
    assert edge and edge[0].get_offsets().shape[0] == 2  # both coarse evaluations, on the top edge
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    assert not fig.legends[0].get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def test_plot_draws_the_stop_the_legend_lists(runs):
    from common.reports.figure import figure

    base, c2f = load_run(runs["base"], "Baseline"), load_run(runs["c2f"])
    fig = figure([base, c2f], compare(base, [c2f], "acc"), "acc")
    ax = fig.axes[0]
    assert "first to surpass the baseline" in _legend(fig)
    (star,) = _stars(ax)
    assert star.get_offsets().tolist() == [[75.0, pytest.approx(46.0)]]
    assert ax.get_ylabel() == "validation accuracy (%)"
    assert "phase 1 (coarse)" in _legend(fig)  # its 50 % points lie inside the range: drawn hollow
    low, high = ax.get_ylim()
    assert low < 31 and 50 < high < 55


def test_fine_tuning_plot_title_names_the_task(runs):
    from common.reports.tables import report_title

    (runs["base"] / "recipe.yaml").write_text("task: {name: vggsound}\nphases: []\n")
    title = report_title([load_run(runs["base"], "Baseline"), load_run(runs["c2f"])], "acc")
    assert title.startswith("vggsound fine-tuning: accuracy against training compute") and "base, c2f" in title


def test_report_shows_the_whole_run_saving_even_when_nothing_surpasses(pretraining, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--baseline", str(pretraining[0]), "--runs", str(pretraining[1]), "--out", str(out)]) == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| Fshift 4→1 | 6.72 (-0.25), not surpassed | - | - | 6.72 (-0.25) |" in report
    assert "| Fshift 4→1 | 220 | 45.00 | - | 6.72 (-0.25) |" in report  # 220 of the baseline's 400 FLOPs; a
    # hand-written ledger without device time
    assert "# Coarse-to-fine report (masked-patch accuracy)" in report


def test_the_whole_run_table_has_each_runs_device_hours(tmp_path):
    runs = []
    for name, ranks, seconds in (("base", 4, 900.0), ("c2f", 2, 900.0)):
        ledger = Ledger("acc")
        ledger.start_phase(0, name="p", compression="none", factor=1, flops_per_sample=10)
        ledger.add_training(0, steps=10, samples=100, seconds=seconds, ranks=ranks)
        ledger.add_eval_time(0, 180.0, ranks=ranks)
        ledger.add_eval(0, {"acc": 0.5 if name == "base" else 0.6}, epoch=1)
        ledger.end_phase(0, "length", "planned length")
        ledger.write(tmp_path / f"{name}.json")
        runs.append(load_run(tmp_path / f"{name}.json", name))
    rows = compare(runs[0], runs[1:], "acc")
    assert [r.device_hours for r in rows] == [pytest.approx(4 * 1080 / 3600), pytest.approx(2 * 1080 / 3600)]
    table = whole_run_table(rows, "acc")
    assert "| device-hours (whole run) |" in table and "| base | 1e+03 | - | 1.2 | 50.00 |" in table
    assert "| c2f | 1e+03 | 0.00 | 0.6 | 60.00 (+10.00) |" in table


# -------------------------------------------- a fixed stop: the paper's AudioSet rows (issue 10 item 8)
def _ledger_of(phases, flops, clips: int, values: list[list[float]]) -> Ledger:
    """A ledger as the trainer writes it: epoch-based phases, ``clips`` per epoch, one evaluation per epoch."""
    ledger = Ledger("mAP")
    for i, (phase, per_clip, vals) in enumerate(zip(phases, flops, values)):
        ledger.start_phase(i, name=phase.label(i), compression=phase.compression, factor=phase.factor,
                           flops_per_sample=per_clip)
        for epoch, value in enumerate(vals, 1):
            ledger.add_training(i, clips // 12, clips, per_clip * clips / 1e12)  # time follows FLOPs here
            ledger.set_epochs(i, epoch)
            ledger.add_eval(i, {"mAP": value}, epoch=epoch)
        ledger.end_phase(i, "length", "planned length")
    return ledger


@pytest.mark.slow
def test_the_paper_audioset_row_is_a_fixed_stop_with_flops_from_common_flops(tmp_path, capsys):
    from common.models.arch import architecture_for, geometries
    from common.phases.config import PhaseConfig
    from finetune.classifier import ClassifierObjective
    from finetune.recipe import load_recipe

    ROOT = Path(__file__).resolve().parents[2]
    c2f = load_recipe("audioset", ROOT / "recipes" / "ft_audioset_fshift4.yaml")
    base = load_recipe("audioset")
    assert [(p.compression, p.factor, p.epochs) for p in c2f.phases] == [("fshift", 4, 1), ("none", 1, 3)]
    assert [(p.compression, p.epochs) for p in base.phases] == [("none", 5)]
    geometry = c2f.model.encoder_config(c2f.num_mel_bins, c2f.task.target_frames)  # 8 x 64 patches, no overlap
    objective = ClassifierObjective([f"c{i}" for i in range(527)], "mAP", "bce", c2f.augment, c2f.head)

    def flops(recipe):
        return [objective.flops_per_sample(cfg) for cfg in geometries(architecture_for(geometry), recipe.phases)]

    clips = 1_953_082  # the number cancels out
    # the baseline's best is its last epoch; the coarse-to-fine run ends 0.48 mAP points below it (Table 2)
    _ledger_of(base.phases, flops(base), clips, [[0.40, 0.425, 0.436, 0.441, 0.443]]).write(tmp_path / "b.json")
    _ledger_of(c2f.phases, flops(c2f), clips, [[0.30], [0.427, 0.433, 0.4382]]).write(tmp_path / "c.json")
    argv = ["--baseline", str(tmp_path / "b.json"), "--runs", str(tmp_path / "c.json"), "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "| Fshift 4→1 | 43.82 (-0.48), not surpassed | - | - |" in capsys.readouterr().out  # the strict rule
    assert main([*argv, "--stop-epoch", "3"]) == 0
    assert "| Fshift 4→1 | 43.82 (-0.48), epoch 3 | 35.32 | 35.32 |" in capsys.readouterr().out  # paper: 35.32
    assert "stops at epoch 3 of its final phase" in (tmp_path / "report.md").read_text(encoding="utf-8")
    # 2 -> 1: the paper's 30.47 % within its rounding of the FLOPs
    two = replace(c2f, phases=[PhaseConfig("fshift", 2, epochs=1), c2f.phases[1]])
    _ledger_of(two.phases, flops(two), clips, [[0.30], [0.43, 0.438, 0.441]]).write(tmp_path / "c2.json")
    rows = compare(load_run(tmp_path / "b.json"), [load_run(tmp_path / "c2.json")], "mAP", stop_epoch=3)
    assert rows[1].flops_save == pytest.approx(30.47, abs=0.02)
    with pytest.raises(ReportError, match=r"c.json: no evaluation at epoch 4 of the final phase \(its epochs: 1, 2, 3"):
        compare(load_run(tmp_path / "b.json"), [load_run(tmp_path / "c.json")], "mAP", stop_epoch=4)


# ------------------------------------- like with like: a weight average is compared only with a weight average
def _with_average(run_dir: Path, value: float, **fields) -> Path:
    """Append the evaluation of a weight average at the run's end, as the trainer does; ``fields``: ledger fields."""
    ledger = Ledger.read(run_dir)
    last = ledger.evals[-1]
    ledger.evals.append({**{k: last[k] for k in ("phase", "train_flops", "wall_seconds", "samples")},
                         "weight_averaged": [1, 2], "metrics": {"acc": value}})
    for key, data in fields.items():
        setattr(ledger, key, data)
    ledger.write(run_dir / "ledger.json")
    return run_dir


def test_the_reference_is_the_best_epoch_and_averages_are_compared_apart(runs, tmp_path):
    _with_average(runs["base"], 0.50)  # above every epoch of the baseline (0.45)
    _with_average(runs["c2f"], 0.52)
    _with_average(runs["never"], 0.47)  # above the baseline's best epoch, but an average is not an epoch
    base, c2f, never = load_run(runs["base"], "Baseline"), load_run(runs["c2f"]), load_run(runs["never"])
    rows = compare(base, [c2f, never], "acc")
    assert rows[0].value == pytest.approx(0.45) and rows[0].averaged == pytest.approx(0.50)
    assert rows[1].stop.flops == 75.0 and rows[1].best == pytest.approx(0.49)  # as without the averages
    assert rows[1].averaged == pytest.approx(0.52) and rows[1].averaged_delta == pytest.approx(0.02)
    assert rows[2].stop is None and rows[2].best == pytest.approx(0.44)  # its average does not stop it
    table = whole_run_table(rows, "acc")
    assert table.splitlines()[0].endswith("| best acc, final phase | weight-averaged acc |")
    assert "| Baseline | 200 | - | - | 45.00 | 50.00 |" in table
    assert "| Fshift 4→1 | 135 | 32.50 | - | 49.00 (+4.00) | 52.00 (+2.00) |" in table
    plain = write_run(tmp_path, "plain", [("fshift", 4), ("none", 1)], C2F_EVALS)  # no average: no difference
    assert compare(load_run(write_run(tmp_path, "b", [("none", 1)], BASE_EVALS)), [load_run(plain)],
                   "acc")[1].averaged_delta is None
    from common.reports.figure import figure

    legend = _legend(figure([base, c2f], rows[:2], "acc"))
    assert "weight average (end of run)" in legend and "baseline best (45.00)" in legend


def test_runs_validated_otherwise_are_refused_or_accepted_and_listed(runs, tmp_path, capsys):
    settings = {"eval_batches": None, "eval_batch_size": 8, "ranks": 1, "eval_crop": "start", "pad": "zeros"}
    valid = {"train": {}, "valid": {"v.jsonl.gz": {"sha256": "ab" * 32, "bytes": 1}}}
    other = {"train": {}, "valid": {"w.jsonl.gz": {"sha256": "cd" * 32, "bytes": 1}}}
    _with_average(runs["base"], 0.5, data=valid, evaluation=settings)
    _with_average(runs["c2f"], 0.5, data=other, evaluation={**settings, "eval_batches": 4})
    argv = ["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "do not compare with the baseline's (Fshift 4→1: other validation manifests" in err
    assert "train.eval_batches None (baseline) vs 4 (this run)" in err and "--accept-baseline-differences" in err
    assert main([*argv, "--accept-baseline-differences"]) == 0
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "Accepted differences from the baseline (--accept-baseline-differences), Fshift 4→1: other validation" \
           in report and "weight-averaged acc" in report


def test_a_run_that_has_not_finished_is_refused(tmp_path):
    """A stopped or running run's ledger ends with the phase it reached: its scores may be a coarse phase's (on
    another scale for SSAST), not its final phase's, so it is not compared."""
    base = write_run(tmp_path, "base", [("none", 1)], BASE_EVALS)
    running = write_run(tmp_path, "running", [("fshift", 4)], [(0, 5.0, 3.0, 0.9)])
    (running / "model.safetensors").unlink()
    with pytest.raises(ReportError, match=r"running: the run has not finished \(its last phase in the ledger "
                                          r"\(phase1\) has not ended\)"):
        compare(load_run(base), [load_run(running)], "acc")
    ledger = Ledger.read(running)  # stopped at the coarse phase's end: ended, but the run has no final export
    ledger.end_phase(0, "length", "planned length")
    ledger.write(running / "ledger.json")
    with pytest.raises(ReportError, match="it has no model.safetensors"):
        compare(load_run(base), [load_run(running)], "acc")
    (base / "model.safetensors").unlink()
    with pytest.raises(ReportError, match="base: the run has not finished"):  # the baseline too
        compare(load_run(base), [], "acc")


def test_the_command_says_a_run_is_unfinished_or_the_baseline_before_anything_else(tmp_path, capsys):
    """An unfinished run is refused as such first (the differences from the baseline an unfinished run seems to
    have, and the flag that accepts them, helped nothing); a baseline listed among --runs is refused."""
    base = write_run(tmp_path, "base", [("none", 1)], BASE_EVALS)
    running = write_run(tmp_path, "running", [("fshift", 4)], [(0, 5.0, 3.0, 0.9)])
    (running / "model.safetensors").unlink()
    settings = {"eval_batches": None, "eval_batch_size": 8, "ranks": 1, "eval_crop": "start", "pad": "zeros"}
    for run, evaluation in ((base, settings), (running, {**settings, "eval_batches": 4})):
        ledger = Ledger.read(run)  # validated otherwise so far: not what the report should lead with
        ledger.evaluation = evaluation
        ledger.write(run / "ledger.json")
    assert main(["--baseline", str(base), "--runs", str(running), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "running: the run has not finished" in err and "--accept-baseline-differences" not in err
    assert main(["--baseline", str(base), "--runs", str(base), "--out", str(tmp_path / "out")]) == 2
    assert f"--runs {base} is the baseline itself" in capsys.readouterr().err


def test_runs_with_the_same_phases_are_told_apart_by_their_directories(tmp_path, runs, capsys):
    """Without --names: two runs with the same phases whose last folders are both `run` (issue: the first hour)."""
    from common.reports.runs import distinct_names
    from common.reports.tables import report_title

    (tmp_path / "lr1").mkdir()
    (tmp_path / "lr2").mkdir()
    one = write_run(tmp_path / "lr1", "run", [("fshift", 4), ("none", 1)], C2F_EVALS)
    two = write_run(tmp_path / "lr2", "run", [("fshift", 4), ("none", 1)], NEVER_EVALS)
    out = tmp_path / "out"
    assert main(["--baseline", str(runs["base"]), "--runs", str(one), str(two / "ledger.json"),
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| Fshift 4→1 (lr1/run) | 46.00 (+1.00) |" in table and "| Fshift 4→1 (lr2/run) | 44.00 (-1.00)" in table
    assert "| Avg Pool" not in table and "| Fshift 4→1 |" not in table
    assert distinct_names([str(one), str(two), str(runs["c2f"])]) == ["lr1/run", "lr2/run", "c2f"]
    title = report_title([load_run(runs["base"], "Baseline"), load_run(one), load_run(two)], "acc")
    assert title.endswith("base, lr1/run, lr2/run")
    assert main(["--baseline", str(runs["base"]), "--runs", str(one), str(runs["never"]), "--out", str(out)]) == 0
    table = capsys.readouterr().out  # labels that differ stay as they are
    assert "| Fshift 4→1 | 46.00" in table and "| Avg Pool 2→1 | 44.00" in table


def _cv_run(root: Path, name: str, phases, fold_evals, train_flops: float = 0.0) -> Path:
    """A cross-validation root ``root/name`` with ``fold1`` ... one run per entry of ``fold_evals``; each fold's
    phases count ``train_flops`` in all."""
    cv = root / name
    cv.mkdir()
    for k, evals in enumerate(fold_evals, 1):
        fold = write_run(cv, f"fold{k}", phases, evals)
        ledger = Ledger.read(fold)
        ledger.phases[-1].train_flops = train_flops
        ledger.phases[-1].device_seconds = 3600.0
        ledger.write(fold / "ledger.json")
    (cv / "cv_summary.json").write_text("{}")  # written after the last fold
    return cv


def _shift(evals, by: float):
    return [(phase, flops, seconds, value + by) for phase, flops, seconds, value in evals]


def test_a_cross_validation_run_is_the_mean_of_its_folds(tmp_path, capsys):
    """ESC-50's protocol: a k-fold root reports as one run whose curve is the folds' mean (the paper's rule on the
    mean: the baseline's best mean epoch, the first final-phase epoch whose mean surpasses it); whole-run FLOPs
    and device-hours are the sums over the folds."""
    # Baseline folds straddle the single-run curve: their mean is BASE_ACC (best 0.45 at epoch 15, 150 FLOPs).
    base = _cv_run(tmp_path, "base", [("none", 1)], [_shift(BASE_EVALS, d) for d in (-0.02, 0.0, 0.02)], 200.0)
    # The folds' mean is the single run's curve (0.40, 0.44, then 0.43 for its tie, 0.46, ...): it first surpasses
    # 0.45 at the fourth final epoch (75 FLOPs, 38 s); fold 2 alone would at the first (0.40 + 0.10).
    curve = [(phase, flops, seconds, 0.43 if value == 0.45 else value) for phase, flops, seconds, value in C2F_EVALS]
    folds = [_shift(curve, d) for d in (-0.05, 0.10, -0.05)]
    c2f = _cv_run(tmp_path, "c2f", [("fshift", 4), ("none", 1)], folds, 100.0)
    baseline, run = load_run(base, "Baseline"), load_run(c2f)
    assert (baseline.label, run.label) == ("Baseline (3-fold mean)", "Fshift 4→1 (3-fold mean)")
    rows = compare(baseline, [run], resolve_metric([baseline, run]))
    assert rows[0].value == pytest.approx(0.45)
    row = rows[1]
    assert (row.stop.phase, row.stop.epoch, row.stop.flops, row.stop.seconds) == (1, 9, 75.0, 38.0)
    assert row.value == pytest.approx(0.46) and row.flops_save == pytest.approx(50.0)
    assert row.time_save == pytest.approx(100 * (1 - 38 / 75))
    assert (rows[0].total_flops, row.total_flops) == (600.0, 300.0) and row.total_save == pytest.approx(50.0)
    assert row.device_hours == pytest.approx(3.0)
    assert main(["--baseline", str(base), "--runs", str(c2f), "--out", str(tmp_path / "out")]) == 0
    assert "| Fshift 4→1 (3-fold mean) | 46.00 (+1.00) | 50.00 |" in capsys.readouterr().out
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "each evaluation is the mean over its 3 folds" in report and "Left out" not in report


def test_folds_that_differ_are_named(tmp_path, capsys):
    base = _cv_run(tmp_path, "base", [("none", 1)], [BASE_EVALS, BASE_EVALS])
    # a fold that stopped early: its missing epochs are left out of the mean, and listed
    short = _cv_run(tmp_path, "short", [("fshift", 4), ("none", 1)], [C2F_EVALS, C2F_EVALS[:-2]])
    out = tmp_path / "out"
    assert main(["--baseline", str(base), "--runs", str(short), "--out", str(out)]) == 0
    assert "Left out (not scored by every fold): phase 2 epoch 12 (only fold1); phase 2 epoch 13 (only fold1)." \
        in (out / "report.md").read_text(encoding="utf-8")
    # folds of other phases are not one run
    mixed = _cv_run(tmp_path, "mixed", [("fshift", 4), ("none", 1)], [C2F_EVALS])
    write_run(mixed, "fold2", [("avgpool", 4), ("none", 1)], C2F_EVALS)
    with pytest.raises(ReportError, match=r"mixed: .*fold2's phases .* are not .*fold1's .*not one cross-validation"):
        load_run(mixed)
    # a mean of folds against a single run, or another number of folds, is refused (and listed if accepted)
    single = write_run(tmp_path, "single", [("fshift", 4), ("none", 1)], C2F_EVALS)
    assert main(["--baseline", str(base), "--runs", str(single), "--out", str(out)]) == 2
    assert "a mean of 2 folds (baseline) vs a single run (this run)" in capsys.readouterr().err
    three = _cv_run(tmp_path, "three", [("fshift", 4), ("none", 1)], [C2F_EVALS] * 3)
    assert main(["--baseline", str(base), "--runs", str(three), "--out", str(out)]) == 2
    assert "a mean of 2 folds (baseline) vs a mean of 3 folds (this run)" in capsys.readouterr().err
    # validation settings are compared fold by fold
    for fold, sha in (("fold1", "ab"), ("fold2", "cd")):
        for root, other in ((base, sha), (short, "ef" if fold == "fold2" else sha)):
            ledger = Ledger.read(root / fold)
            ledger.data = {"train": {}, "valid": {f"{fold}.jsonl.gz": {"sha256": other * 32, "bytes": 1}}}
            ledger.write(root / fold / "ledger.json")
    assert main(["--baseline", str(base), "--runs", str(short), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fold2: other validation manifests" in err and "fold1:" not in err
    # a fold that has not finished makes the run unfinished, named; so does a run whose later folds have not started
    (base / "cv_summary.json").unlink()
    with pytest.raises(ReportError, match=r"base: the run has not finished \(.*base has no cv_summary.json"):
        compare(load_run(base), [load_run(short)], "acc")
    (base / "cv_summary.json").write_text("{}")
    (short / "fold2" / "model.safetensors").unlink()
    with pytest.raises(ReportError, match=r"short: the run has not finished \(.*short/fold2: its last phase .* has not ended\)"):
        compare(load_run(base), [load_run(short)], "acc")


def test_the_module_command_exits_with_the_reports_status(tmp_path):
    """``python -m common.reports`` ends with the command's exit status (2 on bad input), as ``c2f-report``."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "common.reports", "--baseline", str(tmp_path / "none"), "--runs",
                           str(tmp_path / "none")], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == f"error: no ledger at {tmp_path / 'none'}"


def test_time_is_not_compared_across_devices_and_a_bare_baseline_plots(tmp_path, runs, capsys):
    """FLOPs savings hold anywhere; a wall-time saving only on the baseline's devices and number of ranks."""
    from common.reports.runs import other_hardware

    for name, device, ranks in (("base", "cpu", 1), ("c2f", "NVIDIA H100 80GB HBM3", 8)):
        ledger = Ledger.read(runs[name])
        for phase in ledger.phases:
            phase.device, phase.world_size = device, ranks
        ledger.write(runs[name] / "ledger.json")
    base, c2f, never = load_run(runs["base"], "Baseline"), load_run(runs["c2f"]), load_run(runs["never"])
    assert other_hardware(base, c2f) == "8 x NVIDIA H100 80GB HBM3 (baseline: 1 x cpu)"
    assert other_hardware(base, never) is None  # its ledger does not say: compared as before
    row = compare(base, [c2f], "acc")[1]
    assert row.flops_save == pytest.approx(50.0) and row.time_save is None and row.hardware
    out = tmp_path / "out"
    assert main(["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), "--out", str(out)]) == 0
    assert "| Fshift 4→1 | 46.00 (+1.00) | 50.00 | - (other devices) |" in capsys.readouterr().out
    assert "Fshift 4→1 trained on 8 x NVIDIA H100 80GB HBM3 (baseline: 1 x cpu): its time saving is not computed" \
        in (out / "report.md").read_text(encoding="utf-8")
    # a phase resumed on other hardware: the launches' devices are all recorded, and a mix compares with nothing
    for name in ("base", "c2f"):
        ledger = Ledger.read(runs[name])
        for phase in ledger.phases:
            phase.device, phase.world_size, phase.hardware = "cpu", 1, None
            phase.trained_on("cpu", 1)
        ledger.write(runs[name] / "ledger.json")
    assert other_hardware(load_run(runs["base"]), load_run(runs["c2f"])) is None
    ledger = Ledger.read(runs["c2f"])
    ledger.phases[-1].trained_on("NVIDIA H100 80GB HBM3", 8)  # resumed there
    ledger.write(runs["c2f"] / "ledger.json")
    assert Ledger.read(runs["c2f"]).phases[-1].device == "cpu"  # where it started
    assert other_hardware(load_run(runs["base"]), load_run(runs["c2f"])) == \
        "8 x NVIDIA H100 80GB HBM3 and 1 x cpu (baseline: 1 x cpu)"
    assert other_hardware(load_run(runs["c2f"]), load_run(runs["c2f"])) is not None  # a mix, even against itself
    # a hand-written baseline: evaluations without phases; the table and the plot are made
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "ledger.json").write_text(json.dumps({"score": "acc", "evals": Ledger.read(runs["base"]).evals}))
    (bare / "model.safetensors").write_bytes(b"")
    assert main(["--baseline", str(bare), "--runs", str(runs["never"]), "--out", str(out)]) == 0
    assert (out / "report.png").stat().st_size > 0


def test_a_run_trained_in_another_precision_than_its_baseline_is_said(tmp_path, runs, capsys):
    """train.precision: auto resolves to bf16 on Ampere and later and to fp32 before: the report says where a run
    trained in another precision than its baseline (its ledger records what each phase trained in)."""
    from common.reports.runs import other_precision

    for name, precision in (("base", "fp32"), ("c2f", "bf16"), ("never", "fp32")):
        ledger = Ledger.read(runs[name])
        for phase in ledger.phases:
            phase.trained_in(precision)
        ledger.write(runs[name] / "ledger.json")
    assert Ledger.read(runs["c2f"]).phases[0].precision == ["bf16"]
    base, c2f, never = load_run(runs["base"], "Baseline"), load_run(runs["c2f"]), load_run(runs["never"])
    assert other_precision(base, c2f) == "bf16 (baseline: fp32)" and other_precision(base, never) is None
    out = tmp_path / "out"
    assert main(["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), str(runs["never"]), "--out",
                 str(out)]) == 0
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "Fshift 4→1 trained in bf16 (baseline: fp32): the precision moves scores a little and times much" in text
    assert "Avg Pool 2→1 trained in" not in text
    ledger = Ledger.read(runs["never"])
    ledger.phases[-1].trained_in("bf16")  # resumed on another GPU
    ledger.write(runs["never"] / "ledger.json")
    assert other_precision(base, load_run(runs["never"])) == "bf16 and fp32 (baseline: fp32)"
    ledger = Ledger.read(runs["base"])  # a baseline trained before ledgers recorded it
    for phase in ledger.phases:
        phase.precision = None
    ledger.write(runs["base"] / "ledger.json")
    assert other_precision(load_run(runs["base"]), c2f) == "bf16 (baseline: not recorded)"
    with pytest.raises(Exception, match="precision"):
        Ledger.from_dict({"phases": [{"precision": "bf16"}]})


def test_a_pretraining_baseline_with_fine_tuning_runs_is_refused_as_such(pretraining, runs, tmp_path, capsys):
    base, _ = pretraining
    assert main(["--baseline", str(base), "--runs", str(runs["c2f"]), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {runs['c2f']} is a fine-tuning run and the baseline {base} a "
                                               f"pretraining run: compare runs of one kind")


@pytest.mark.parametrize("content, said", [
    ([1, 2], "the ledger is [1, 2], not a mapping"),
    ({"phases": [{"steps": "3"}], "evals": []}, "phases.0.steps is '3', not a number"),
    ({"phases": {"0": {}}}, "phases is {'0': {}}, not a list"),
])
def test_a_ledger_of_another_shape_is_one_line_naming_the_file(tmp_path, runs, capsys, content, said):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "ledger.json").write_text(json.dumps(content))
    with pytest.raises(ReportError, match="odd"):
        load_run(odd)
    assert main(["--baseline", str(runs["base"]), "--runs", str(odd), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {odd / 'ledger.json'} is not a ledger of this package ({said})\n"


def test_runs_trained_by_other_code_are_said_in_the_report(tmp_path, runs, capsys):
    """An upgrade can change the validation scores (SSAST's masks did): two identical models, one trained before,
    were reported a point apart without a word. The report says which code trained each run where they differ,
    a resume's change of code and a run that records none among runs that do included; one code says nothing."""
    def with_code(run_dir: Path, code, interventions=()) -> Path:
        data = json.loads((run_dir / "ledger.json").read_text())
        data.update({"code": code, "interventions": list(interventions)})
        (run_dir / "ledger.json").write_text(json.dumps(data))
        return run_dir

    a, b = {"version": "0.1.0", "commit": "a" * 40}, {"version": "0.1.0", "commit": "b" * 40, "source": "1" * 16}
    argv = ["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), "--out", str(tmp_path / "out")]

    def said() -> str:
        assert main(argv) == 0
        capsys.readouterr()
        text = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
        return text.split("Not every run was trained by the same code (", 1)[1] \
            if "Not every run" in text else ""

    assert said() == ""  # none records its code
    with_code(runs["base"], b)
    with_code(runs["c2f"], {**b, "commit": "b" * 40})
    assert said() == ""  # the same code
    with_code(runs["c2f"], b, [{"step": 2, "phase": 0, "changes": {"code": {"from": a, "to": b}}}])
    assert said().startswith("Baseline: version 0.1.0 commit bbbbbbbbbbbb source 1111111111111111; "
                             "Fshift 4→1: version 0.1.0 commit aaaaaaaaaaaa, then version 0.1.0 commit bbbbbbbbbbbb")
    with_code(runs["c2f"], b, [{"step": 2, "phase": 0, "changes": {"code": {"from": None, "to": b}}}])
    assert "Fshift 4→1: unknown (not recorded), then version 0.1.0" in said()


def test_a_report_cut_short_leaves_the_last_whole_report(tmp_path, runs, monkeypatch, capsys):
    """report.md and report.png were written in place: a report killed while it wrote the plot left a truncated PNG
    beside the new text. Both are written whole or not at all, the plot first."""
    from matplotlib.figure import Figure

    out = tmp_path / "out"
    argv = ["--baseline", str(runs["base"]), "--runs", str(runs["c2f"]), "--out", str(out)]
    assert main(argv) == 0
    before = {name: (out / name).read_bytes() for name in ("report.md", "report.png")}
    real = Figure.savefig

    def cut_short(self, fname, *args, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
        raise KeyboardInterrupt  # as a kill would stop it, mid-write

    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(KeyboardInterrupt):
        main([*argv[:3], str(runs["never"]), *argv[4:]])
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "report.png"]  # no temporary left
    monkeypatch.setattr(Figure, "savefig", real)
