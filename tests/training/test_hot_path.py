"""What keeps costs that do not shrink with C out of the step: the non-finite check read once per window,
decoded clips kept (``data.cache``), batches prepared by a background thread, and DeepSpeed's gradient
all-reduce skipped on a single rank. None of them may change what is trained."""

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.cache import ClipCache
from common.data.clips import ClipDataset
from common.data.config import DataConfig
from common.data.decode import load_clip
from common.data.loader import ClipLoader
from common.data.manifests import open_cuts
from common.data.prefetch import background
from tests.helpers import host_reads, package_reader, poison_loss_at, run, weights


def test_a_non_finite_loss_is_caught_at_the_next_checkpoint_without_a_sync_per_step(tmp_path, synth_corpus,
                                                                                      monkeypatch, capsys):
    poison_loss_at(monkeypatch, 3)
    reads = _count_host_reads_in_micro_steps(monkeypatch)
    run_dir = tmp_path / "nan"
    # log window of 100 steps: the check happens when phase 1 ends (step 3) and saves
    assert run(run_dir, synth_corpus, "train.log_every=100", "train.save_every=2") == 1
    err = capsys.readouterr().err
    assert "non-finite loss in phase1 (fshift x4) at step 3" in err and "phase01-step000000002" in err
    # not the learning rate alone: a clip the bad-audio checks let through stops a resume at the same step again
    assert "the data can cause it as well as the learning rate" in err and "at this step again" in err
    ckdir = run_dir / "checkpoints"
    assert (ckdir / "LATEST").read_text() == "phase01-step000000002"  # phase 1's end was never saved
    saved = torch.load(ckdir / "phase01-step000000002" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert reads == {"steps": 3, "reads": 0}  # no device value read on the host inside a training step


def test_a_non_finite_loss_is_caught_before_a_validation_between_checkpoints(tmp_path, synth_corpus, monkeypatch,
                                                                             capsys):
    """Validating falls due (step 2) inside a log window and between checkpoints: weights a NaN broke at step 1
    are never validated, nor exported as best.safetensors."""
    poison_loss_at(monkeypatch, 1)
    run_dir = tmp_path / "nan"
    assert run(run_dir, synth_corpus, "train.log_every=100", "train.save_every=100", steps=(4, 3)) == 1
    assert "non-finite loss in phase1 (fshift x4) at step 1; stopped at step 2" in capsys.readouterr().err
    assert not (run_dir / "export" / "best.safetensors").exists()


def _count_host_reads_in_micro_steps(monkeypatch) -> dict:
    """``{"steps", "reads"}``: the training steps taken and the host reads by this package's own code within
    them (the CPU optimiser reads its step counts), counted while the test runs."""
    from common.training.loop import Trainer

    counts = {"steps": 0, "reads": 0}
    real_step = Trainer._micro_step

    def micro_step(self, *args, **kwargs):
        counts["steps"] += 1
        with host_reads(package_reader) as reads:
            try:
                return real_step(self, *args, **kwargs)
            finally:
                counts["reads"] += len(reads)

    monkeypatch.setattr(Trainer, "_micro_step", micro_step)
    return counts


@pytest.mark.slow
def test_window_and_step_checks_train_the_same_weights(tmp_path, synth_corpus):
    a, b = tmp_path / "window", tmp_path / "step"
    assert run(a, synth_corpus, "train.save_every=100") == 0
    assert run(b, synth_corpus, "train.save_every=100", "train.nonfinite_check=step") == 0
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = (json.loads((d / "ledger.json").read_text()) for d in (a, b))
    assert [e["metrics"] for e in la["evals"]] == [e["metrics"] for e in lb["evals"]]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_clips_train_the_same_weights_and_are_decoded_once(tmp_path, synth_corpus, mode, monkeypatch):
    import common.data.clips

    decoded = []
    real = common.data.clips.load_clip

    def counting(cut, rate, channels="first"):
        decoded.append(cut.id)
        return real(cut, rate, channels)

    straight = tmp_path / "plain"
    assert run(straight, synth_corpus, "train.save_every=100") == 0
    monkeypatch.setattr(common.data.clips, "load_clip", counting)
    cached = tmp_path / mode
    assert run(cached, synth_corpus, "train.save_every=100", f"data.cache={mode}",
               f"data.cache_dir={tmp_path / 'cache'}") == 0
    a, b = weights(straight), weights(cached)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert decoded and len(decoded) == len(set(decoded))  # 6 steps x 4 clips + validation, each decoded once
    if mode == "disk":
        assert len(list((tmp_path / "cache").rglob("*.npy"))) == len(decoded)


def test_the_disk_cache_survives_damage_and_source_changes(tmp_path, synth_corpus):
    cuts = list(open_cuts([synth_corpus / "synth_valid.jsonl.gz"]))[:2]
    cache = ClipCache("disk", tmp_path / "c")
    first = [cache.load(c, 16000, load_clip) for c in cuts]
    files = sorted((tmp_path / "c").rglob("*.npy"))
    assert len(files) == 2 and cache.misses == 2
    files[0].write_bytes(files[0].read_bytes()[:50])  # truncated: decoded again and rewritten
    again = [cache.load(c, 16000, load_clip) for c in cuts]
    assert all(np.array_equal(x, y) for x, y in zip(first, again)) and cache.misses == 3 and cache.hits == 1
    for file in files:  # emptied (a crash after the rename, before the data reached the disk): the same
        file.write_bytes(b"")
    assert all(np.array_equal(cache.load(c, 16000, load_clip), x) for c, x in zip(cuts, first))
    assert cache.misses == 5 and all(file.stat().st_size > 0 for file in files)
    assert ClipCache("memory", max_bytes=first[0].nbytes).load(cuts[0], 16000, load_clip) is not None
    with pytest.raises(ValueError, match="cache: 'memory' .* needs num_workers: 0"):
        DataConfig(cache="memory", num_workers=2)


def test_a_cached_clip_that_fails_the_sample_check_is_decoded_again_and_refused(tmp_path, synth_corpus):
    """A disk cache kept by an earlier version holds clips decoded before samples far outside [-1, 1] were bad
    audio: read from the cache as they were, a file of garbage floats still gave a NaN loss naming no clip. A
    cached clip that fails the check is decoded again, and the decoder names it."""
    from common.data.decode import BadClip

    cuts = list(open_cuts([synth_corpus / "synth_valid.jsonl.gz"]))[:1]
    cache = ClipCache("disk", tmp_path / "c")
    wave = cache.load(cuts[0], 16000, load_clip)
    (file,) = (tmp_path / "c").rglob("*.npy")
    np.save(file, wave * 1e30)  # what the cache held for such a file before the check

    def garbage(cut, rate):
        raise BadClip("samples far outside [-1, 1] (peak 1e+30): ...")

    with pytest.raises(BadClip, match="samples far outside"):
        cache.load(cuts[0], 16000, garbage)
    assert cache.hits == 0 and cache.misses == 2


def test_a_disk_cache_that_cannot_write_is_said_once_and_the_clips_are_still_decoded(tmp_path, synth_corpus,
                                                                                        monkeypatch, caplog):
    """The cache saves time only: a full disk or a quota under data.cache_dir leaves no temporary file and does
    not stop the run; concurrent writers (other hosts may have the same process ids) never share a temporary."""
    import common.data.cache as cache_module

    cuts = list(open_cuts([synth_corpus / "synth_valid.jsonl.gz"]))[:3]
    cache = ClipCache("disk", tmp_path / "c")
    real_save, saves = np.save, []

    def full(handle, wave):
        saves.append(handle.name)
        real_save(handle, wave[:10])  # part of the clip written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module.np, "save", full)
    waves = [cache.load(c, 16000, load_clip) for c in cuts]
    assert all(np.array_equal(w, load_clip(c, 16000)) for w, c in zip(waves, cuts))
    assert len(saves) == 1 and not list((tmp_path / "c").rglob("*.tmp")) and not list((tmp_path / "c").rglob("*.npy"))
    assert [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()] == [
        f"clip cache: cannot write to {tmp_path / 'c'} (No space left on device); clips are decoded every time from "
        f"now on"]
    monkeypatch.setattr(cache_module.np, "save", lambda handle, wave: (saves.append(handle.name),
                                                                       real_save(handle, wave))[1])
    monkeypatch.setattr(cache_module.os, "getpid", lambda: 7)  # the same pid in two containers
    other = ClipCache("disk", tmp_path / "c")
    other.load(cuts[0], 16000, load_clip)
    ClipCache("disk", tmp_path / "c")._write(tmp_path / "c" / "x.npy", waves[0])
    assert len(set(saves[1:])) == 2 and all(".7." not in Path(name).name for name in saves[1:])


@pytest.mark.parametrize("why", ["a file where its folder goes", "another user's folder"])
def test_a_disk_cache_whose_folder_cannot_be_made_is_said_and_the_run_decodes(tmp_path, synth_corpus, caplog,
                                                                              monkeypatch, why):
    """A data.cache_dir that cannot be made (a read-only home, another user's 0700 folder, a file where its folder
    goes) is one warning naming the key, and every clip is decoded, where the run stopped with 'PATH: permission
    denied'."""
    from tests.helpers import unsearchable

    cuts = list(open_cuts([synth_corpus / "synth_valid.jsonl.gz"]))[:3]
    if why == "a file where its folder goes":
        (tmp_path / "home").write_text("a file\n")
        reason = "Not a directory"
    else:
        unsearchable(monkeypatch, tmp_path / "home")
        reason = "Permission denied"
    cache = ClipCache("disk", tmp_path / "home" / "clips")
    waves = [cache.load(c, 16000, load_clip) for c in cuts]
    monkeypatch.undo()
    assert all(np.array_equal(w, load_clip(c, 16000)) for w, c in zip(waves, cuts)) and cache.misses == 3
    said = [r.getMessage() for r in caplog.records if "clip cache" in r.getMessage()]
    assert said == [f"clip cache: cannot make {tmp_path / 'home' / 'clips'} ({reason}); clips are decoded "
                    f"every time (data.cache_dir names a folder this user can write)"], said


@pytest.mark.parametrize("read_only", [False, True])
def test_a_disk_cache_this_user_cannot_write_is_said_once_when_made_and_its_clips_are_read(tmp_path, synth_corpus,
                                                                                           caplog, monkeypatch,
                                                                                           read_only):
    """Another user's cache folder (or one on a read-only mount) was found only at each loader worker's first write:
    one warning per worker. It is said once, when the cache is made; the workers get a cache that does not try
    to write, and the clips the folder holds are still read."""
    import pickle

    import common.data.cache as cache_module

    cuts = list(open_cuts([synth_corpus / "synth_valid.jsonl.gz"]))[:3]
    ClipCache("disk", tmp_path / "c").load(cuts[0], 16000, load_clip)  # kept by its owner
    kept = sorted((tmp_path / "c").rglob("*.npy"))
    real_access = os.access
    monkeypatch.setattr(cache_module.os, "access", lambda path, mode: False if Path(path) == tmp_path / "c" and mode
                        & os.W_OK else real_access(path, mode))
    monkeypatch.setattr(cache_module, "_read_only", lambda folder: read_only)
    caplog.clear()
    cache = pickle.loads(pickle.dumps(ClipCache("disk", tmp_path / "c")))  # as a loader worker gets it
    waves = [cache.load(c, 16000, load_clip) for c in cuts]
    assert all(np.array_equal(w, load_clip(c, 16000)) for w, c in zip(waves, cuts))
    assert (cache.hits, cache.misses) == (1, 2) and sorted((tmp_path / "c").rglob("*.npy")) == kept
    said = [r.getMessage() for r in caplog.records if "clip cache" in r.getMessage()]
    reason = "Read-only file system" if read_only else "Permission denied"
    assert said == [f"clip cache: cannot write to {tmp_path / 'c'} ({reason}); the clips it holds are read, the "
                    f"others are decoded every time (data.cache_dir names a folder this user can write)"], said


def test_a_group_cache_whose_sub_folders_another_user_made_is_said_once_and_read_where_it_can_be(tmp_path,
                                                                                                    synth_corpus,
                                                                                                    caplog,
                                                                                                    monkeypatch):
    """A group-shared cache (its folder group-writable) whose sub-folders a colleague made without group write: each
    loader worker said it at its first write into one; a sub-folder this user cannot search gave one warning per clip
    and epoch. Said once when the cache is made; the clips in the others are read and written as before."""
    import pickle

    import common.data.cache as cache_module

    cuts = list(open_cuts([synth_corpus / "synth_valid.jsonl.gz"]))[:6]
    keys = [cache_module._cut_key(c, 16000)[:2] for c in cuts]
    closed, hidden = keys[0], keys[1]  # the first clip's sub-folder cannot be written, the second's not read either
    owner = ClipCache("disk", tmp_path / "c")
    for cut in cuts[:2]:
        owner.load(cut, 16000, load_clip)
    real_access = os.access

    def access(path, mode):
        name = Path(path).name
        if name == hidden or (name == closed and mode & os.W_OK):
            return False
        return real_access(path, mode)

    monkeypatch.setattr(cache_module.os, "access", access)
    caplog.clear()
    cache = pickle.loads(pickle.dumps(ClipCache("disk", tmp_path / "c")))  # as a loader worker gets it
    waves = [cache.load(c, 16000, load_clip) for c in cuts]
    assert all(np.array_equal(w, load_clip(c, 16000)) for w, c in zip(waves, cuts))
    said = [r.getMessage() for r in caplog.records if "clip cache" in r.getMessage()]
    assert said == [f"clip cache: 2 of the 2 sub-folders of {tmp_path / 'c'} cannot be written by this user, 1 not "
                    f"read either (made by another user without group write: docs/data.md says how a group shares "
                    f"the folder); the clips that belong in them are decoded every time"], said
    others = {k for k in keys[2:] if k not in (closed, hidden)}
    assert cache.hits == int(closed != hidden) and {p.parent.name for p in (tmp_path / "c").rglob("*.npy")} == \
        {closed, hidden} | others  # the closed one read, the hidden one not; the others written


def test_a_sub_folder_closed_during_the_run_is_said_once_and_the_others_still_written(tmp_path, synth_corpus,
                                                                                       caplog, monkeypatch):
    """A sub-folder another user made while the run went (without group write, or search): a failed write stopped
    every write of the run, naming the top folder, and an unsearchable one warned at every clip of every epoch."""
    import errno

    import common.data.cache as cache_module

    cuts = list(open_cuts([synth_corpus / "synth_valid.jsonl.gz"]))[:6]
    keys = [cache_module._cut_key(c, 16000)[:2] for c in cuts]
    cache = ClipCache("disk", tmp_path / "c")
    real_temporary, real_load = cache_module.temporary_file, cache_module.np.load

    def closed(path):
        if path.parent.name == keys[0]:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_temporary(path)

    def hidden(path, *args, **kwargs):
        if Path(path).parent.name == keys[1]:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "temporary_file", closed)
    monkeypatch.setattr(cache_module.np, "load", hidden)
    caplog.clear()
    for _ in range(2):
        waves = [cache.load(c, 16000, load_clip) for c in cuts]
    assert all(np.array_equal(w, load_clip(c, 16000)) for w, c in zip(waves, cuts))
    written = {p.parent.name for p in (tmp_path / "c").rglob("*.npy")}
    assert keys[0] not in written and set(keys[2:]) - {keys[0], keys[1]} <= written
    said = [r.getMessage() for r in caplog.records if "clip cache" in r.getMessage()]
    assert len(said) == 1 and "a sub-folder of" in said[0] and "cannot be written or read" in said[0], said


