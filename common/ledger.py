"""The run's account of compute: FLOPs, samples, steps and wall time per phase, and every evaluation.

``ledger.json`` in a run directory holds, per phase: ``compression``, ``factor``, ``steps``, ``samples``,
``flops_per_sample``, ``train_flops`` (= flops_per_sample x samples), ``wall_seconds`` (the training loop,
data waits included, evaluation and checkpointing not) and ``eval_seconds``; totals; the evaluations
with the cumulative FLOPs and time at which they happened (what ``finetune/report.py`` plots); and, when
the recipe names a baseline, that baseline's planned training FLOPs and the saving against it; and the
``interventions``: recipe changes a resumed run was allowed (a lower learning rate after a non-finite
loss), each with the step and phase from which it applies.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.checkpoint import atomic_write_text

__all__ = ["Ledger"]


class Ledger:
    def __init__(self, score: str | None = None) -> None:
        self.score = score  # the validation metric that ranks evaluations (higher is better)
        self.phases: list[dict] = []
        self.evals: list[dict] = []
        self.baseline: dict | None = None
        self.interventions: list[dict] = []

    def phase(self, index: int, **info) -> dict:
        """The record of phase ``index`` (created with ``info`` on first use)."""
        while len(self.phases) <= index:
            self.phases.append({})
        record = self.phases[index]
        if not record:
            record.update({"steps": 0, "epochs": 0, "samples": 0, "train_flops": 0, "wall_seconds": 0.0,
                           "eval_seconds": 0.0, **info})
        return record

    def add_training(self, index: int, steps: int, samples: int, seconds: float) -> None:
        record = self.phases[index]
        record["steps"] += steps
        record["samples"] += samples
        record["train_flops"] = record["samples"] * record["flops_per_sample"]
        record["wall_seconds"] += seconds

    def totals(self) -> dict:
        keys = ("steps", "samples", "train_flops", "wall_seconds", "eval_seconds")
        return {k: sum(p.get(k, 0) for p in self.phases) for k in keys}

    def add_eval(self, phase: int, metrics: dict, **where) -> dict:
        totals = self.totals()
        record = {"phase": phase, **where, "train_flops": totals["train_flops"],
                  "wall_seconds": totals["wall_seconds"], "samples": totals["samples"], "metrics": metrics}
        self.evals.append(record)
        return record

    def add_intervention(self, step: int, phase: int, changes: dict) -> None:
        """Record recipe changes a resumed run applies from optimiser step ``step`` (of the whole run) on.

        Args:
            step: optimiser steps done in the run when the change takes effect.
            phase: the 0-based phase the run resumes in.
            changes: ``{recipe key: {"from": old value, "to": new value}}``.
        """
        self.interventions.append({"step": int(step), "phase": int(phase), "changes": dict(changes)})

    def set_baseline(self, name: str, train_flops: float) -> None:
        self.baseline = {"recipe": name, "train_flops": train_flops}

    def to_dict(self) -> dict:
        data = {"score": self.score, "phases": self.phases, "total": self.totals(), "evals": self.evals}
        if self.baseline:
            total = data["total"]["train_flops"]
            data["baseline"] = self.baseline
            data["flops_saving"] = 1 - total / self.baseline["train_flops"] if self.baseline["train_flops"] else None
        if self.interventions:
            data["interventions"] = self.interventions
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Ledger":
        ledger = cls(data.get("score"))
        ledger.phases = [dict(p) for p in data.get("phases", [])]
        ledger.evals = [dict(e) for e in data.get("evals", [])]
        ledger.baseline = data.get("baseline")
        ledger.interventions = [dict(i) for i in data.get("interventions", [])]
        return ledger

    @classmethod
    def read(cls, path: str | Path) -> "Ledger":
        path = Path(path)
        if path.is_dir():
            path = path / "ledger.json"
        if not path.is_file():
            raise FileNotFoundError(f"no ledger at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def write(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
