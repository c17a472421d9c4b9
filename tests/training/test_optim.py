"""The learning-rate schedules, step by step, and their state round trip."""

import math

import pytest
import torch

from common.training.optim import LRSchedule, OptimConfig, param_groups


def schedule(total=None, **cfg) -> LRSchedule:
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    groups = [{"params": params[:1], "lr_scale": 1.0}, {"params": params[1:], "lr_scale": 0.5}]
    optimizer = torch.optim.SGD(groups, lr=1.0)
    return LRSchedule(optimizer, OptimConfig(**cfg), lr=1e-3, total_steps=total)


def lrs(sched: LRSchedule, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        sched.step()
    return out


def test_linear_warmup_reaches_the_peak_and_scales_the_head_group():
    s = schedule(warmup_steps=4, schedule="constant")
    assert lrs(s, 6) == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert s.get_last_lr() == pytest.approx([1e-3, 5e-4])  # the head's lr_scale


def test_the_used_learning_rate_is_the_last_steps_not_the_next_ones():
    s = schedule(warmup_steps=4, schedule="constant")
    assert s.used_lr() == pytest.approx(2.5e-4)  # before the first step: the first step's
    s.step()
    assert s.used_lr() == pytest.approx(2.5e-4) and s.get_last_lr()[0] == pytest.approx(5e-4)
    s.step()
    assert s.used_lr() == pytest.approx(5e-4)


def test_plateau_halves_after_patience_rounds_without_improvement():
    s = schedule(warmup_steps=0, schedule="plateau", patience=2, decay=0.5)
    decays = [s.report(score) for score in (0.1, 0.2, 0.2, 0.15, 0.19, 0.3, 0.3, 0.3, 0.3)]
    # best 0.2 at round 2; rounds 3, 4 and 5 do not improve: the third one decays (patience 2)
    assert decays == [False, False, False, False, True, False, False, False, True]
    assert s.get_last_lr()[0] == pytest.approx(2.5e-4)


def test_plateau_decides_as_torchs_reduce_lr_on_plateau():
    """SSAST steps torch's ReduceLROnPlateau(mode="max", factor=0.5, patience=2) on its validation score: the
    same rounds decay here, also where a score beats the best by less than its relative threshold (1e-4)."""
    scores = [0.5, 0.50001, 0.50002, 0.50003, 0.6, 0.6, 0.60001, 0.6, 0.7, 0.50004, 0.69, 0.7001]
    s = schedule(warmup_steps=0, schedule="plateau", patience=2, decay=0.5)
    ours = [s.report(score) for score in scores]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    theirs = []
    for score in scores:
        before = optimizer.param_groups[0]["lr"]
        reference.step(score)
        theirs.append(optimizer.param_groups[0]["lr"] < before)
    assert ours == theirs and sum(ours) >= 2


def test_multistep_decays_from_decay_start_every_decay_every_rounds():
    s = schedule(warmup_steps=0, schedule="multistep", decay_start=2, decay_every=2, decay=0.5)
    decays = [s.report(0.0) for _ in range(6)]
    assert decays == [False, True, False, True, False, True]
    assert s.get_last_lr()[0] == pytest.approx(1e-3 / 8)


def test_cosine_goes_from_the_peak_to_min_lr_over_the_phase():
    s = schedule(total=12, warmup_steps=2, schedule="cosine", min_lr=1e-5)
    values = lrs(s, 13)
    assert values[:2] == pytest.approx([5e-4, 1e-3])
    assert values[2] == pytest.approx(1e-3)
    mid = 2 + 5  # half-way through the 10 post-warm-up steps
    assert values[mid] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[12] == pytest.approx(1e-5)


def test_state_round_trip_resumes_the_same_learning_rates():
    a = schedule(warmup_steps=3, schedule="plateau", patience=0)
    lrs(a, 5)
    a.report(0.5)
    a.report(0.4)  # decays
    b = schedule(warmup_steps=3, schedule="plateau", patience=0)
    b.load_state_dict(a.state_dict())
    assert b.get_last_lr() == pytest.approx(a.get_last_lr())
    assert lrs(a, 3) == pytest.approx(lrs(b, 3))
    assert a.report(0.45) == b.report(0.45)


def test_param_groups_split_the_head_only_when_asked():
    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 1)})
    assert len(param_groups(model)) == 1
    groups = param_groups(model, ("head.",), 10.0)
    assert [len(g["params"]) for g in groups] == [2, 2] and groups[1]["lr_scale"] == 10.0