def test_a_cache_folder_this_user_can_neither_read_nor_write_is_one_warning(tmp_path, synth_corpus, caplog,
                                                                             monkeypatch):
    """The folder another user's 0700 (or 0711) cache: every clip's read was a warning 'PATH is unreadable'."""
    import common.data.cache as cache_module

    cuts = list(open_cuts([synth_corpus / "synth_valid.jsonl.gz"]))[:2]
    ClipCache("disk", tmp_path / "c").load(cuts[0], 16000, load_clip)
    monkeypatch.setattr(cache_module.os, "access", lambda path, mode: Path(path) != tmp_path / "c")
    monkeypatch.setattr(cache_module, "_read_only", lambda folder: False)
    caplog.clear()
    cache = ClipCache("disk", tmp_path / "c")
    for _ in range(2):
        [cache.load(c, 16000, load_clip) for c in cuts]
    assert cache.hits == 0 and cache.misses == 4
    said = [r.getMessage() for r in caplog.records if "clip cache" in r.getMessage()]
    assert said == [f"clip cache: cannot write to {tmp_path / 'c'} (Permission denied); nor read it: clips are "
                    f"decoded every time (data.cache_dir names a folder this user can write)"], said


def test_an_index_folder_that_cannot_be_written_names_its_key(tmp_path, synth_corpus, monkeypatch):
    """The index of a whole-set shuffle in a folder this user cannot write (another user's shared index, a
    read-only home) is refused naming data.index_dir and what to do, not a temporary file's path alone; also where
    the folder that cannot be made is one on its way (~/.cache of a read-only home: the error was that folder's
    alone)."""
    import errno

    (tmp_path / "home").write_text("a file\n")
    with pytest.raises(ValueError, match=r"^data.index_dir: the training set's index cannot be written under "
                                         rf"{tmp_path / 'home' / 'index'} \(.*not a directory\); set data.index_dir"):
        open_cuts([synth_corpus / "synth_pool.jsonl.gz"], index_dir=str(tmp_path / "home" / "index"))
    home, real_mkdir = tmp_path / "rohome", os.mkdir
    home.mkdir()

    def read_only(path, *args, **kwargs):  # as the kernel answers: a missing parent first, then the mount
        if Path(path).is_relative_to(home):
            if not Path(path).parent.is_dir():
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    index = home / ".cache" / "coarse2fine" / "manifests"
    with pytest.raises(ValueError, match=rf"^data.index_dir: the training set's index cannot be written under {index} "
                                         r"\(.*read-only file system.*\); set data.index_dir"):
        open_cuts([synth_corpus / "synth_pool.jsonl.gz"], index_dir=str(index))
    monkeypatch.undo()
    # a manifest that cannot be read while it is indexed is the manifest's failure, not the folder's
    damaged = tmp_path / "damaged.jsonl.gz"
    data = bytearray((synth_corpus / "synth_pool.jsonl.gz").read_bytes())
    data[-6] ^= 0xFF  # the gzip trailer's checksum
    damaged.write_bytes(bytes(data))
    with pytest.raises(OSError, match="CRC check failed"):
        open_cuts([damaged], index_dir=str(tmp_path / "index"))


