"""What ``prepare`` publishes is written atomically under temporary names of its own, and one prepare at a time
holds an ``--out`` folder: two prepares into one folder never publish a mix of each other's files."""

import gzip
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from lhotse import CutSet

import common.data.corpora.base as base
from common.data.corpora import get_corpus
from common.data.corpora.__main__ import main
from common.data.corpora.base import ClipEntry, prepare_lock, write_corpus
from tests.layouts import write_clip


def _entries(folder, count):
    for i in range(count):
        write_clip(folder / f"c{i}.wav", seconds=0.2, seed=i)
    return [ClipEntry(f"c{i}", folder / f"c{i}.wav", "train", ("a",)) for i in range(count)]


def test_a_prepare_that_starts_while_another_writes_the_same_manifests_leaves_whole_files(tmp_path, monkeypatch):
    """A second prepare into the same folder runs from start to end while the first is half-way: each writes its
    own temporary files (a fixed temporary name had the first die on a rename of a file the second had taken, or
    publish a corrupt manifest), and what stays is the last one's manifest and report, whole and in agreement."""
    out = tmp_path / "out"
    first, second = _entries(tmp_path / "one", 6), _entries(tmp_path / "two", 4)
    read, calls = base._read_cut, []

    def interleaved(entry, corpus, *listed):
        calls.append(entry.cut_id)
        if len(calls) == 3:  # the first prepare is half-way through its clips
            write_corpus("mine", second, out, classes=["a"], num_jobs=1)
        return read(entry, corpus, *listed)

    monkeypatch.setattr(base, "_read_cut", interleaved)
    report = write_corpus("mine", first, out, classes=["a"], num_jobs=1)
    assert report.clips["train"] == 6
    with gzip.open(out / "mine_train.jsonl.gz", "rt") as handle:  # whole: every line, and the gzip trailer
        assert len(handle.read().splitlines()) == 6
    assert sorted(c.id for c in CutSet.from_file(out / "mine_train.jsonl.gz")) == [f"c{i}" for i in range(6)]
    assert json.loads((out / "mine_prepare.json").read_text())["clips"] == {"train": 6}
    assert json.loads((out / "mine_classes.json").read_text())["classes"] == ["a"]
    assert sorted(p.name for p in out.iterdir()) == ["mine_classes.json", "mine_prepare.json", "mine_train.jsonl.gz"]


def test_a_failed_prepare_publishes_nothing_and_leaves_no_temporary(tmp_path):
    entries = _entries(tmp_path / "src", 3) + [ClipEntry("bad", tmp_path / "src" / "c0.wav", "valid", ("zzz",))]
    try:
        write_corpus("mine", entries, tmp_path / "out", classes=["a"], num_jobs=1, shuffle_seed=None)
    except ValueError as err:
        assert "not in the class list" in str(err)
    else:
        raise AssertionError("an unknown label was not refused")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_later_prepare_removes_the_temporaries_a_killed_one_left(tmp_path):
    out = tmp_path / "out"
    (out / "synth_audio" / "train").mkdir(parents=True)
    stale = [out / ".synth_train.jsonl.gz.c2f-0a1b2c3d.tmp", out / "synth_audio" / "train" / ".x.flac.c2f-1a2b3c4d.tmp"]
    fresh = out / ".synth_valid.jsonl.gz.c2f-4e5f6a7b.tmp"  # another writer's, still being written
    for path in (*stale, fresh):
        path.write_bytes(b"partial")
    for path in stale:
        os.utime(path, (time.time() - 2 * base.STALE_SECONDS,) * 2)
    get_corpus("synth").prepare(None, out, size="test")
    assert not any(p.exists() for p in stale) and fresh.exists()
    assert len(list((out / "synth_audio").rglob("*.flac"))) == sum(1 for _ in CutSet.from_file(
        out / "synth_train.jsonl.gz")) + sum(1 for s in ("pool", "valid", "test")
                                             for _ in CutSet.from_file(out / f"synth_{s}.jsonl.gz"))


