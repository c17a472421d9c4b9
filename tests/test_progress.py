"""Progress on a terminal: the fine-tuning bar has a total and the time left, log lines never land on a bar, and
the long preparations (prepare, stats, the linear probe's feature extraction) show one. A fake terminal
(a text buffer that says it is a TTY) stands in for stderr."""

import logging
import re

import pytest

from tests.helpers import TINY, _bars, _segments, _synth_root, fake_terminal, sets

STAMP = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")


@pytest.mark.slow
def test_the_fine_tuning_bar_has_a_total_and_a_time_left_and_log_lines_stay_off_it(tmp_path, synth_corpus,
                                                                                    monkeypatch):
    from finetune.run import main as finetune

    terminal = fake_terminal(monkeypatch)
    data = _synth_root(tmp_path, synth_corpus)  # 24 training clips: 6 steps of 4 per epoch
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(tmp_path / "r"),
                     *sets(*TINY, "train.log_every=2", "phases=[{compression: none, epochs: 2}]")]) == 0
    out = terminal.getvalue()
    bars = _bars(out, "phase1 (full resolution):")
    assert bars and all("/12 [" in bar for bar in bars)  # 2 epochs x 6 steps
    assert any(re.search(r" \d+/12 \[\d\d:\d\d<\d\d:\d\d", bar) for bar in bars)  # elapsed < time left
    assert re.search(r"100%\|.*\| 12/12 \[", out)
    logs = [s for s in _segments(out) if " INFO " in s]
    assert any("step 2 (phase1 (full resolution))" in s for s in logs)
    assert all(STAMP.match(s) for s in logs), [s for s in logs if not STAMP.match(s)][:2]  # each on its own line


def test_log_lines_are_written_above_an_open_bar(monkeypatch):
    from common.system.logger import progress, setup_logging

    terminal = fake_terminal(monkeypatch)
    setup_logging(None)
    log = logging.getLogger("somewhere")
    bar = progress(10, 0, "counting", True, unit="clip")
    for i in range(10):
        bar.update(1)
        if i == 4:
            log.warning("half way")
    bar.close()
    segments = _segments(terminal.getvalue())
    (line,) = [s for s in segments if "half way" in s]
    assert STAMP.match(line) and line.endswith("WARNING somewhere: half way")
    assert segments[-1].startswith("counting: 100%") and "10/10" in segments[-1]


def test_libraries_root_notices_stay_off_the_console(monkeypatch):
    """Lhotse sends notices to the root logger at INFO ("Using audioread ...", "The user overrided tolerance ...")
    that a command's console printed between its own lines; the package's lines and every warning still show."""
    from common.system.logger import setup_logging

    terminal = fake_terminal(monkeypatch)
    setup_logging(None)
    root = logging.getLogger()
    for name, pathname, level, text in (("root", "/x/site-packages/lhotse/audio/backend.py", logging.INFO, "chatter"),
                                        ("root", "/x/site-packages/lhotse/audio/backend.py", logging.WARNING, "alarm"),
                                        ("common.data", "/x/common/data/loader.py", logging.INFO, "ours")):
        root.handle(logging.LogRecord(name, level, pathname, 1, text, None, None))
    out = terminal.getvalue()
    assert "chatter" not in out and "alarm" in out and "ours" in out


def test_a_handler_a_librarys_import_put_on_the_root_logger_does_not_print_every_line_twice(monkeypatch):
    """Lhotse warns at import on the root logger when it cannot make ~/.lhotse (a read-only or file HOME, a
    container's user); where nothing configured logging yet, that installs logging.basicConfig's handler, which
    printed every console line a second time (and the notices the console leaves out): the console replaces it."""
    import sys

    from common.system.logger import setup_logging

    root = logging.getLogger()
    terminal = fake_terminal(monkeypatch)
    implicit = logging.StreamHandler(sys.stderr)  # what logging.warning() adds where the root logger has none
    implicit.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    root.addHandler(implicit)
    mine = logging.StreamHandler(sys.stdout)  # a user's own handler stays
    root.addHandler(mine)
    setup_logging(None)
    assert implicit not in root.handlers and mine in root.handlers
    root.removeHandler(mine)
    own = logging.StreamHandler(sys.stderr)  # the user's logging.basicConfig(), called before importing the package
    own.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    root.addHandler(own)
    monkeypatch.setattr("common.system.logger.ROOT_HANDLERS_AT_IMPORT", (own,))
    setup_logging(None)
    assert own in root.handlers
    root.removeHandler(own)
    logging.getLogger("common.data").info("once")
    assert terminal.getvalue().count("once") == 1


def test_the_corpora_command_keeps_libraries_notices_off_the_console_too(tmp_path, monkeypatch, capsys):
    """``c2f-corpora`` sets up its own console: Lhotse's root-logger notices stay off it as off the others'."""
    from common.data.corpora.__main__ import main as corpora

    terminal = fake_terminal(monkeypatch)
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        def chatty(args):
            for level, text in ((logging.INFO, "chatter"), (logging.WARNING, "alarm")):
                root.handle(logging.LogRecord("root", level, "/x/site-packages/lhotse/audio/backend.py", 1, text,
                                              None, None))
            return 0

        monkeypatch.setattr("common.data.corpora.__main__._run", chatty)
        assert corpora(["list"]) == 0
        out = terminal.getvalue() + capsys.readouterr().err
        assert "chatter" not in out and "alarm" in out
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)