def test_the_disk_cache_leaves_its_reserve_free_and_clears_stale_temporaries(tmp_path, synth_corpus, monkeypatch,
                                                                             caplog):
    """The cache stops growing while its file system has less than 10 % free (at most 50 GiB), said once; a
    temporary a killed writer left is removed when a process first writes beside it, once an hour old."""
    import os
    from collections import namedtuple

    import common.data.cache as cache_module

    cuts = list(open_cuts([synth_corpus / "synth_valid.jsonl.gz"]))[:3]
    monkeypatch.setattr(cache_module, "RESERVE_MAX", 50 * 2**30)
    usage = namedtuple("usage", "total used free")
    free = {"bytes": 10 * 2**30 + 2**20}
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage(100 * 2**30, 0, free["bytes"]))
    cache = ClipCache("disk", tmp_path / "c")
    key = cache_module._cut_key(cuts[0], 16000)
    sub = tmp_path / "c" / key[:2]
    sub.mkdir(parents=True)
    stale, fresh = sub / ".old.npy.c2f-0123abcd.tmp", sub / ".new.npy.c2f-4567cdef.tmp"
    older = sub / ".older.npy.0123456789abcdef.tmp"  # an earlier version's name (16 hex digits): not marked, left
    for tmp in (stale, fresh, older):
        tmp.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    os.utime(older, (0, 0))
    cache.load(cuts[0], 16000, load_clip)  # 10 GiB of 100 free after it: the reserve is met
    assert (sub / f"{key}.npy").is_file() and not stale.exists() and older.exists() and fresh.exists()
    free["bytes"] = 10 * 2**30  # a clip more would go below it: nothing more is written, said once; clips still load
    waves = [cache.load(c, 16000, load_clip) for c in cuts[1:]]
    assert all(np.array_equal(w, load_clip(c, 16000)) for w, c in zip(waves, cuts[1:]))
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 1
    assert len([r for r in caplog.records if "the reserve the cache leaves" in r.getMessage()]) == 1


