"""Phase-transition criteria on hand-made sequences, their bounds, state and recipe checks; then through the
trainer: the switch step, the ledger's record, exact resume mid-criterion, and the collective decision."""

import json
from pathlib import Path

import pytest
import torch

from common.criteria import (
    Efficiency,
    LossSlope,
    PhaseEnd,
    Plateau,
    UntilConfig,
    check_schedule,
    describe_ends,
)
from common.phases import PhaseConfig
from common.recipe import RecipeError, build
from common.trainer import Trainer
from pretrain.run import main
from tests.test_pretrain import RECIPE, run, tiny, weights


def first_true(criterion, values) -> int | None:
    """The 1-based check at which ``criterion.update`` first says True."""
    for i, value in enumerate(values, 1):
        if criterion.update(*value) if isinstance(value, tuple) else criterion.update(value):
            return i
    return None


# ------------------------------------------------------------------------------------- the criteria
def test_plateau_ends_after_patience_checks_without_a_gain_of_min_delta():
    scores = [0.10, 0.30, 0.35, 0.34, 0.36, 0.355, 0.50]
    # best .10 -> .30 -> .35; .34 is worse (1), .36 is better but by less than .02 (2): ends at check 5
    assert first_true(Plateau(patience=2, min_delta=0.02), scores) == 5
    # without min_delta .36 is a gain: .355 (1), .50 resets; never two in a row
    assert first_true(Plateau(patience=2), scores) is None
    assert first_true(Plateau(patience=1), scores) == 4


def test_efficiency_ends_when_the_gain_per_flop_falls_below_the_next_phase_estimate():
    flops = [1e9, 2e9, 3e9, 4e9, 5e9, 6e9]
    scores = [0.10, 0.30, 0.50, 0.60, 0.65, 0.67]
    # least-squares slopes over 3 checks (per 1e9 FLOPs): .20 (peak), .15, .075, .035; the next phase's
    # estimate is peak x F_cur / F_next = .20 x .25 = .05: .035 < .05 at check 6
    crit = Efficiency(window=2, fraction=1.0, cost_ratio=0.25)
    assert first_true(crit, list(zip(scores, flops))) == 6
    assert crit.peak == pytest.approx(0.2e-9) and crit.slope == pytest.approx(0.035e-9)
    # fraction 2 doubles the bar (.10): .075 < .10 at check 5
    assert first_true(Efficiency(window=2, fraction=2.0, cost_ratio=0.25), list(zip(scores, flops))) == 5
    # a score that falls ends the phase as soon as the window is full
    assert first_true(Efficiency(window=1, fraction=1.0, cost_ratio=0.25), [(0.5, 1.0), (0.4, 2.0)]) == 2


def test_loss_slope_ends_when_the_smoothed_loss_stops_falling():
    losses = [2.0, 1.5, 1.2, 1.1, 1.08, 1.07, 1.0]
    # no smoothing, window 1: relative decreases .25, .20, .083, .018 (flat 1), .009 (flat 2) -> check 6
    crit = LossSlope(window=1, threshold=0.05, smoothing=0.0, patience=2)
    assert first_true(crit, losses) == 6
    assert crit.decrease == pytest.approx(0.01 / 1.08)
    # smoothing 0.5: EMA 2, 1.75, 1.475, 1.2875, 1.18375, 1.126875; decreases over 2 checks per check:
    # (2-1.475)/4 = .131, (1.75-1.2875)/3.5 = .132, (1.475-1.18375)/2.95 = .0987, (1.2875-1.126875)/2.575 = .0624
    crit = LossSlope(window=2, threshold=0.07, smoothing=0.5, patience=1)
    assert first_true(crit, losses) == 6
    assert crit.smoothed[-1] == pytest.approx(1.126875)


