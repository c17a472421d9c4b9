"""The checkpoint folder's bookkeeping (``common.training.checkpoints.RunCheckpoints``) with a stand-in engine: a
tag saved again replaces its folder only once the new one is whole, and a resume from an older checkpoint than
the newest on disk keeps the checkpoints it writes from being pruned."""

import json
import os
from pathlib import Path

import pytest
import torch

from common.system.distributed import Dist
from common.training.checkpoints import LATEST, MODEL_FILE, RunCheckpoints, make_tag, tag_order

ONE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Engine:
    """Writes what DeepSpeed's ``save_checkpoint`` writes for a model of one weight, ``value``."""

    def __init__(self, value: float) -> None:
        self.value = value

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.tensor([self.value])}}, folder / MODEL_FILE)


def _save(checkpoints: RunCheckpoints, step: int, value: float | None = None, epochs: bool = False) -> str:
    tag = make_tag(0, step, epochs=epochs)
    checkpoints.save(Engine(step if value is None else value), tag, {"state": {"step": step}, "ledger": {}},
                     {"torch": torch.get_rng_state()})
    return tag


def _published(ckdir: Path) -> list[str]:
    return sorted(p.name for p in ckdir.iterdir() if p.is_dir())


def test_a_tag_saved_again_replaces_its_folder_only_when_the_new_one_is_whole(tmp_path, monkeypatch):
    ckdir = tmp_path / "checkpoints"
    checkpoints = RunCheckpoints(ckdir, ONE, keep=1)
    tag = _save(checkpoints, 3)
    _save(checkpoints, 3, value=30.0)  # the same tag again: the new weights, nothing left aside
    assert _published(ckdir) == [tag] and checkpoints.module_state(tag)["w"].item() == 30.0

    # killed after the old folder moved aside, before the new one took its place: the old one comes back
    rename = Path.rename

    def killed(self, target):
        if self.name.startswith(".tmp-"):
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(checkpoints, 3, value=300.0)
    monkeypatch.setattr(Path, "rename", rename)
    assert tag not in _published(ckdir) and (ckdir / LATEST).read_text() == tag
    assert RunCheckpoints(ckdir, ONE, keep=1).find_resume() == tag
    assert _published(ckdir) == [tag] and checkpoints.module_state(tag)["w"].item() == 30.0


@pytest.mark.parametrize("keep", [1, 2])
def test_a_resume_behind_the_newest_checkpoint_keeps_what_it_saves(tmp_path, keep):
    """The newest checkpoint is damaged; the run resumes from the one before and saves tags that sort before the
    damaged one: pruning keeps them (it used to take them for older and delete them, LATEST included)."""
    ckdir = tmp_path / "checkpoints"
    checkpoints = RunCheckpoints(ckdir, ONE, keep=2)
    resumed, damaged = _save(checkpoints, 2), _save(checkpoints, 10)
    (ckdir / damaged / "trainer_state.json").write_text("{")

    checkpoints = RunCheckpoints(ckdir, ONE, keep=keep)
    assert checkpoints.find_resume() == resumed
    assert (ckdir / f".aside-{damaged}").is_dir() and damaged not in _published(ckdir)  # kept for inspection
    saved = [_save(checkpoints, 3), _save(checkpoints, 4)]
    assert (ckdir / LATEST).read_text() == saved[-1]
    assert [n for n in _published(ckdir) if not n.startswith(".")] == ([resumed] + saved)[-keep:]
    assert RunCheckpoints(ckdir, ONE, keep=keep).find_resume() == saved[-1]
    assert (ckdir / f".aside-{damaged}").is_dir()
    _save(checkpoints, 10)  # the set-aside tag saved again: the new checkpoint replaces it
    assert not (ckdir / f".aside-{damaged}").exists() and (ckdir / LATEST).read_text() == damaged