def test_background_batches_keep_their_order_and_raise_where_the_producer_failed():
    assert list(background(iter(range(10)), depth=3)) == list(range(10))

    def failing():
        yield 1
        raise RuntimeError("decoder broke")

    out = background(failing())
    assert next(out) == 1
    with pytest.raises(RuntimeError, match="decoder broke"):
        next(out)
    started = threading.active_count()
    stream = background(iter(range(1000)), depth=2)
    next(stream)
    stream.close()  # the consumer stops: the producer thread ends
    time.sleep(0.3)
    assert threading.active_count() <= started


def test_the_producer_starts_at_the_call_and_ends_when_its_stream_is_dropped_unstarted():
    """The loader's docstring: decoding begins at batches(), before a caller's clock, not at the first batch; a
    stream dropped before its first item (its finally never runs) stops its producer all the same."""
    produced = threading.Event()

    def items():
        produced.set()
        yield from range(1000)

    before = set(threading.enumerate())
    stream = background(items(), depth=2)
    assert produced.wait(5)  # nothing drawn yet
    (producer,) = [t for t in threading.enumerate() if t not in before and t.name == "batch-prefetch"]
    del stream
    producer.join(5)
    assert not producer.is_alive()


def test_a_ctrl_c_while_a_validation_closes_its_stream_stops_the_run(tmp_path, synth_corpus, monkeypatch):
    """A validation of train.eval_batches left its prefetching stream to the collector, whose wait for the thread
    then printed a Ctrl-C as "Exception ignored" and trained on (exit 0)."""
    import common.data.prefetch as prefetch

    real = prefetch._consume
    closed = []

    def interrupted_at_close(*args):
        try:
            yield from real(*args)
        finally:
            closed.append(True)
            if len(closed) == 1:
                raise KeyboardInterrupt  # as a Ctrl-C in its thread.join

    monkeypatch.setattr(prefetch, "_consume", interrupted_at_close)
    assert run(tmp_path / "run", synth_corpus, "data.num_workers=0", "train.eval_batches=1",
               "train.eval_every=1", steps=(2, 1)) == 130
    assert closed