def test_a_prepare_rerun_under_its_lock_removes_a_killed_ones_temporaries_at_once(tmp_path, monkeypatch, caplog):
    """c2f-corpora prepare holds OUT/prepare.lock, so no other prepare writes into OUT meanwhile: a temporary found
    there is a killed prepare's even when it is seconds old (the usual rerun after a kill kept them for an hour,
    up to a manifest's size each); without the lock (a library call), only those an hour old."""
    out = tmp_path / "out"
    (out / "synth_audio" / "train").mkdir(parents=True)
    left = [out / ".synth_train.jsonl.gz.c2f-0a1b2c3d.tmp", out / "synth_audio" / "train" / ".x.flac.c2f-1a2b3c4d.tmp",
            out / ".synth_prepare.json.c2f-2a2b3c4d.tmp"]
    stats = out / ".synth_valid.stats.json.c2f-3a2b3c4d.tmp"  # `c2f-corpora stats` writing beside the manifests
    earlier = [out / ".synth_test.jsonl.gz.ab12cd34.tmp", out / ".synth_valid.stats.json.ab12cd34.tmp"]  # unmarked
    for path in (*left, stats, *earlier):
        path.write_bytes(b"partial")
    with caplog.at_level(logging.INFO, logger="common.system.atomic"):
        assert main(["prepare", "synth", "--size", "test", "--out", str(out)]) == 0
    assert not any(p.exists() for p in left) and stats.exists() and all(p.exists() for p in earlier)
    said = [r.getMessage() for r in caplog.records if "named as this package's temporary files" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"1 file(s) under {out} ")  # its own file's only, left
    assert base.killed_writes_age(out) == base.STALE_SECONDS  # the lock released at the end
    with prepare_lock(out):
        assert base.killed_writes_age(out) is None and base.killed_writes_age(tmp_path) == base.STALE_SECONDS
    import common.system.lock as lock

    def no_locks(fd):  # a file system without locks: warned, and nothing keeps another prepare out
        raise OSError(37, "No locks available")

    monkeypatch.setattr(lock, "_try_lock", no_locks)
    with prepare_lock(out):
        assert base.killed_writes_age(out) == base.STALE_SECONDS


def test_a_second_prepare_into_the_same_folder_is_refused_naming_the_first(tmp_path, capsys):
    src = tmp_path / "src"
    for label in ("a", "b"):
        for i in range(2):
            write_clip(src / label / f"{label}{i}.wav", seconds=0.2, seed=i)
    out = tmp_path / "out"
    command = ["prepare", "custom", "--src", str(src), "--out", str(out), "--name", "mine", "--jobs", "1"]
    with prepare_lock(out):  # what a prepare that is running holds
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out} is in use by another prepare: pid {os.getpid()} "
                                                   f"on {socket.gethostname()}, started ")
        assert err[0].endswith("; wait for it to end or use another --out")
        assert sorted(p.name for p in out.iterdir()) == ["prepare.lock"]  # nothing written
    assert main(command) == 0  # released at its end
    assert (out / "mine_train.jsonl.gz").is_file() and (out / "mine_prepare.json").is_file()