def test_epoch_tags_count_epochs_and_go_on_from_an_earlier_versions_step_tags(tmp_path):
    """An epoch-based phase's tags say epochs (3 done: phase01-epoch0003). A run of an earlier version named them
    phase01-step000000003 (counting epochs): resumed, its new epoch tags come after the old ones by their
    numbers, not by name (where 'epoch' < 'step' would have pruning take the new ones for older), and a new
    tag of the same place supersedes the old name. Folders whose names are not tags are left alone."""
    assert make_tag(0, 3, epochs=True) == "phase01-epoch0003" and make_tag(1, 4000) == "phase02-step000004000"
    assert tag_order("phase01-epoch0012") > tag_order("phase01-step000000011")
    assert tag_order("phase02-epoch0000") > tag_order("phase01-step000000011")
    assert tag_order("phase01-step000000003") < tag_order("phase01-epoch0003")
    assert tag_order("phase01-step000000003-copy") is None and tag_order("phase-backup") is None
    ckdir = tmp_path / "checkpoints"
    old = RunCheckpoints(ckdir, ONE, keep=2)
    _save(old, 1), _save(old, 2)  # an earlier version's epoch-based run: 1 and 2 epochs done
    (ckdir / "phase01-step000000002-copy").mkdir()  # a user's copy: not a checkpoint of the run
    checkpoints = RunCheckpoints(ckdir, ONE, keep=2)
    assert checkpoints.find_resume() == "phase01-step000000002"
    assert not list(ckdir.glob(".aside-*"))  # nothing taken for newer than the checkpoint resumed from
    checkpoints.restate("phase01-epoch0002", pending_eval=False)  # the resumed phase's end recorded into it
    assert checkpoints.trainer_state("phase01-step000000002")["pending_eval"] is False
    third = _save(checkpoints, 3, epochs=True)
    assert (ckdir / LATEST).read_text() == third == "phase01-epoch0003"
    assert _published(ckdir) == ["phase01-epoch0003", "phase01-step000000002", "phase01-step000000002-copy"]
    # stopped within epoch 3 and saved again: the same place under the new name replaces the old name
    (ckdir / "phase01-step000000003").mkdir()
    _save(checkpoints, 3, value=30.0, epochs=True)
    assert _published(ckdir) == ["phase01-epoch0003", "phase01-step000000002", "phase01-step000000002-copy"]
    _save(checkpoints, 4, epochs=True)
    assert _published(ckdir) == ["phase01-epoch0003", "phase01-epoch0004", "phase01-step000000002-copy"]
    assert RunCheckpoints(ckdir, ONE, keep=2).find_resume() == "phase01-epoch0004"


def test_what_a_resume_set_aside_goes_once_the_run_has_saved_past_it(tmp_path):
    """A set-aside checkpoint (newer than the one a run resumed from, damaged) whose tag the run never saves again
    (an epoch-based run's mid-epoch tag) is removed once every checkpoint kept is past its place."""
    ckdir = tmp_path / "checkpoints"
    checkpoints = RunCheckpoints(ckdir, ONE, keep=2)
    resumed, damaged = _save(checkpoints, 2), _save(checkpoints, 5)
    (ckdir / damaged / "trainer_state.json").write_text("{")
    checkpoints = RunCheckpoints(ckdir, ONE, keep=2)
    assert checkpoints.find_resume() == resumed
    _save(checkpoints, 3), _save(checkpoints, 4), _save(checkpoints, 6)
    assert (ckdir / f".aside-{damaged}").is_dir()  # step 4 is kept: not yet past it
    _save(checkpoints, 7)
    assert not (ckdir / f".aside-{damaged}").exists() and _published(ckdir) == [make_tag(0, 6), make_tag(0, 7)]