def test_a_run_leaves_no_mask_drawing_thread_behind(tmp_path, synth_corpus):
    """SSAST's masks are drawn a batch ahead on a thread, which outlived the run (one per run in a notebook)."""
    assert run(tmp_path / "run", synth_corpus, steps=(2, 1)) == 0
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ssast-masks")]


def test_a_loader_without_workers_prepares_batches_ahead(tmp_path, synth_corpus):
    cuts = open_cuts([synth_corpus / "synth_pool.jsonl.gz"])

    def ids(prefetch):
        loader = ClipLoader(cuts, ClipDataset(16000), 4, shuffle=True, drop_last=True, seed=3, rank=0,
                            world_size=1, prefetch=prefetch)
        return [(b.epoch, b.index, b.ids) for b in loader.batches(start_epoch=1, skip=2, epochs=2)]

    assert ids(2) == ids(0)


@pytest.mark.slow
def test_deepspeed_skips_the_gradient_all_reduce_of_a_single_rank(tmp_path, synth_corpus, monkeypatch):
    from deepspeed.runtime.engine import DeepSpeedEngine

    calls = {"n": 0}
    real = DeepSpeedEngine.allreduce_gradients

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "allreduce_gradients", counting)
    assert run(tmp_path / "r", synth_corpus, "train.save_every=100") == 0
    assert calls["n"] == 0


def test_the_watch_names_the_optimiser_step_of_the_first_bad_micro_batch():
    from common.system.distributed import Dist
    from common.training.nonfinite import NonFiniteWatch

    watch = NonFiniteWatch(Dist(0, 1, 0, torch.device("cpu")), "window", grad_accum=2)
    watch.restart(10)
    for loss in [1.0, 2.0, 3.0, 4.0, 5.0, float("nan"), 7.0, float("inf")]:
        assert watch.observe(torch.tensor(loss)) is False  # nothing read on the host
    assert watch.check(14) == 13  # micro-batch 6 of the window is in its 3rd step: 10 + 3
    assert watch.check(15) is None  # a fresh window
    strict = NonFiniteWatch(Dist(0, 1, 0, torch.device("cpu")), "step")
    assert strict.observe(torch.tensor(float("nan"))) is True and strict.observe(torch.tensor(1.0)) is False

