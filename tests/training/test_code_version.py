"""A run records the code that trains it (the package's version, the commit of a git checkout and a digest of its
modules) in its ledger; a resume under other code is said and recorded as an intervention, so that a run that spans
an upgrade says so. A run recorded before the version was (an intervention from an unknown version), or with
``train.zero_stage: 0`` (the default before ``auto``), resumes."""

import json
import logging
import re
import subprocess

import pytest
import torch
import yaml

from common.system.version import __version__, code_version, git_commit
from common.training.interventions import check_code
from common.training.ledger import Ledger
from common.training.train_state import TrainState
from tests.helpers import ROOT, run, weights

A, B = "a" * 40, "b" * 40


def test_the_version_is_setup_pys_and_the_commit_the_checkouts():
    setup = (ROOT / "setup.py").read_text()
    assert "version=VERSION" in setup and "common\" / \"system\" / \"version.py\"" in setup
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__) and code_version()["version"] == __version__
    if not (ROOT / ".git").exists():
        assert "commit" not in code_version()
        return
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not there to compare with")
    if (ROOT / ".git" / "reftable").is_dir():  # git's reftable ref storage: refs are not files (not read, no commit)
        assert "commit" not in code_version()
        return
    assert code_version()["commit"] == head


def test_the_commit_is_read_from_the_git_folder_without_git(tmp_path):
    assert git_commit(tmp_path) is None  # not a checkout
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    assert git_commit(tmp_path) is None  # a branch with no commit yet
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{B} refs/heads/other\n{A} refs/heads/main\n")
    assert git_commit(tmp_path) == A
    (git / "refs" / "heads" / "main").write_text(f"{B}\n")  # a loose ref wins over the packed one
    assert git_commit(tmp_path) == B
    (git / "HEAD").write_text(f"{A}\n")  # detached
    assert git_commit(tmp_path) == A
    # a worktree: .git is a file naming its folder, whose refs are the main checkout's (commondir)
    tree = tmp_path / "tree"
    (git / "worktrees" / "tree").mkdir(parents=True)
    (git / "worktrees" / "tree" / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "worktrees" / "tree" / "commondir").write_text("../..\n")
    tree.mkdir()
    (tree / ".git").write_text(f"gitdir: {git / 'worktrees' / 'tree'}\n")
    assert git_commit(tree) == B
    (tree / ".git").write_text("not a gitdir line")
    assert git_commit(tree) is None


def test_a_resume_under_other_code_is_said_and_recorded(monkeypatch, caplog):
    from common.training import interventions

    now = {"version": "0.2.0", "commit": B}
    monkeypatch.setattr(interventions, "code_version", lambda: now)
    state = TrainState(phase=1, total_steps=7)
    ledger = Ledger()
    check_code(ledger, state, resumed=False)  # a run that starts
    assert ledger.to_dict()["code"] == now and ledger.interventions == []
    check_code(ledger, state, resumed=True)  # the same code
    assert ledger.interventions == []
    before = {"version": "0.1.0", "commit": A}
    ledger.code = before
    with caplog.at_level(logging.WARNING):
        check_code(ledger, state, resumed=True)
    assert ledger.interventions == [{"step": 7, "phase": 1, "changes": {"code": {"from": before, "to": now}}}]
    assert ledger.code == now and Ledger.from_dict(ledger.to_dict()).code == now
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "0.2.0 (commit bbbbbbbbbbbb)" in said[0] and "0.1.0 (commit aaaaaaaaaaaa)" in said[0]
    caplog.clear()
    old = Ledger()  # a checkpoint written before the code was recorded: from an unknown version (the ledger claimed
    with caplog.at_level(logging.WARNING):  # that this code had trained the whole run)
        check_code(old, state, resumed=True)
    assert old.code == now and old.interventions == [{"step": 7, "phase": 1, "changes": {"code": {"from": None,
                                                                                               "to": now}}}]
    assert "the run's checkpoint was written by an earlier version that recorded no code" in caplog.text
    caplog.clear()
    ledger.code = before  # rank 1 of several: recorded, not said (rank 0 says it for all)
    with caplog.at_level(logging.WARNING):
        check_code(ledger, state, resumed=True, say=False)
    assert caplog.records == [] and ledger.interventions[-1]["changes"]["code"]["from"] == before


