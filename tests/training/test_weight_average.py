"""Weight averaging: which epochs are kept and averaged, and the float64 mean."""

import pytest
import torch

from common.phases.config import PhaseConfig
from common.training.weight_average import WeightAverage, average_state_dicts, averaged_epochs


def test_the_final_phases_epochs_from_the_start_epoch():
    phases = [PhaseConfig("fshift", 4, epochs=2), PhaseConfig(epochs=5)]
    assert averaged_epochs(3, phases) == [3, 4, 5] and averaged_epochs(None, phases) == []
    assert averaged_epochs(1, [PhaseConfig(steps=10)]) == []  # iteration-based runs do not average


def test_the_mean_is_exact_and_keys_must_agree():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([2.0, 4.0])}, {"w": torch.tensor([3.0, 9.0])}]
    assert torch.equal(average_state_dicts(states)["w"], torch.tensor([2.0, 5.0]))
    with pytest.raises(ValueError, match="different keys"):
        average_state_dicts([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}])


def test_the_top_epochs_by_validation_score(tmp_path):
    average = WeightAverage(tmp_path, [1, 2, 3, 4], top=2)
    for epoch in (1, 2, 3, 4):
        model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(model.weight, float(epoch))
        average.keep(model, epoch)
    scores = {1: 0.3, 2: 0.5, 3: 0.2, 4: 0.5}  # a tie: the earlier epoch wins
    assert average.chosen(scores) == [2, 4]
    assert average.average(average.chosen(scores))["weight"].item() == pytest.approx(3.0)
    assert WeightAverage(tmp_path, [1, 2, 3, 4]).chosen(scores) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="no validation score for epochs \\[3\\]"):
        average.chosen({1: 0.1, 2: 0.2, 4: 0.3})


def test_epochs_that_cannot_be_among_the_top_any_more_are_removed(tmp_path):
    """A run of hundreds of epochs kept every epoch's weights (300 files for the 5 it averaged): an epoch that
    ``top`` others already rank above is removed after each validation; one whose place is open stays."""
    average = WeightAverage(tmp_path, [1, 2, 3, 4, 5], top=2)
    model = torch.nn.Linear(1, 1, bias=False)
    scores: dict[int, float] = {}
    removed = []
    for epoch, score in zip((1, 2, 3, 4, 5), (0.3, 0.5, 0.2, 0.5, 0.4)):
        average.keep(model, epoch)
        scores[epoch] = score
        removed.append(average.prune(scores))
    assert removed == [[], [], [3], [1], [5]]  # epoch 4 ties 2 and ranks after it, but only two rank above 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch002.safetensors", "epoch004.safetensors"]
    assert average.chosen(scores) == [2, 4] and average.average([2, 4])  # what the end averages is there
    assert WeightAverage(tmp_path, [1, 2, 3, 4, 5]).prune(scores) == []  # a range averages every kept epoch


def test_the_end_averages_the_best_of_the_epochs_kept(tmp_path):
    """A resume from an older checkpoint that went otherwise (not bitwise) may rank an epoch that was removed among
    the best: the run averaged it and failed at its very end on the missing file."""
    average = WeightAverage(tmp_path, [1, 2, 3, 4], top=2)
    for epoch in (1, 2, 3, 4):
        average.keep(torch.nn.Linear(1, 1, bias=False), epoch)
    (tmp_path / "epoch001.safetensors").unlink()  # removed under the earlier course of the run
    scores = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.6}
    assert average.chosen(scores) == [1, 4] and average.chosen(scores, kept_only=True) == [3, 4]
    assert average.average(average.chosen(scores, kept_only=True))


def test_an_undefined_score_ranks_last(tmp_path):
    """A NaN compares with nothing: sorted among the scores it left the order, so which epochs are kept and which
    averaged, to chance (an epoch removed, then chosen, would be missing at the end)."""
    average = WeightAverage(tmp_path, [1, 2, 3, 4], top=2)
    scores = {1: float("nan"), 2: 0.5, 3: 0.7, 4: 0.6}
    assert average.chosen(scores) == [3, 4]
    for epoch in scores:
        average.keep(torch.nn.Linear(1, 1, bias=False), epoch)
    assert average.prune(scores) == [2, 1]


def test_an_early_end_averages_the_best_of_the_epochs_that_ran(tmp_path):
    from common.phases.until import UntilConfig

    capped = [PhaseConfig("fshift", 4, epochs=1), PhaseConfig(epochs=3, until=UntilConfig(max=6))]
    assert averaged_epochs(1, capped) == [1, 2, 3, 4, 5, 6]  # kept up to the cap: the phase may run past its plan
    average = WeightAverage(tmp_path, averaged_epochs(1, capped), top=3)
    scores = {1: 0.3, 2: 0.6, 3: 0.5, 4: 0.4, 5: 0.7}
    assert average.chosen(scores, ran=5) == [2, 3, 5]  # the best 3 of the 5 that ran; epoch 6 never ran
    assert average.chosen(scores, ran=2) == [1, 2]  # fewer than 3 ran: all of them
    with pytest.raises(ValueError, match="ended after 2 epochs, before the first epoch to average \\(3\\)"):
        WeightAverage(tmp_path, [3, 4, 5, 6]).chosen(scores, ran=2)
