"""What users read with other tools is JSON they accept: an undefined or infinite metric is null, not NaN."""

import json
import math

import numpy as np
import pytest

from common.metrics import compute_metrics
from common.system.jsonfile import dumps, strict
from common.training.ledger import Ledger


def _refuse(constant):
    raise ValueError(f"not JSON: {constant}")


def test_non_finite_numbers_are_written_null_wherever_they_sit():
    value = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": (np.float64("nan"), 2), "e": "x"}
    assert strict(value) == {"a": None, "b": [1.0, None, {"c": None}], "d": [None, 2], "e": "x"}
    assert json.loads(dumps(value), parse_constant=_refuse)["b"] == [1.0, None, {"c": None}]


def test_a_perfect_scores_d_prime_reaches_the_ledger_file_as_null_and_reads_back_as_nan(tmp_path):
    targets = np.eye(3)[[0, 1, 2, 0]]
    metrics = compute_metrics(targets, targets * 0.9 + 0.05)  # a perfect ranking: mAUC 1, d' infinite (AST's)
    assert math.isinf(metrics["dprime"])
    ledger = Ledger("mAP")
    ledger.start_phase(0, name="p1", compression="none", factor=1, flops_per_sample=1, tokens_per_sample=1)
    ledger.add_eval(0, metrics, total_step=1, phase_step=1, epoch=1)
    ledger.write(tmp_path / "ledger.json")
    text = (tmp_path / "ledger.json").read_text()
    assert json.loads(text, parse_constant=_refuse)["evals"][0]["metrics"]["dprime"] is None
    again = Ledger.read(tmp_path).evals[0]["metrics"]
    assert math.isnan(again["dprime"]) and again["mAP"] == pytest.approx(1.0)