def test_the_source_digest_sees_any_change_of_the_modules_and_a_record_without_it_goes_by_its_commit(tmp_path,
                                                                                                     monkeypatch):
    """The version number has not changed with the code, and an installed copy has no commit: a digest of the
    package's modules tells two codes apart wherever they run, edits not committed included. A record of an earlier
    version (no source) is judged by its commit, so upgrading to this record is no change of code by itself."""
    from common.system.version import same_code, source_digest

    for package in ("common", "pretrain", "finetune", "tests"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    first = source_digest(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{16}", first) and source_digest(tmp_path) == first
    (tmp_path / "tests" / "a.py").write_text("x = 2\n")  # not the package's
    assert source_digest(tmp_path) == first
    (tmp_path / "finetune" / "a.py").write_text("x = 2\n")
    assert source_digest(tmp_path) != first
    (tmp_path / "finetune" / "a.py").write_text("x = 1\n")
    (tmp_path / "common" / "a.py").rename(tmp_path / "common" / "b.py")  # a file renamed: other code
    assert source_digest(tmp_path) != first
    renamed = source_digest(tmp_path)
    (tmp_path / "common" / ".#b.py").symlink_to("user@host.1234:1700000000")  # an editor's lock: a dangling link
    assert source_digest(tmp_path) == renamed  # (every run stopped with FileNotFoundError while it was there)
    assert code_version()["source"] == source_digest()
    now = {"version": "0.1.0", "commit": A, "source": "1" * 16}
    assert same_code({"version": "0.1.0", "commit": A}, now)  # recorded before the digest: the same commit
    assert not same_code({"version": "0.1.0", "commit": B}, now)
    assert not same_code({"version": "0.1.0", "commit": A, "source": "2" * 16}, now)  # edits not committed
    assert not same_code({"version": "0.1.0", "source": "2" * 16}, {"version": "0.1.0", "source": "1" * 16})
    assert not same_code({"version": "0.1.0"}, {"version": "0.1.0", "source": "1" * 16})  # the version never changed
    assert same_code({"version": "0.1.0", "commit": A, "source": "1" * 16}, now)  # a commit of docs or tests alone


@pytest.mark.slow
def test_a_run_started_by_an_older_version_resumes_and_says_so(tmp_path, synth_corpus, caplog):
    """A run stopped by an older version: its checkpoint's ledger names that code, its recipe.yaml records
    ``train.zero_stage: 0``. Resumed on one rank by a recipe of ``auto`` (which takes 0 there) it is not refused, says
    the code changed, records it in ledger.json, and trains the uninterrupted run's weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(straight, synth_corpus) == 0
    assert json.loads((straight / "ledger.json").read_text())["code"] == code_version()
    assert run(resumed, synth_corpus, stop=2) == 0
    older = {"version": "0.0.9", "commit": A}
    for saved in (resumed / "checkpoints").glob("phase*/trainer_state.json"):
        state = json.loads(saved.read_text())
        assert state["ledger"]["code"] == code_version()
        state["ledger"]["code"] = older
        saved.write_text(json.dumps(state))
    recipe = yaml.safe_load((resumed / "recipe.yaml").read_text())
    assert recipe["train"]["zero_stage"] == "auto"
    recipe["train"]["zero_stage"] = 0
    (resumed / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    with caplog.at_level(logging.WARNING):
        assert run(resumed, synth_corpus) == 0
    assert sum("the run's checkpoint was written by 0.0.9" in r.getMessage() for r in caplog.records) == 1
    ledger = json.loads((resumed / "ledger.json").read_text())
    assert ledger["code"] == code_version()
    assert ledger["interventions"] == [{"step": 2, "phase": 0, "changes": {"code": {"from": older,
                                                                                     "to": code_version()}}}]
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_run_recorded_without_a_version_resumes_and_says_that_an_unknown_version_began_it(tmp_path, synth_corpus):
    """Its ledger named only the resuming code, as if it had trained the whole run (an upgrade review: validation
    scores of two maskings side by side, the report comparing identical models a point apart)."""
    run_dir = tmp_path / "run"
    assert run(run_dir, synth_corpus, stop=2) == 0
    for saved in (run_dir / "checkpoints").glob("phase*/trainer_state.json"):
        state = json.loads(saved.read_text())
        del state["ledger"]["code"]
        saved.write_text(json.dumps(state))
    assert run(run_dir, synth_corpus) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["code"] == code_version()
    assert ledger["interventions"] == [{"step": 2, "phase": 0, "changes": {"code": {"from": None,
                                                                                     "to": code_version()}}}]