def test_bounds_min_max_and_the_surpass_rule():
    until = UntilConfig(criterion="plateau", patience=1, min=3, max=6)
    end = PhaseEnd(until, length=4, unit="epochs")
    assert end.max_length == 6
    decisions = [end.observe(at, score=s) for at, s in enumerate([0.5, 0.4, 0.3, 0.2], 1)]
    assert decisions[:2] == [None, None]  # met at epoch 2 already, but not before min = 3
    assert decisions[2].reason == "plateau" and decisions[2].at == 3
    end = PhaseEnd(UntilConfig(criterion="plateau", patience=5), length=4, unit="epochs")
    for at in range(1, 5):
        assert end.observe(at, score=0.1 * at) is None
    assert (end.end_reason(4).reason, end.max_length) == ("cap", 4)
    # the final phase stops at the first score strictly above the target, capped by max
    end = PhaseEnd(UntilConfig(max=8), length=4, unit="epochs", target=0.5, target_source="runs/base")
    assert [end.observe(at, score=s) for at, s in enumerate([0.4, 0.5], 1)] == [None, None]
    surpassed = end.observe(3, score=0.51)
    assert surpassed.reason == "surpassed" and surpassed.at == 3 and "runs/base" in surpassed.note
    # both at once (after min): the paper's rule is the reason given
    end = PhaseEnd(UntilConfig(criterion="plateau", patience=1, min=2), length=4, unit="epochs", target=0.5)
    assert end.observe(1, score=0.6) is None and end.observe(2, score=0.55).reason == "surpassed"
    fixed = PhaseEnd(None, length=4, unit="steps")
    assert not fixed.adaptive and fixed.end_reason(4).reason == "length"


def test_the_state_round_trips_through_json_mid_criterion():
    def make():
        return PhaseEnd(UntilConfig(criterion="loss", window=2, threshold=0.05, patience=2), 100, "steps")

    straight, first = make(), make()
    losses = [2.0, 1.6, 1.5, 1.49, 1.48, 1.475]
    for i, value in enumerate(losses[:3]):
        for end in (straight, first):
            end.add_loss(value)
            end.add_loss(torch.tensor(value))
            end.observe(10 * (i + 1), loss=end.pending_loss()[0] / end.pending_loss()[1])
    first.add_loss(9.0)  # a pending loss not yet checked travels too
    straight.add_loss(9.0)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.pending_loss() == (9.0, 1)
    for i, value in enumerate(losses[3:], 3):
        for end in (straight, resumed):
            end.add_loss(value)
            total, n = end.pending_loss()
            end.observe(10 * (i + 1), loss=total / n)
    assert straight.decision is not None and resumed.decision == straight.decision
    assert resumed.state_dict() == straight.state_dict()


# ---------------------------------------------------------------------------------- recipe checks
@pytest.mark.parametrize("until,message", [
    ({"criterion": "plateau", "fraction": 0.5}, "until.fraction: not used by criterion 'plateau'"),
    ({"criterion": "plateau", "min": 5, "max": 3}, "until.max must be >= 1 and >= until.min"),
    ({"criterion": "ridge"}, "until.criterion: expected one of"),
    ({"criterion": "plateau", "patiense": 2}, "until.patiense: unknown key"),
    ({"criterion": "plateau", "max": 3}, "planned length \\(4\\) must lie within"),
])
def test_bad_until_sections_name_the_key(until, message):
    with pytest.raises(RecipeError, match=message):
        build(PhaseConfig, {"compression": "none", "epochs": 4, "until": until}, "phases.0")


