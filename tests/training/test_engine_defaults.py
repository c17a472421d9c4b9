"""The engine's ZeRO defaults (``common.system.engine_config``): none on one rank; on several, ZeRO-1 with the
reduction overlapped with the backward pass and 5e7-element buckets; a recipe's explicit values win. Checked
on the engine DeepSpeed actually built, at 1 rank in-process and at 2 and 3 ranks on gloo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.system.engine_config import ZERO_BUCKET, resolve_zero_stage, zero_config
from tests.helpers import _free_port, _micro_step_trainer
from tests.ranks import launch_ranks

pytestmark = pytest.mark.slow  # end-to-end: every test here trains, launches or exports

ROOT = Path(__file__).resolve().parents[2]
CASES = {
    "default": {},
    "stage0": {"zero_stage": 0},
    "stage2 no overlap": {"zero_stage": 2, "zero_overlap_comm": False, "zero_bucket_size": 1_000_000},
    "stage0 clip": {"zero_stage": 0},
    "stage1 clip": {"zero_stage": 1},
}
OPTIM = {"stage0 clip": {"grad_clip": 1e-3}, "stage1 clip": {"grad_clip": 1e-3}}  # far below the norm: the clip acts


def test_resolution_and_the_section():
    assert [resolve_zero_stage("auto", n) for n in (1, 2, 3)] == [0, 1, 1]
    assert resolve_zero_stage("auto", 2, saved=0) == 0 and resolve_zero_stage("auto", 1, saved=1) == 1  # a resume
    assert resolve_zero_stage(2, 1, saved=1) == 2  # an explicit value wins
    assert zero_config(0, 4) == {"stage": 0}
    assert zero_config(1, 2) == {"stage": 1, "overlap_comm": True, "reduce_bucket_size": ZERO_BUCKET,
                                 "allgather_bucket_size": ZERO_BUCKET, "contiguous_gradients": True,
                                 "compute_grad_norm": False}
    assert zero_config(1, 1)["overlap_comm"] is False and zero_config(2, 3, False, 7)["reduce_bucket_size"] == 7
    # no gradient norm (read on the host every step) unless clipping needs it
    assert zero_config(1, 2)["compute_grad_norm"] is False and "compute_grad_norm" not in zero_config(1, 2, grad_clip=1)


def test_one_rank_runs_without_zero_unless_the_recipe_asks(tmp_path):
    trainer, engine, _ = _micro_step_trainer(tmp_path, "ssast", accum=1)
    assert (trainer.zero_stage, engine.zero_optimization_stage()) == (0, 0)
    assert not engine.enable_backward_allreduce  # nothing to reduce on one rank


def launch_cases(world_size: int, out: Path, timeout: float = 180) -> list[dict]:
    out.mkdir(parents=True)
    job = out / "job.json"
    job.write_text(json.dumps({"out": str(out), "cases": {k: {"train": v, "optim": OPTIM.get(k, {})}
                                                            for k, v in CASES.items()}}))
    launch_ranks(world_size, "engine_job.py", job, out, timeout, MASTER_PORT=str(_free_port()))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_several_ranks_overlap_the_reduction_in_model_sized_buckets(tmp_path, world_size):
    ranks = launch_cases(world_size, tmp_path / "job")
    for name in CASES:  # every rank built the same engine and took the same step
        assert len({json.dumps(r[name], sort_keys=True) for r in ranks}) == 1, (name, ranks)
    got = ranks[0]
    assert {k: got["default"][k] for k in ("stage", "trainer_stage", "overlap_comm", "optimizer_overlaps",
                                           "reduce_bucket_size", "allgather_bucket_size")} == {
        "stage": 1, "trainer_stage": 1, "overlap_comm": True, "optimizer_overlaps": True,
        "reduce_bucket_size": int(5e7), "allgather_bucket_size": int(5e7)}
    assert (got["stage0"]["stage"], got["stage0"]["trainer_stage"]) == (0, 0)
    assert {k: got["stage2 no overlap"][k] for k in ("stage", "overlap_comm", "optimizer_overlaps",
                                                     "reduce_bucket_size")} == {
        "stage": 2, "overlap_comm": False, "optimizer_overlaps": False, "reduce_bucket_size": 1_000_000}
    # without ZeRO, step_engine clips the gradient the ranks averaged, once, before the optimiser steps
    clip = got["stage0 clip"]
    assert (clip["stage"], clip["reduced_is_mean"], clip["reduced_over_clip"], clip["stepped_is_clipped"]) == \
        (0, True, True, True), clip
    assert clip["stepped_norm"] == pytest.approx(1.0, abs=1e-3)
    # no step waits for the device: no tensor read on the host in the backward pass or the optimiser step, with
    # ZeRO-1 / 2 too (no gradient norm computed); only ZeRO's own clip reads its norm (documented)
    assert {name: got[name]["host_reads"] for name in ("default", "stage0", "stage2 no overlap", "stage0 clip")} == \
        dict.fromkeys(("default", "stage0", "stage2 no overlap", "stage0 clip"), [])
    assert got["stage1 clip"]["stage"] == 1 and got["stage1 clip"]["host_reads"]