def test_a_conversion_left_by_a_killed_resume_on_other_ranks_is_removed_at_the_next_start(tmp_path):
    """A resume on another number of ranks converts the checkpoint to DeepSpeed's universal format (``.universal-TAG``,
    and DeepSpeed's ``latest_universal`` naming it); killed while loading it, the run leaves both. The next start
    removes them (never reused: the digests do not cover them; converted afresh where needed)."""
    ckdir = tmp_path / "checkpoints"
    tag = _save(RunCheckpoints(ckdir, ONE, keep=1), 2)
    (ckdir / f".universal-{tag}").mkdir()
    (ckdir / f".universal-{tag}" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    (ckdir / "latest_universal").write_text(f".tmp-universal-{tag}")
    assert RunCheckpoints(ckdir, ONE, keep=1).find_resume() == tag
    assert sorted(p.name for p in ckdir.iterdir()) == [LATEST, tag]


_ITERDIR = Path.iterdir  # what rank 1 sees: every file


class _TwoHosts:
    """Rank 0 of 2 on a shared file system, with rank 1 played here: rank 1 lists every file (it sees its own) and
    measures its share of the names itself."""

    rank, world_size, local_rank, device, is_main = 0, 2, 0, torch.device("cpu"), True

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj, src: int = 0):
        return obj

    def gather_objects(self, obj) -> list:
        from common.training.checkpoint_files import measure

        tmp = next(self.folder.glob(".tmp-*"))
        names = sorted(p.name for p in _ITERDIR(tmp))
        if isinstance(obj, list):  # the listing
            return [obj, names]
        union = sorted(set(names) | set(obj))
        return [obj, {name: measure(tmp / name) for name in union[1::2]}]


def test_a_checkpoint_lists_the_files_every_rank_wrote_as_written(tmp_path, monkeypatch):
    """On a shared file system rank 0's listing of another host's new file may lag, and its cached size may be
    old: the checkpoint's record of its files (which a resume checks) comes from every rank's own view."""
    ckdir = tmp_path / "checkpoints"
    other = "zero_pp_rank_1_mp_rank_00_optim_states.pt"

    class ShardedEngine(Engine):
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            super().save_checkpoint(save_dir, tag, client_state, save_latest)
            torch.save({"state": torch.arange(100)}, Path(save_dir) / tag / other)  # rank 1's shard

    iterdir, stat = Path.iterdir, Path.stat
    hidden = {"on": True}

    def lagging(self):  # rank 0 does not see rank 1's file yet
        return (p for p in iterdir(self) if not (hidden["on"] and p.name == other))

    def stale(self, **kw):  # and its cached size of that file is old
        st = stat(self, **kw)
        if hidden["on"] and self.name == other:
            return os.stat_result((*st[:6], st.st_size - 1, *st[7:]))
        return st

    monkeypatch.setattr(Path, "iterdir", lagging)
    monkeypatch.setattr(Path, "stat", stale)
    checkpoints = RunCheckpoints(ckdir, _TwoHosts(ckdir), keep=1)
    tag = make_tag(0, 1)
    checkpoints.save(ShardedEngine(1.0), tag, {"state": {"step": 1}, "ledger": {}}, {"torch": torch.get_rng_state()})
    hidden["on"] = False

    files = json.loads((ckdir / tag / "trainer_state.json").read_text())["files"]
    assert files[other] == (ckdir / tag / other).stat().st_size
    assert RunCheckpoints(ckdir, ONE, keep=1).find_resume() == tag


def test_a_checkpoint_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    """Every file of a checkpoint is forced to disk before ``LATEST`` names it: after a host crash the checkpoint
    ``LATEST`` names holds what its digests say (without it a crash could leave the newest checkpoint's data
    unwritten, and the resume fell back to the one before)."""
    ckdir = tmp_path / "checkpoints"
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    write_bytes = Path.write_bytes

    def latest_after_files(self, data):
        if LATEST in self.name:  # LATEST's temporary: every file of the checkpoint synced by now
            assert {MODEL_FILE, "rng_rank0.pt"} <= set(synced), synced
            assert any(name.startswith(".trainer_state.json") for name in synced), synced
            written.append(self.name)
        return write_bytes(self, data)

    written: list[str] = []
    monkeypatch.setattr(Path, "write_bytes", latest_after_files)
    tag = _save(RunCheckpoints(ckdir, ONE, keep=1), 1)
    assert (ckdir / LATEST).read_text() == tag and written


