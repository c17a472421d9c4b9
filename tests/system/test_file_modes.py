"""Files others can read, and no leftovers: what the package writes gets the mode ``open()`` would give
(``0o666`` less the umask), and the temporary files of a write that was killed are removed at the next start."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.models.exports import save_weights
from common.system.atomic import ORPHAN, atomic_copy, atomic_write_text, file_mode
from tests.helpers import ROOT
from tests.helpers import run as pretrain


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process's umask for one test."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_files_get_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w"):
        pass
    atomic_write_text(tmp_path / "ledger.json", "{}")
    atomic_copy(tmp_path / "ledger.json", tmp_path / "copy.json")
    save_weights(tmp_path / "model.safetensors", {"w": torch.zeros(2)}, {})  # safetensors itself creates 0600
    assert file_mode() == 0o666 & ~mask and os.umask(mask) == mask  # read without changing it
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(
        ["plain.txt", "ledger.json", "copy.json", "model.safetensors"], 0o666 & ~mask)


@pytest.mark.slow
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_run_and_its_hf_export_are_as_readable_as_the_umask_allows(tmp_path, synth_corpus, umask, mask):
    umask(mask)
    run_dir = tmp_path / "run"
    assert pretrain(run_dir, synth_corpus, steps=(2, 1)) == 0
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"model.safetensors", "ledger.json", "recipe.yaml", "LATEST", "trainer_state.json", "phase1.safetensors",
            "mp_rank_00_model_states.pt", "train.log"} <= {p.name for p in files}
    try:
        import transformers  # noqa: F401 - the hf extra
    except ImportError:
        transformers = None
    if transformers is not None:
        from common.models.hf_export import main as hf

        assert hf(["export", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
        files += list((tmp_path / "hf").iterdir())
    assert mode(run_dir / "model.safetensors") == 0o666 & ~mask
    if mask == 0o022:  # a colleague can read every file of the run and of the export
        assert all(mode(p) & 0o044 == 0o044 for p in files), [(str(p), oct(mode(p))) for p in files]
    else:  # and nobody else can under 077
        assert all(mode(p) & 0o077 == 0 for p in files), [(str(p), oct(mode(p))) for p in files]


def _killed_while_writing(target: Path) -> None:
    """A process killed inside ``atomic_path`` (after writing half of ``target``, before the rename)."""
    code = ("import os\nfrom common.system.atomic import atomic_path\n"
            f"with atomic_path({str(target)!r}) as tmp:\n    tmp.write_text('half')\n    os._exit(9)\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 9


@pytest.mark.slow
def test_temporary_files_of_a_killed_write_are_removed_at_the_next_start(tmp_path, synth_corpus):
    run_dir = tmp_path / "run"
    assert pretrain(run_dir, synth_corpus, stop=2) == 0
    latest = (run_dir / "checkpoints" / "LATEST").read_text()
    ledger = (run_dir / "ledger.json").read_text()
    for target in (run_dir / "model.safetensors", run_dir / "ledger.json", run_dir / "checkpoints" / "LATEST",
                   run_dir / "export" / "best.safetensors"):
        _killed_while_writing(target)
    orphans = sorted(p for p in run_dir.rglob("*.tmp"))
    assert len(orphans) == 4 and all(ORPHAN.fullmatch(p.name) for p in orphans)
    assert all(".c2f-" in p.name for p in orphans)  # this package's marker
    # the killed writes lost nothing: the targets are as they were
    assert (run_dir / "checkpoints" / "LATEST").read_text() == latest
    assert (run_dir / "ledger.json").read_text() == ledger
    assert not (run_dir / "model.safetensors").exists()
    # files that are not ours stay: other programs' (tempfile's .NAME.XXXXXXXX.tmp, as earlier versions named
    # theirs), and ours outside the folders a run writes into
    decoys = [run_dir / ".notes.tmp", run_dir / "keep.abcd1234.tmp", run_dir / ".ledger.json.abc.tmp",
              run_dir / ".recipe.yaml.k2_hq9x1.tmp", run_dir / ".ledger.json.abcd1234.tmp",
              run_dir / "discarded-20260101-000000" / ".ledger.json.c2f-abcd1234.tmp",
              run_dir / "tb" / ".events.c2f-abcd1234.tmp"]
    for decoy in decoys:
        decoy.parent.mkdir(exist_ok=True)
        decoy.write_text("mine")
    assert pretrain(run_dir, synth_corpus, stop=1) == 0  # resumes from the intact checkpoint
    assert not any(p.exists() for p in orphans)
    assert all(p.read_text() == "mine" for p in decoys)
    assert "removed 4 temporary file(s) that an interrupted write left: " in (run_dir / "train.log").read_text()
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "phase01-step000000003"  # resumed at step 2


def test_an_atomic_write_reaches_the_disk_before_its_name_does(tmp_path, monkeypatch):
    """The new file is flushed before the rename and the folder after it: a crash (power loss) leaves the old
    file or the whole new one under the name, never an empty one (an export a finished run is judged by)."""
    from common.system import atomic

    events = []
    fsync, replace, fstat = os.fsync, os.replace, os.fstat

    def record_fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(fstat(fd).st_mode) else fstat(fd).st_size))
        return fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", Path(dst).name))
        return replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", record_fsync)
    monkeypatch.setattr(atomic.os, "replace", record_replace)
    atomic.atomic_write_text(tmp_path / "a.txt", "hello")
    with atomic.atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"x" * 1000)
    assert events == [("fsync", 5), ("replace", "a.txt"), ("fsync", "dir"),
                      ("fsync", 1000), ("replace", "b.bin"), ("fsync", "dir")]


def test_the_clean_up_takes_only_this_package_s_temporaries_and_only_where_it_writes(tmp_path):
    """``remove_orphans`` deleted every ``.NAME.XXXXXXXX.tmp`` under a folder, recursively: that is also the name of
    another program's atomic write (``tempfile``'s), and ``data.index_dir: ~`` or ``--run-dir`` on a folder of the
    user's walked all of it. Now: names with the ``c2f-`` marker this package's writes make, in the folder and the
    sub-folders named (``within``), not through a link; the age rule where others may be writing."""
    import tempfile
    import time

    from common.system.atomic import remove_orphans, temporary_file

    ours = temporary_file(tmp_path / "ledger.json")
    assert ORPHAN.fullmatch(ours.name) and ours.name.startswith(".ledger.json.c2f-")
    with tempfile.NamedTemporaryFile(dir=tmp_path, prefix=".draft.docx.", suffix=".tmp", delete=False) as other:
        pass
    (tmp_path / "project" / "sub").mkdir(parents=True)
    (tmp_path / "checkpoints" / "phase01").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    deep = [tmp_path / "project" / "sub" / ".report.c2f-ab12cd34.tmp", tmp_path / "elsewhere" / ".x.c2f-00000000.tmp"]
    within = [tmp_path / "checkpoints" / ".LATEST.c2f-0a1b2c3d.tmp",
              tmp_path / "checkpoints" / "phase01" / ".trainer_state.json.c2f-1a2b3c4d.tmp"]
    for path in (*deep, *within):
        path.write_text("x")
    assert remove_orphans(tmp_path, ("checkpoints", "checkpoints/*", "linked")) == sorted([ours, *within])
    assert Path(other.name).exists() and all(p.exists() for p in deep)
    # the age rule: a recent one may be another job's, still being written
    fresh, stale = tmp_path / ".a.c2f-11111111.tmp", tmp_path / ".b.c2f-22222222.tmp"
    for path in (fresh, stale):
        path.write_text("x")
    os.utime(stale, (time.time() - 7200,) * 2)
    assert remove_orphans(tmp_path, older_than=3600) == [stale] and fresh.exists()


def test_temporaries_named_as_earlier_versions_named_them_are_said_and_left(tmp_path, caplog):
    """Earlier versions named their temporaries as tempfile does (``.NAME.XXXXXXXX.tmp``; the clip cache 16 hex
    digits): the clean-up no longer takes them (another program's are named so too), and some are large (a probe's
    features): it says once how many there are, their size and one of them, and leaves them."""
    import logging

    from common.system.atomic import remove_orphans

    old = [tmp_path / "export" / ".best.safetensors.k3j9x0qz.tmp", tmp_path / ".x.npy.0123456789abcdef.tmp"]
    (tmp_path / "export").mkdir()
    for path in old:
        path.write_bytes(b"\0" * 1_500_000)
    (tmp_path / "notes.txt").write_text("x")
    with caplog.at_level(logging.INFO, logger="common.system.atomic"):
        assert remove_orphans(tmp_path, ("export",)) == []
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(f"2 file(s) under {tmp_path} are named as this package's temporary "
                                                 f"files were before it marked them (3.0 MB in all, e.g. "), said
    assert all(path.exists() for path in old)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="common.system.atomic"):
        remove_orphans(tmp_path / "export" / "none")  # nothing there: nothing said
    assert not caplog.records


def test_a_run_cleans_up_in_the_folders_it_writes_into_only(tmp_path):
    """``--run-dir`` may name a folder of the user's (notes, a sub-folder of their own): a run's clean-up looks in
    the run directory and the folders a run writes into (checkpoints, exports, the weight average, folds), not in
    ``tb/``, a discarded attempt or the user's sub-folders."""
    from common.cli import RUN_FOLDERS
    from common.system.atomic import remove_orphans

    ours = [tmp_path / ".ledger.json.c2f-00000001.tmp", tmp_path / "checkpoints" / ".LATEST.c2f-00000002.tmp",
            tmp_path / "checkpoints" / "phase01-step000000002" / ".trainer_state.json.c2f-00000003.tmp",
            tmp_path / "export" / ".best.safetensors.c2f-00000004.tmp",
            tmp_path / "average" / ".epoch001.safetensors.c2f-00000005.tmp",
            tmp_path / "fold2" / ".ledger.json.c2f-00000006.tmp",
            tmp_path / "fold2" / "checkpoints" / "phase01-step000000002" / ".x.c2f-00000007.tmp"]
    kept = [tmp_path / "sub" / ".a.c2f-abcdef12.tmp", tmp_path / "tb" / ".b.c2f-abcdef12.tmp",
            tmp_path / "discarded-20260101-000000" / ".c.c2f-abcdef12.tmp", tmp_path / ".d.abcdefgh.tmp"]
    for path in (*ours, *kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert remove_orphans(tmp_path, RUN_FOLDERS) == sorted(ours)
    assert all(p.exists() for p in kept)