def test_piecewise_follows_its_table_by_validation_round():
    table = ((0, 0.02), (1, 0.05), (2, 0.1), (11, 0.05), (21, 0.02), (31, 0.03))  # HTS-AT's LambdaLR
    s = schedule(warmup_steps=0, schedule="piecewise", piecewise=table)
    seen = []
    for epoch in range(33):
        seen.append(s.get_last_lr()[0])
        s.report(0.0)
    expected = [0.02, 0.05] + [0.1] * 9 + [0.05] * 10 + [0.02] * 10 + [0.03] * 2
    assert seen == pytest.approx([1e-3 * f for f in expected])


@pytest.mark.parametrize("kw,message", [
    ({"schedule": "piecewise"}, "from round 0"),
    ({"schedule": "piecewise", "piecewise": ((1, 0.5),)}, "from round 0"),
    ({"schedule": "piecewise", "piecewise": ((0, 1.0), (0, 0.5))}, "increasing"),
    ({"schedule": "multistep", "piecewise": ((0, 1.0),)}, "schedule is 'multistep'"),
    ({"schedule": "piecewise", "piecewise": ((0, 0.0),)}, "positive"),
])
def test_piecewise_tables_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**kw)


@pytest.mark.parametrize("kind", ["plateau", "multistep"])
def test_plateau_and_multistep_decay_no_lower_than_min_lr(kind):
    """min_lr floors the decaying schedules: a decay that would go below it stops there and is no decay once the
    floor holds; the default 0 sets no floor, and a floor above the phase's peak leaves the peak."""
    settings = dict(warmup_steps=0, schedule=kind, patience=0, decay=0.5, decay_start=1, decay_every=1)
    scores = [0.5] * 6  # never improves: a plateau decays every round after the first, multistep every round
    floored = schedule(min_lr=3e-4, **settings)
    decays = [floored.report(score) for score in scores]
    assert floored.get_last_lr() == pytest.approx([3e-4, 1.5e-4])  # 1e-3 -> 5e-4 -> 3e-4; the head keeps its scale
    assert sum(decays) == 2
    free = schedule(**settings)
    assert sum(free.report(score) for score in scores) == (5 if kind == "plateau" else 6)
    above = schedule(min_lr=1.0, **settings)
    assert not any(above.report(score) for score in scores) and above.get_last_lr()[0] == pytest.approx(1e-3)


def test_a_plateau_floor_is_torchs_min_lr():
    """The learning rates a plateau schedule with min_lr gives, round by round, are torch's ReduceLROnPlateau's
    with the same min_lr."""
    scores = [0.5, 0.5, 0.4, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7]
    s = schedule(warmup_steps=0, schedule="plateau", patience=1, decay=0.5, min_lr=2e-4)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=1,
                                                           min_lr=2e-4)
    ours, theirs = [], []
    for score in scores:
        s.report(score)
        reference.step(score)
        ours.append(s.get_last_lr()[0])
        theirs.append(optimizer.param_groups[0]["lr"])
    assert ours == pytest.approx(theirs) and min(ours) == pytest.approx(2e-4) and len(set(ours)) >= 3


def test_a_floor_is_where_a_decay_stops_and_no_schedule_rises_above_its_peak():
    """A plateau held at its floor decays on from the floor when a resume lowers it, as torch's min_lr does (the
    decays kept counting under it, and a floor taken away dropped the rate to 1e-16); a cosine whose floor is above
    its peak stays at the peak (it rose to the floor)."""
    s = schedule(warmup_steps=0, schedule="plateau", patience=0, decay=0.5, min_lr=1e-4)
    for _ in range(40):
        s.report(0.5)
    assert s.get_last_lr()[0] == pytest.approx(1e-4)
    state = s.state_dict()
    lowered = schedule(warmup_steps=0, schedule="plateau", patience=0, decay=0.5, min_lr=0.0)
    lowered.load_state_dict(state)
    lowered.report(0.5)
    assert lowered.get_last_lr()[0] == pytest.approx(5e-5)  # the next decay halves the floored rate
    cosine = schedule(total=10, warmup_steps=0, schedule="cosine", min_lr=1.0)
    assert lrs(cosine, 10) == pytest.approx([1e-3] * 10)