def _files_a_list(saved: dict) -> None:
    saved["files"] = list(saved["files"])


def _digests_a_list(saved: dict) -> None:
    saved["sha256"] = list(saved["sha256"].values())


def _no_ledger(saved: dict) -> None:
    del saved["ledger"]


def _unknown_state_key(saved: dict) -> None:
    saved["state"]["stepp"] = 3


def _state_a_list(saved: dict) -> None:
    saved["state"] = [saved["state"]]


def _step_a_string(saved: dict) -> None:
    saved["state"]["step"] = "10"


def _ledger_phases_a_string(saved: dict) -> None:
    saved["ledger"] = {"phases": "p1"}


@pytest.mark.parametrize("change, reason", [
    (_files_a_list, "files is a list, not a mapping of file names to sizes"),
    (_digests_a_list, "sha256 is a list, not a mapping of file names to digests"),
    (_no_ledger, "it holds no ledger"),
    (_unknown_state_key, "its state has unknown key(s) stepp"),
    (_state_a_list, "its state is a list, not a mapping"),
    (_step_a_string, "its state's step is '10', not a whole number"),
    (_ledger_phases_a_string, "its ledger: phases is 'p1', not a list"),
])
def test_a_trainer_state_of_the_wrong_shape_is_damage_and_the_resume_falls_back(tmp_path, caplog, change, reason):
    """A trainer_state.json that parses but is not of the shape a resume reads (written by hand, by another tool)
    is a damaged checkpoint: the resume takes the one before, with a warning naming the file and what is wrong
    (it used to crash with a traceback, in damage() or in TrainState(**state), or resume from it)."""
    ckdir = tmp_path / "checkpoints"
    checkpoints = RunCheckpoints(ckdir, ONE, keep=2)
    older, newest = _save(checkpoints, 2), _save(checkpoints, 10)
    path = ckdir / newest / "trainer_state.json"
    saved = json.loads(path.read_text())
    change(saved)
    path.write_text(json.dumps(saved))
    with caplog.at_level("WARNING"):
        assert RunCheckpoints(ckdir, ONE, keep=2).find_resume() == older
    assert f"cannot resume from checkpoint {newest}: {path} is not a trainer state of this package ({reason})" in \
        caplog.text


class _Runs:
    """Unpickling it would call ``os.system`` (a module torch blocks outright, not only leaves off its list)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Foreign:
    """A class of no checkpoint this package writes."""


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_refused_checkpoint_file_names_what_torch_refused_in_it(tmp_path):
    """torch 2.11 says a blocked module's global (``os.system``) on a line of its own after its generic first line,
    with no ``WeightsUnpickler error:``: the error named only that generic line (a security review)."""
    import pickle
    import re

    from common.training.checkpoint_files import UnsafeCheckpointFile, safe_load

    marker = tmp_path / "ran"
    cases = [({"module": _Runs(marker)}, r"\(Trying to load unsupported GLOBAL posix\.system whose module posix is "
                                         r"blocked\)"),
             ({"module": _Foreign()}, r"\(Unsupported global: GLOBAL \S+\._Foreign\)"),
             (None, r"\(Unsupported operand \d+\)")]
    for number, (state, reason) in enumerate(cases):
        path = tmp_path / f"{number}.pt"
        if state is None:  # a plain pickle of protocol 4 (not torch's zip format): an opcode torch does not read
            path.write_bytes(pickle.dumps({"w": [1.5]}, protocol=4))
        else:
            torch.save(state, path)
        start = re.escape(f"{path} cannot be loaded with weights_only=True ")
        with pytest.raises(UnsafeCheckpointFile, match=rf"^{start}{reason}: "):
            safe_load(path)
    assert not marker.exists()