def test_schedule_checks_span_phases_and_the_train_section():
    coarse = PhaseConfig("fshift", 4, epochs=2, until=UntilConfig(criterion="efficiency"))
    final = PhaseConfig("none", 1, epochs=6)
    check_schedule([coarse, final], None, True)
    with pytest.raises(ValueError, match="phases.1.until.criterion: efficiency compares with the next phase"):
        check_schedule([final, PhaseConfig("none", 1, epochs=6, until=UntilConfig(criterion="efficiency"))], None, True)
    with pytest.raises(ValueError, match="phases.0.until.criterion: efficiency reads the validation score"):
        check_schedule([coarse, final], None, False)
    capped = PhaseConfig("none", 1, epochs=6, until=UntilConfig(max=10))
    with pytest.raises(ValueError, match="phases.1.until: no criterion.*train.stop_when_surpassing"):
        check_schedule([coarse, capped], None, True)
    check_schedule([coarse, capped], "runs/base", True)
    with pytest.raises(ValueError, match="train.weight_average_from"):
        check_schedule([coarse, capped], "runs/base", True, weight_average_from=2)
    steps = [PhaseConfig("fshift", 4, steps=50, until=UntilConfig(criterion="plateau", max=80)), PhaseConfig(steps=9)]
    check_schedule(steps, None, True, eval_every=80)
    with pytest.raises(ValueError, match="phases.0.until: the phase is judged every train.eval_every = 100 steps"):
        check_schedule(steps, None, True, eval_every=100)
    lines = describe_ends([coarse, capped], "runs/base")
    assert lines[0].startswith("phase1 (fshift x4): ends at efficiency (window 2, fraction 1.0), after 0 to 2 epochs")
    assert "the first evaluation above the best of runs/base, after 0 to 10 epochs (planned 6)" in lines[1]


# ------------------------------------------------------------------------------ through the trainer
def scripted(monkeypatch, table: dict, fail_at: tuple | None = None):
    """Validation returns ``table[(phase, step or epoch)]`` (the same score when a resume re-runs it);
    ``fail_at``: raise once at that key, as a crash during the validation."""
    failed = []

    def evaluate(self, model, index):
        st = self.state
        key = (index, st.step if self.spec.phases[index].iteration_based else st.epoch_in_phase)
        if key == fail_at and not failed:
            failed.append(key)
            raise RuntimeError("validation broke")
        return {self.objective.score_name: table.get(key, 0.0)}

    monkeypatch.setattr(Trainer, "_evaluate", evaluate)


PLATEAU = "phases.0.until={criterion: plateau, patience: 2, max: 8}"
SCORES = {(0, s): v for s, v in enumerate([0.1, 0.3, 0.3, 0.29, 0.5, 0.5, 0.5, 0.5], 1)}


def ledger(run_dir: Path) -> dict:
    return json.loads((run_dir / "ledger.json").read_text())


@pytest.mark.parametrize("bounds,step,reason", [("max: 8", 4, "plateau"), ("min: 5, max: 8", 7, "plateau"),
                                                ("min: 5, max: 6", 6, "cap")])
def test_a_plateau_ends_the_coarse_phase_at_the_step_the_scores_imply(tmp_path, synth_corpus, monkeypatch,
                                                                       bounds, step, reason):
    # scores .1 .3 .3 .29 | .5 .5 .5: two checks without a gain at step 4; from step 5 on, at step 7
    scripted(monkeypatch, SCORES)
    assert run(tmp_path / "r", synth_corpus, f"phases.0.until={{criterion: plateau, patience: 2, {bounds}}}",
               "train.eval_every=1", "train.save_every=100", steps=(6, 2)) == 0
    p1, p2 = ledger(tmp_path / "r")["phases"]
    assert (p1["steps"], p1["ended_by"], p1["ended_at"]["step"]) == (step, reason, step)
    assert p1["ended_at"]["train_flops"] == p1["train_flops"]
    assert (p2["steps"], p2["ended_by"]) == (2, "length")