def test_prepare_and_stats_show_progress(tmp_path, monkeypatch):
    from common.data.corpora.__main__ import main as corpora
    from tests.layouts import write_clip

    terminal = fake_terminal(monkeypatch)
    for i in range(5):
        write_clip(tmp_path / "audio" / ("dog" if i % 2 else "cat") / f"{i}.wav", seconds=0.3, seed=i)
    assert corpora(["prepare", "custom", "--src", str(tmp_path / "audio"), "--out", str(tmp_path / "out")]) == 0
    assert any("5/5" in s for s in _bars(terminal.getvalue(), "custom: reading audio headers: 100%"))
    assert corpora(["stats", str(tmp_path / "out" / "custom_train.jsonl.gz"), "--target-frames", "64",
                    "--workers", "0"]) == 0
    assert any("5/5" in s for s in _bars(terminal.getvalue(), "statistics of custom_train.jsonl.gz: 100%"))


@pytest.mark.slow
def test_the_probe_feature_extraction_shows_progress(synth_corpus, monkeypatch):
    from common.audio.pipeline import AudioConfig
    from common.data.corpora.base import read_classes
    from common.models.arch import architecture_for
    from common.models.ast.encoder import ASTEncoder, EncoderConfig
    from finetune.linear_probe import extract_features

    terminal = fake_terminal(monkeypatch)
    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, num_mel_bins=128, input_tdim=128)
    arch = architecture_for(cfg, AudioConfig(num_mel_bins=128, target_frames=128))
    classes, _ = read_classes(synth_corpus / "synth_classes.json")
    x, _ = extract_features(ASTEncoder(cfg), arch, [str(synth_corpus / "synth_valid.jsonl.gz")], classes,
                            batch_size=5, num_workers=0)
    assert any(f"{len(x)}/{len(x)}" in s for s in _bars(terminal.getvalue(), "features of synth_valid.jsonl.gz: 100%"))


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
    from common.system.logger import progress

    bar = progress(3, 0, "counting", True)
    bar.update(3)
    bar.close()
    assert "counting" not in capsys.readouterr().err


def test_the_bar_total_in_memory_and_streamed(synth_corpus, tmp_path):
    """The bar's total: exact for a set in memory or indexed, from the manifest's lines for a streamed one; the
    batches an epoch really gives."""
    from common.data.bad_audio import BadAudioTracker
    from common.data.config import DataConfig, ManifestSpec
    from common.data.corpora.base import read_classes
    from common.data.loader import train_loader

    classes, _ = read_classes(synth_corpus / "synth_classes.json")
    train = [ManifestSpec(str(synth_corpus / "synth_train.jsonl.gz"))]  # 24 clips
    for shuffle_max, shuffle in ((500_000, "full"), (0, "full"), (0, "buffer")):  # in memory, indexed, streamed
        data = DataConfig(train=train, batch_size=5, num_workers=0, full_shuffle_max=shuffle_max, shuffle=shuffle,
                          index_dir=str(tmp_path))
        loader = train_loader(data, classes, 8000, 16000, 5, 0, 0, 1, BadAudioTracker())
        assert loader.cuts.is_lazy == (shuffle == "buffer")
        assert loader.estimated_batches_per_epoch() == 4 == len(list(loader.cut_batches(epochs=1)))


def test_the_evaluation_bar_has_a_total(synth_corpus):
    """``c2f-evaluate`` / ``predict --json``'s scoring bar: its total from the manifests' lines (it had none), the
    batches a pass really gives, on one rank and dealt over three."""
    from common.data.loader import eval_loader

    for world_size in (1, 3):
        loaders = [eval_loader([synth_corpus / "synth_valid.jsonl.gz"], None, 8000, 16000, 5, rank=rank,
                               world_size=world_size) for rank in range(world_size)]
        for loader in loaders:
            assert loader.estimated_batches_per_epoch() == len(list(loader.cut_batches(epochs=1)))
        assert loaders[0].estimated_batches_per_epoch() == (3 if world_size == 1 else 1)


def test_a_notebook_gets_the_bar_a_pipe_does_not(monkeypatch):
    """A Jupyter kernel's stderr is no terminal: the bars were off there, with only a log line every log_every
    steps. A pipe or a file still gets none."""
    import io
    import sys
    import types

    from common.system.logger import progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert progress(10, 0, "counting", True).disable
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    bar = progress(10, 0, "counting", True)
    assert not bar.disable and progress(10, 0, "counting", False).disable  # rank 0 only
    bar.close()


def test_a_ctrl_c_while_a_log_line_is_written_is_not_swallowed(monkeypatch):
    """tqdm's write releases in its finally a lock a Ctrl-C kept it from taking: the RuntimeError replaced the
    KeyboardInterrupt, logging swallowed it ('--- Logging error ---') and the run trained on to exit 0."""
    import common.system.logger as logger

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("cannot release un-acquired lock")

    monkeypatch.setattr(logger.tqdm, "write", interrupted)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a line", None, None)
    with pytest.raises(KeyboardInterrupt):
        logger.BarSafeHandler().emit(record)