def test_a_shar_export_appears_whole_and_never_mixes_with_another(tmp_path, synth_corpus, monkeypatch, capsys):
    """The shards are written into a hidden folder inside ``--out`` and moved up when all are written; an ``--out``
    that holds files (an earlier export, whose shards beyond this one's count would be read as its own) is refused,
    and an export that finds ``--out`` filled meanwhile by another keeps the other's shards."""
    from common.data.manifests import open_cuts

    manifest = synth_corpus / "synth_valid.jsonl.gz"
    out = tmp_path / "shar"
    assert main(["shar", str(manifest), "--out", str(out), "--shard-size", "5", "--jobs", "1"]) == 0
    clips = sum(1 for _ in CutSet.from_file(manifest))
    assert sorted(p.name for p in out.iterdir()) == [f"{field}.{i:06d}.{ext}" for field, ext in (
        ("cuts", "jsonl.gz"), ("recording", "tar")) for i in range(-(-clips // 5))]
    assert sorted(c.id for c in open_cuts([out])) == sorted(c.id for c in CutSet.from_file(manifest))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shar"]  # no temporary folder left
    capsys.readouterr()
    assert main(["shar", str(manifest), "--out", str(out), "--shard-size", "3", "--jobs", "1"]) == 2
    assert f"error: --out {out} holds a Shar export already (3 cuts shard(s), an earlier run of this export?)" in \
        capsys.readouterr().err
    stray = tmp_path / "stray" / "shar"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("mine")
    assert main(["shar", str(manifest), "--out", str(stray), "--jobs", "1"]) == 2
    assert f"error: --out {stray} holds files already; a Shar folder holds one export's shards only" in \
        capsys.readouterr().err
    other = tmp_path / "other"
    write = CutSet.to_shar

    def raced(self, folder, *args, **kw):  # another export publishes --out while this one writes
        (other / "cuts.000000.jsonl.gz").write_bytes(b"theirs")
        return write(self, folder, *args, **kw)

    monkeypatch.setattr(CutSet, "to_shar", raced)
    assert main(["shar", str(manifest), "--out", str(other), "--jobs", "1"]) == 2
    assert "was filled by another export while this one ran" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["cuts.000000.jsonl.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "shar", "stray"]
    assert [p.name for p in other.iterdir()] == ["cuts.000000.jsonl.gz"]  # no partial folder left in it either


def test_a_shar_export_goes_to_the_disk_its_out_is_on_and_sweeps_a_killed_ones_leftovers(tmp_path, synth_corpus,
                                                                                          monkeypatch):
    """``--out`` a link to an empty folder on another disk (or a mount point): the shards are written there, not
    beside the link (it failed on the rename and deleted the export); a killed export's partial folder goes at the
    next export (at once under the folder's lock; where the file system cannot lock a folder, once nothing wrote it
    for an hour), and the folder the export completes holds its shards only."""
    import fcntl

    import common.data.corpora.shar as shar
    from common.data.manifests import open_cuts

    manifest = synth_corpus / "synth_valid.jsonl.gz"
    target = tmp_path / "big" / "shar"
    target.mkdir(parents=True)
    link = tmp_path / "shar"
    link.symlink_to(target)
    partial = target / ".partial-deadbeef"  # a killed export's
    partial.mkdir()
    (partial / "cuts.000000.jsonl.gz").write_bytes(b"half")
    fresh = target / ".partial-0123abcd"  # one still writing (another export's, just started)
    fresh.mkdir()
    old = time.time() - 7200
    os.utime(partial, (old, old))
    swept = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: swept.append(Path(path).name) or real_rmtree(path, *a,
                                                                                                             **k))
    real_flock = fcntl.flock

    def no_folder_locks(fd, how):  # NFS: flock of a folder fails
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(shar.fcntl, "flock", no_folder_locks)
    assert main(["shar", str(manifest), "--out", str(link), "--shard-size", "5", "--jobs", "1"]) == 0
    assert swept == [partial.name, fresh.name]  # the stale one first, the other export's once this one completed
    monkeypatch.setattr(shar.fcntl, "flock", real_flock)
    for name in (".partial-0000aaaa", ".partial-0000bbbb"):  # killed just now: under the lock, removed at once
        (target / name).mkdir()
    swept.clear()
    for shard in list(target.iterdir()):
        if not shard.name.startswith("."):
            shard.unlink()
    assert main(["shar", str(manifest), "--out", str(link), "--shard-size", "5", "--jobs", "1"]) == 0
    assert sorted(swept[:2]) == [".partial-0000aaaa", ".partial-0000bbbb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "shar"] and link.is_symlink()
    assert all(not p.name.startswith(".") for p in target.iterdir())
    assert any(p.name.startswith("recording.") for p in target.iterdir())
    assert sorted(c.id for c in open_cuts([link])) == sorted(c.id for c in CutSet.from_file(manifest))


def _export_shards(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_a_shar_export_killed_while_it_moved_its_shards_is_written_again_by_the_same_command(tmp_path, synth_corpus,
                                                                                             capsys):
    """A kill between the moves left half an export (2 of 3 cuts shards) beside the partial folder: the same command
    failed ("holds files already") and the folder could not be read; a kill after the last move left an empty
    partial folder that made a whole export unreadable. The next export removes a killed one's partial folder and
    the shards it had moved, and writes the export again; after an empty partial folder the export is whole, and
    the same command says so; the reader names such a folder and what to do."""
    from common.data.manifests import open_cuts
    from common.data.shar_stream import folder_shards

    manifest = synth_corpus / "synth_valid.jsonl.gz"
    out = tmp_path / "shar"
    assert main(["shar", str(manifest), "--out", str(out), "--shard-size", "5", "--jobs", "1"]) == 0
    whole = _export_shards(out)
    killed = out / ".partial-0badf00d"  # as a kill after the recordings' and the first cuts' moves leaves it
    killed.mkdir()
    for name in whole[1:3]:
        os.rename(out / name, killed / name)
    with pytest.raises(ValueError, match=r"holds \.partial-0badf00d, left by an export that did not finish: run the "
                                         r"same export again"):
        folder_shards(out)
    capsys.readouterr()
    assert main(["shar", str(manifest), "--out", str(out), "--shard-size", "5", "--jobs", "1"]) == 0
    err = capsys.readouterr().err
    assert "removed the 4 shard file(s) an export killed while it moved its shards into" in err, err
    assert _export_shards(out) == whole
    assert sorted(c.id for c in open_cuts([out])) == sorted(c.id for c in CutSet.from_file(manifest))
    (out / ".partial-00000000").mkdir()  # killed after its last move: the export is whole
    assert main(["shar", str(manifest), "--out", str(out), "--shard-size", "5", "--jobs", "1"]) == 0
    captured = capsys.readouterr()
    assert "removed .partial-00000000, left in" in captured.err
    assert f"{out} holds this export already (12 clips of {manifest} in 3 shard(s) of up to 5): nothing to " \
        f"write" in captured.out  # the same command again goes on (a requeued job's `shar && pretrain`)
    assert _export_shards(out) == whole and len(folder_shards(out)) == 3
    assert main(["shar", str(synth_corpus / "synth_test.jsonl.gz"), "--out", str(out), "--shard-size", "5",
                 "--jobs", "1"]) == 2  # another manifest's export is no longer this one
    assert f"error: --out {out} holds a Shar export already (3 cuts shard(s)" in capsys.readouterr().err


def test_a_shar_export_that_fails_while_it_moves_its_shards_leaves_none_and_another_waits(tmp_path, synth_corpus,
                                                                                          monkeypatch, capsys):
    """An error while the shards move up (a full disk, a vanished mount) took the partial folder away but left the
    shards already moved: a half export the next run refused. They go too. An export into a folder another export
    holds is refused at once, in one line."""
    import fcntl

    manifest = synth_corpus / "synth_valid.jsonl.gz"
    out = tmp_path / "shar"
    real = os.rename
    calls = []

    def fails_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", fails_third)
    assert main(["shar", str(manifest), "--out", str(out), "--shard-size", "5", "--jobs", "1"]) != 0
    monkeypatch.setattr(os, "rename", real)
    assert _export_shards(out) == []
    held = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        capsys.readouterr()
        assert main(["shar", str(manifest), "--out", str(out), "--jobs", "1"]) == 2
        assert f"error: --out {out}: another export into it is running; wait for it" in capsys.readouterr().err
    finally:
        os.close(held)
    assert main(["shar", str(manifest), "--out", str(out), "--shard-size", "5", "--jobs", "1"]) == 0


def test_a_shar_exports_lock_goes_with_it_not_with_the_processes_it_forked(tmp_path):
    """Lhotse's export workers are forked while the export holds --out's lock: a killed export left them running
    for ever, holding the lock, and every rerun was refused ("another export into it is running"). A forked
    process closes its copy: the lock goes when the export does."""
    import fcntl
    import signal

    import common.data.corpora.shar as shar

    out = tmp_path / "shar"
    out.mkdir()
    ready, said = os.pipe()
    with shar._folder_lock(out) as locked:
        assert locked
        child = os.fork()
        if child == 0:  # a worker: lives on after its export
            os.write(said, b"x")  # (after the fork's handlers ran)
            time.sleep(30)
            os._exit(0)
        os.read(ready, 1)
    os.close(ready)
    os.close(said)
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free while the worker lives
        finally:
            os.close(fd)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