def test_a_run_interrupted_while_a_criterion_is_pending_resumes_to_the_same_switch_and_weights(
        tmp_path, synth_corpus, monkeypatch):
    sets = (PLATEAU, "train.eval_every=1", "train.save_every=100")
    scripted(monkeypatch, SCORES)
    straight = tmp_path / "straight"
    assert run(straight, synth_corpus, *sets, steps=(6, 2)) == 0
    # stopped at step 3, before its check (the first without a gain): the criterion's state is checkpointed
    stopped = tmp_path / "stopped"
    assert run(stopped, synth_corpus, *sets, steps=(6, 2), stop=3) == 0
    state = json.loads((stopped / "checkpoints" / "phase01-step000000003" / "trainer_state.json").read_text())
    assert state["state"]["until"]["criterion"] == {"best": 0.3, "bad": 0}  # saved before step 3's validation
    assert run(stopped, synth_corpus, *sets, steps=(6, 2)) == 0
    # crashed in the validation that decides (step 4): the resume re-runs it and ends the phase there
    scripted(monkeypatch, SCORES, fail_at=(0, 4))
    crashed = tmp_path / "crashed"
    every = (PLATEAU, "train.eval_every=1", "train.save_every=1")
    with pytest.raises(RuntimeError, match="validation broke"):
        main(["--recipe", str(RECIPE), "--run-dir", str(crashed), *tiny(synth_corpus, *every, steps=(6, 2))])
    assert json.loads((crashed / "checkpoints" / "phase01-step000000004" / "trainer_state.json").read_text()
                      )["state"]["pending_eval"]
    assert run(crashed, synth_corpus, *every, steps=(6, 2)) == 0
    a = weights(straight)
    for other in (stopped, crashed):
        assert [(p["steps"], p["ended_by"]) for p in ledger(other)["phases"]] == [(4, "plateau"), (2, "length")]
        b = weights(other)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["metrics"] for e in ledger(straight)["evals"]] == [e["metrics"] for e in ledger(crashed)["evals"]]


def test_efficiency_switches_where_the_scripted_gain_flattens(tmp_path, synth_corpus, monkeypatch):
    # slopes per step over 3 checks: .1 (peak) at step 3, .05 at 4, 0 at 5; the bar is .1 x F4/F1 < .05
    scripted(monkeypatch, {(0, s): v for s, v in enumerate([0.1, 0.2, 0.3, 0.3, 0.3, 0.3], 1)})
    assert run(tmp_path / "r", synth_corpus, "phases.0.until={criterion: efficiency, window: 2, max: 6}",
               "train.eval_every=1", "train.save_every=100", steps=(4, 1)) == 0
    p1 = ledger(tmp_path / "r")["phases"][0]
    assert (p1["steps"], p1["ended_by"]) == (5, "efficiency") and "FLOPs ratio" in p1["end_note"]


def test_the_loss_criterion_ends_a_phase_of_a_run_without_validation_set(tmp_path, synth_corpus):
    # a threshold no loss can meet: flat at the first full window (the second check, step 2)
    assert run(tmp_path / "r", synth_corpus, "data.valid=[]", "train.eval_every=1", "train.save_every=100",
               "phases.0.until={criterion: loss, window: 1, patience: 1, threshold: 1.0, max: 5}",
               steps=(3, 1)) == 0
    data = ledger(tmp_path / "r")
    assert [(p["steps"], p["ended_by"]) for p in data["phases"]] == [(2, "loss"), (1, "length")]
    assert data["evals"] == []



def _rank(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: each rank sees its own losses; a rank alone would decide differently."""
    import os

    import torch.distributed as torch_dist

    from common.distributed import Dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    dist = Dist(rank, 2, rank, torch.device("cpu"))
    end = PhaseEnd(UntilConfig(criterion="loss", window=1, threshold=0.1, smoothing=0.0, patience=1), 10, "steps")
    # rank 0: 2.0 -> 1.95 (flat), rank 1: 2.0 -> 1.0; the mean over both, 2.0 -> 1.475, is still falling
    # at step 2; the means at step 3 (1.4, -5 %) are flat
    losses = {0: [2.0, 1.95, 1.9], 1: [2.0, 1.0, 0.9]}[rank]
    decided = []
    for step, loss in enumerate(losses, 1):
        end.add_loss(loss)
        decided.append(end.check(dist, step, None, 0.0) is not None)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"decided": decided, "state": end.state_dict()}))
    torch_dist.destroy_process_group()


def test_every_rank_takes_rank_0s_decision_on_the_losses_of_all_ranks(tmp_path):
    import torch.multiprocessing as mp

    from tests.test_pretrain import _free_port

    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]
    assert results[0]["decided"] == [False, False, True]
    assert results[0]["state"]["criterion"]["smoothed"] == pytest.approx([1.475, 1.4])
