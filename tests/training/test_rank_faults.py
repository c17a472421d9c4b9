"""One rank of a 2- or 3-rank job (gloo) that differs or goes wrong: a recipe or manifest of its own, a failing
or stuck write, a stuck step. Every rank stops with one line that says which rank and why, and a hang fails the
test after the launch's timeout (tests/rank_fault_job.py runs the cases on each rank)."""

import json
import os
import socket
from pathlib import Path

import pytest
from lhotse import CutSet

from tests.helpers import _free_port
from tests.ranks import launch_ranks


def _launch(world_size: int, cases: list[dict], out: Path, corpus: Path, timeout: float) -> dict[str, list[dict]]:
    """Run ``cases`` (tests/rank_fault_job.py) on ``world_size`` gloo ranks; per case, every rank's report."""
    out.mkdir(parents=True)
    for case in cases:
        case.setdefault("port", _free_port())
    job = out / "job.json"
    job.write_text(json.dumps({"out": str(out), "corpus": str(corpus), "cases": cases}))
    launch_ranks(world_size, "rank_fault_job.py", job, out, timeout)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    return {case["name"]: [report[case["name"]] for report in reports] for case in cases}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_rank_with_another_recipe_or_manifest_stops_every_rank_before_training(tmp_path, synth_corpus, world_size):
    """Rank 1 has another learning rate (a --set of its own), then another copy of the training manifest at the
    same (relative) path; on 3 ranks rank 2 also logs otherwise. Without the check the first trained silently
    with two learning rates, and the others hung in mismatched collectives."""
    same, stale = tmp_path / "same", tmp_path / "stale"
    for folder in (same, stale):
        folder.mkdir()
    cuts = CutSet.from_file(synth_corpus / "synth_pool.jsonl.gz")
    cuts.to_file(same / "pool.jsonl.gz")
    CutSet.from_cuts(list(cuts)[:20]).to_file(stale / "pool.jsonl.gz")  # the node's stale copy: 20 of 24 clips
    sets = [f"data.batch_size={4 * world_size}"]
    recipe = {"name": "recipe", "run_dir": str(tmp_path / "recipe"), "sets": sets,
              "rank_sets": {"1": ["optim.lr=0.05"], **({"2": ["train.log_every=3"]} if world_size == 3 else {})}}
    manifest = {"name": "manifest", "run_dir": str(tmp_path / "manifest"),
                "sets": [*sets, "data.train=[{path: pool.jsonl.gz}]"],
                "rank_cwd": {str(r): str(stale if r == 1 else same) for r in range(world_size)}}
    result = _launch(world_size, [recipe, manifest], tmp_path / "job", synth_corpus, timeout=150)

    host = socket.gethostname()
    for name, said in (("recipe", [f"rank 1 (host {host}) resolves optim.lr 0.05 where rank 0 has 0.001"]
                        + ([f"rank 2 (host {host}) resolves train.log_every 3 where rank 0 has 1"]
                           if world_size == 3 else [])),
                       ("manifest", [f"rank 1 (host {host}) resolves manifest pool.jsonl.gz "])):
        ranks = result[name]
        assert [r["code"] for r in ranks] == [2] * world_size, (name, ranks)
        for r in ranks:
            assert len(r["errors"]) == 1 and "Traceback" not in r["stderr"], r["stderr"][-3000:]
            assert all(part in r["errors"][0] for part in said), (said, r["errors"])
            assert "every rank must see the same recipe and manifests" in r["errors"][0]
        assert "rank 2" not in ranks[0]["errors"][0] or world_size == 3
        assert not (tmp_path / name / "checkpoints").exists()  # stopped before anything trained


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_rank_that_waits_for_a_late_one_says_so_and_the_job_goes_on_when_it_comes(tmp_path, synth_corpus,
                                                                                    world_size):
    """The last rank starts 5 s after the others, whose process group's timeout is 20 s: rank 0 sat silent in the
    rendezvous until the others came or the timeout ended it (DEEPSPEED_TIMEOUT: 10 min by default). After a tenth
    of the timeout it says once that it waits, for whom and where; the late rank, once there, trains with it."""
    last = world_size - 1
    case = {"name": "late", "run_dir": str(tmp_path / "run"), "sets": [f"data.batch_size={4 * world_size}"],
            "argv": ["--stop-after-steps", "1"], "delay": {str(last): 5}, "timeout": 20}
    ranks = _launch(world_size, [case], tmp_path / "job", synth_corpus, timeout=150)["late"]
    assert [r["code"] for r in ranks] == [0] * world_size, ranks
    said = [line for line in ranks[0]["stderr"].splitlines() if "waiting for" in line]
    port = case["port"]
    assert said == [f"rank 0 (host {socket.gethostname()}): waiting for the other {last} rank(s) at 127.0.0.1:"
                    f"{port} (MASTER_ADDR:MASTER_PORT) for 2 s now; every rank stops if they have not all come within "
                    f"20 s (DEEPSPEED_TIMEOUT minutes, default 10)"], ranks[0]["stderr"][-3000:]
    for r in ranks[1:]:  # their LOCAL_RANK is not 0 (one host): the first rank of the host speaks for it
        assert "waiting for" not in r["stderr"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_resume_with_a_changed_learning_rate_is_said_once_by_the_rank_that_records_it(tmp_path, synth_corpus):
    """A recovery change (optim.lr) on every rank: rank 0 says that it records it in ledger.json, and does;
    rank 1 does not say so (it records nothing)."""
    run_dir = str(tmp_path / "run")
    cases = [{"name": "first", "run_dir": run_dir, "sets": ["data.batch_size=8"], "argv": ["--stop-after-steps", "2"]},
             {"name": "resume", "run_dir": run_dir, "sets": ["data.batch_size=8", "optim.lr=0.002"]}]
    result = _launch(2, cases, tmp_path / "job", synth_corpus, timeout=240)
    assert [r["code"] for r in result["resume"]] == [0, 0], result["resume"]
    assert "with changed optim.lr 0.001 -> 0.002; recorded in ledger.json" in result["resume"][0]["stderr"]
    assert "recorded in ledger.json" not in result["resume"][1]["stderr"], result["resume"][1]["stderr"]
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert [list(i["changes"]) for i in ledger["interventions"]] == [["optim.lr"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_rank_out_of_disk_while_checkpointing_leaves_the_others_files_and_says_so(tmp_path, synth_corpus,
                                                                                   world_size):
    """Rank 1's share of the second phase's first checkpoint fills the disk: it removes its own files only (it
    removed the whole shared folder while the other ranks still wrote into it: their writes failed with a
    traceback), says that the last checkpoint is intact and what stays, and every other rank says that a rank
    stopped; the same command resumes and finishes, and the folder left is gone."""
    run_dir = tmp_path / "run"
    sets = [f"data.batch_size={4 * world_size}"]
    cases = [{"name": "full", "run_dir": str(run_dir), "sets": sets,
              "fault": {"rank": 1, "kind": "enospc", "where": "phase02"}},
             {"name": "resume", "run_dir": str(run_dir), "sets": sets}]
    result = _launch(world_size, cases, tmp_path / "job", synth_corpus, timeout=240)
    ranks = result["full"]
    assert [r["code"] for r in ranks] == [1] * world_size, ranks
    assert all(len(r["errors"]) == 1 and "Traceback" not in r["stderr"] for r in ranks), [r["stderr"] for r in ranks]
    line = ranks[1]["errors"][0]
    assert line.startswith(f"error: rank 1 (host {socket.gethostname()}): {run_dir / 'checkpoints'}/.tmp-phase02-"
                           f"step000000002: no space left on device"), line
    assert "the last checkpoint phase01-step000000003 is intact" in line, line
    assert ("this rank's part of .tmp-phase02-step000000002 was removed; what the other ranks wrote there stays "
            "until the next start of the run removes it") in line, line
    assert all("another rank of the job stopped" in r["errors"][0] for i, r in enumerate(ranks) if i != 1), ranks
    assert result["resume"][0]["code"] == 0 and [r["code"] for r in result["resume"]] == [0] * world_size
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_read_only_checkpoint_folder_is_said_as_such_on_every_rank(tmp_path, synth_corpus, world_size):
    """No rank can make the second phase's first checkpoint folder (the file system turned read-only): DeepSpeed
    swallowed that and its writes then failed with "Parent directory ... does not exist", a traceback on every
    rank. Each rank now says in one line which folder is read-only and that the last checkpoint is intact."""
    run_dir = tmp_path / "run"
    cases = [{"name": "ro", "run_dir": str(run_dir), "sets": [f"data.batch_size={4 * world_size}"],
              "fault": {"rank": "all", "kind": "readonly", "where": "phase02"}}]
    ranks = _launch(world_size, cases, tmp_path / "job", synth_corpus, timeout=240)["ro"]
    assert [r["code"] for r in ranks] == [1] * world_size, ranks
    for r in ranks:
        assert len(r["errors"]) == 1 and "Traceback" not in r["stderr"], r["stderr"][-3000:]
        assert r["errors"][0].endswith(
            f"{run_dir / 'checkpoints'}: read-only file system: checkpoint phase02-step000000002 could not be written "
            f"there; the last checkpoint phase01-step000000003 is intact (make the folder writable and run the same "
            f"command to resume)"), r["errors"]
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "phase01-step000000003"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_stuck_rank_ends_the_others_after_the_process_groups_timeout_with_one_line(tmp_path, synth_corpus,
                                                                                     world_size):
    """Rank 1's first micro-step takes 14 s (a read that never returns) and the process group's timeout is 3 s:
    rank 0 waits in ZeRO's gradient reduction, in DeepSpeed's clone of the world group, which had torch's default
    30 min (gloo) whatever the timeout, and then ended with gloo's traceback. Now it stops after the timeout with
    one line, and the stuck rank, once back, finds the others gone."""
    cases = [{"name": "stuck", "run_dir": str(tmp_path / "run"), "sets": [f"data.batch_size={4 * world_size}"],
              "fault": {"rank": 1, "kind": "hang", "seconds": 14}, "timeout": 3}]
    ranks = _launch(world_size, cases, tmp_path / "job", synth_corpus, timeout=200)["stuck"]
    assert [r["code"] for r in ranks] == [1] * world_size, ranks
    assert all(len(r["errors"]) == 1 and "Traceback" not in r["stderr"] for r in ranks), [r["stderr"] for r in ranks]
    assert ranks[0]["errors"][0].startswith(
        f"error: rank 0 (host {socket.gethostname()}): no word from the other ranks for 3 s ("), ranks[0]["errors"]
    assert "a rank is stuck" in ranks[0]["errors"][0] and "DEEPSPEED_TIMEOUT" in ranks[0]["errors"][0]
    assert ranks[0]["seconds"] < 12  # the timeout ended it, not the stuck rank's return
    for r in ranks[1:]:
        assert "no word from the other ranks" in r["errors"][0] or "another rank of the job stopped" in r["errors"][0]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_the_failing_ranks_cause_is_kept_in_the_run_directory_and_every_line_names_its_rank(tmp_path, synth_corpus,
                                                                                            world_size):
    """The last rank fails unexpectedly (a traceback on its own console only, maybe on another node): its
    traceback is kept in RUN/logs/rankR.err, every other rank's line names its rank and host and says where to
    look, and keeps that line in its own file."""
    run_dir, last = tmp_path / "run", world_size - 1
    cases = [{"name": "bug", "run_dir": str(run_dir), "sets": [f"data.batch_size={4 * world_size}"],
              "fault": {"rank": last, "kind": "raise"}}]
    ranks = _launch(world_size, cases, tmp_path / "job", synth_corpus, timeout=240)["bug"]
    host = socket.gethostname()
    assert ranks[last]["code"] == "raised" and [r["code"] for r in ranks[:last]] == [1] * last, ranks
    kept = (run_dir / "logs" / f"rank{last}.err").read_text()
    assert "Traceback" in kept and "RuntimeError: injected failure" in kept, kept
    for rank, r in enumerate(ranks[:last]):
        assert len(r["errors"]) == 1 and r["errors"][0].startswith(
            f"error: rank {rank} (host {host}): another rank of the job stopped ("), r["errors"]
        assert r["errors"][0].endswith(f"its error says why ({run_dir / 'logs'}/rank*.err)"), r["errors"]
        assert (run_dir / "logs" / f"rank{rank}.err").read_text().endswith(r["errors"][0] + "\n")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_resume_on_ranks_that_cannot_split_the_runs_batch_says_on_which_it_can_go_on(tmp_path, synth_corpus):
    """A run of global batch 8 on 2 ranks, resumed on 3: the run cannot go on there, and the line says so and
    lists the counts it can go on with. It offered another global batch, which the resume then refused."""
    run_dir = tmp_path / "run"
    first = [{"name": "first", "run_dir": str(run_dir), "sets": ["data.batch_size=8"],
              "argv": ["--stop-after-steps", "2"]}]
    assert [r["code"] for r in _launch(2, first, tmp_path / "job2", synth_corpus, timeout=200)["first"]] == [0, 0]
    resume = [{"name": "resume", "run_dir": str(run_dir), "sets": ["data.batch_size=8"]}]
    ranks = _launch(3, resume, tmp_path / "job3", synth_corpus, timeout=200)["resume"]
    assert [r["code"] for r in ranks] == [2] * 3, ranks
    for r in ranks:
        assert len(r["errors"]) == 1 and "Traceback" not in r["stderr"], r["stderr"]
        assert (f"{run_dir} holds a run whose global batch of 8 clips (data.batch_size) does not split over 3 "
                f"rank(s): the run cannot go on with 3 rank(s)") in r["errors"][0], r["errors"]
        assert "resume it on 1, 2, 4, 8 rank(s)" in r["errors"][0] and "--set data.batch_size" not in r["errors"][0]


def test_the_ranks_compare_a_tasks_manifests_where_its_loaders_open_them(tmp_path):
    """A fine-tuning task's manifests and class list sit under its ``data_root``: the ranks' check fingerprints those
    files (it looked them up under the working folder, found nothing on any rank and compared nothing), and a rank
    whose copy differs is named."""
    from common.data.corpora import get_corpus
    from common.training.same_inputs import _differences, resolved_inputs
    from finetune.recipe import load_recipe
    from tests.layouts import esc50 as layout

    src = tmp_path / "src"
    layout.build(src, clips_per_fold=1)
    get_corpus("esc50").prepare(src, tmp_path / "data" / "esc50", num_jobs=1)
    recipe = load_recipe("esc50", data_root=str(tmp_path / "data"))
    mine = resolved_inputs(recipe)
    assert len(mine["manifests"]) == 6 and all(mine["manifests"].values())  # 5 folds and the class list
    fold = next(p for p in mine["manifests"] if p.endswith("esc50_fold2.jsonl.gz"))
    stale = {**mine, "manifests": {**mine["manifests"], fold: {**mine["manifests"][fold], "content_sha256": "x"}}}
    assert any("esc50_fold2.jsonl.gz" in line for line in _differences(stale, mine))


def _run_dir_rank(root: str, case: str, dist) -> dict:
    """One rank of test_ranks_given_other_run_directories_stop_before_training: its run directory is the job's, or
    (``apart``) every rank but 0 has one of its own, as ranks of two jobs joined on one port have, or (``full``)
    rank 0 cannot write into it."""
    import errno
    import pathlib

    from common.training.same_inputs import MARK, RanksDisagree, check_same_run_dir

    run_dir = Path(root) / (f"own{dist.rank}" if case == "apart" and dist.rank else "run")
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        old, live = run_dir / f"{MARK}0123456789abcdef", run_dir / f"{MARK}fedcba9876543210"
        for mark in (old, live):
            mark.write_text("a killed job's, and one a job on a file system without locks has just written\n")
        os.utime(old, (0, 0))
    real = pathlib.Path.write_text
    if case == "full" and dist.is_main:
        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        pathlib.Path.write_text = full
    try:
        check_same_run_dir(dist, run_dir, wait_s=0.5)
        error = None
    except (RanksDisagree, OSError) as err:
        error = f"{type(err).__name__}: {err}"
    finally:
        pathlib.Path.write_text = real
    dist.barrier()
    return {"error": error, "left": sorted(p.name for p in run_dir.iterdir())}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["same", "apart", "full"])
def test_ranks_given_other_run_directories_stop_before_training(tmp_path, world, case):
    """Every rank must see rank 0's run directory (rank 0 measures the files the others write into it at every
    checkpoint): ranks given folders of their own (two jobs joined on one port, a node-local disk) all stop at the
    start with one line naming them, where they trained until the first checkpoint; the ranks of one folder go
    on, the file the check wrote is gone, and so is one a killed job left (not one a minute old). Rank 0 unable to
    write into its folder stops every rank, none waiting."""
    import functools

    from common.training.same_inputs import MARK
    from tests.ranks import spawn_ranks

    results = spawn_ranks(functools.partial(_run_dir_rank, str(tmp_path / "dirs"), case), world, tmp_path)
    assert results[0]["left"] == [f"{MARK}fedcba9876543210"], results  # rank 0's folder: its live mark only
    if case == "same":
        assert [r["error"] for r in results] == [None] * world
        return
    if case == "full":
        assert results[0]["error"].startswith("OSError: [Errno 28] No space left on device"), results
        said = f"({results[0]['error'].removeprefix('OSError: ')}); nothing was trained"
        assert all(r["error"] == f"RanksDisagree: rank 0 cannot write into its run directory "
                                 f"{tmp_path / 'dirs' / 'run'} {said}" for r in results[1:]), results
        return
    errors = {r["error"] for r in results}
    assert len(errors) == 1 and None not in errors, errors  # every rank stops, with the same line
    error = errors.pop().removeprefix("RanksDisagree: ")
    blind = "; ".join(f"rank {r} (host {socket.gethostname()}, --run-dir {tmp_path / 'dirs' / f'own{r}'})"
                      for r in range(1, world))
    assert error.startswith(f"{blind} cannot see the file rank 0 (host {socket.gethostname()}) wrote into its run "
                            f"directory {tmp_path / 'dirs' / 'run'}: every rank must be given one folder"), error
    assert "(MASTER_PORT)" in error and error.endswith("nothing was trained")
