"""The run's account of compute: FLOPs, samples, steps and wall time per phase, and every evaluation.

``ledger.json`` in a run directory holds, per phase: ``compression``, ``factor``, ``steps``, ``samples``,
the batch (``global_batch``: clips per optimiser step, the recipe's; ``batch_per_rank``, ``grad_accum``,
``world_size``: how the launch that trained it last split it, ``common.training.batch``),
``flops_per_sample``, ``train_flops`` (= flops_per_sample x samples), ``wall_seconds`` (the training loop,
data waits included, evaluation and checkpointing not), ``eval_seconds`` and the phase's memory (estimated
and peak, ``common.models.memory``); totals; the evaluations
with the cumulative FLOPs and time at which they happened (what ``common/reports/figure.py`` plots); and, when
the recipe names a baseline, that baseline's planned training FLOPs and the saving against it; the
``interventions``: recipe changes a resumed run was allowed (a lower learning rate after a non-finite
loss; changed manifests with ``--accept-changed-data``), each with the step and phase from which it
applies; ``data``: the SHA-256 and size of every training and validation manifest
(``common.data.fingerprint``); ``upsampled``: the clips resampled up to the model's rate (all ranks, every time
they were met), per split and pair of rates; ``bad_audio`` (a run that met bad audio): per split, the clips seen,
those skipped as bad audio and their reasons (all ranks, every time they were met: the run's
``common.data.bad_audio.BadAudioTracker`` counts, which its checkpoints keep for a resume). A phase that has ended
says why and when (``ended_by``: ``length``, ``cap``, a criterion or ``surpassed``; ``ended_at``: its step, epoch,
total step and cumulative FLOPs; ``end_note``: in words), and a run stopped by ``train.stop_when_surpassing`` records
the target it stopped at (``stop_when_surpassing``: the baseline's best per-epoch score, where it was, its
weight-averaged score and the differences accepted, ``common.phases.baseline``); ``evaluation``: what decides the
clips a validation round scores (``common.phases.baseline.evaluation_settings``), so that another run can tell
whether its scores compare with these; ``init``: where a pretraining run started (``pretrain/run.py --init``:
the file, its size and SHA-256, its kind, and which weights were fitted, kept or started afresh,
``pretrain.init``), or which weights a fine-tuning run (each fold) started from (``source``, ``files``, ``size``,
``sha256``); ``code``: the package's version and git commit that trained the run last
(``common.system.version``; a resume under other code records the change in ``interventions``, as ``code``). An
evaluation of a weight average carries ``weight_averaged`` (the epochs averaged).

The trainer talks to the ledger through methods (:meth:`Ledger.start_phase`, :meth:`Ledger.add_training`,
:meth:`Ledger.add_eval_time`, :meth:`Ledger.add_eval`); readers use :meth:`Ledger.read` and
:meth:`Ledger.to_dict`, whose layout is the file's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from common.system import jsonfile
from common.system.atomic import atomic_write_text
from common.system.jsonfile import undefined_as_nan

__all__ = ["Ledger", "LedgerError", "PhaseRecord", "Window", "skipped_note"]


class LedgerError(ValueError):
    """A ledger (``ledger.json``, or the ledger a checkpoint holds) that is not of the shape this package writes."""


def skipped_note(bad: int, listed: str) -> str:
    """What a run's last line adds about its bad audio: ``; bad audio skipped N time(s) (the clips: LIST)``, ``""``
    for none (a clip bad in every epoch is skipped once per epoch: N counts skips, LIST names each clip once) (``bad``: the clips skipped, every time met, as the ledger counts them; ``listed``: the list's file)."""
    return f"; bad audio skipped {bad} time(s) (the clips: {listed})" if bad else ""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, where: str, value, expected: str) -> None:
    if not ok:
        shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
        raise LedgerError(f"{where} is {shown}, not {expected}")


@dataclass
class PhaseRecord:
    """What one phase cost so far.

    Attributes:
        name, compression, factor: the phase (``patch_transfer`` too for ``patch`` phases). A ledger read
            from a file may lack them (None).
        flops_per_sample, tokens_per_sample: the cost of one training clip at this phase's geometry.
        steps, epochs, samples: optimiser steps, completed epochs and clips trained on (all ranks).
        train_flops: ``flops_per_sample * samples``.
        wall_seconds: time in the training loop (data waits included, and with ``train.compile`` the compilation
            in the first steps of each phase and launch; evaluation and checkpoints not).
        eval_seconds: time spent validating.
        device_seconds: the seconds of all ranks' devices held by the phase (training and validation, times
            the number of ranks at the time: what GPU-hours count); ``device``: what they were (the GPU's name,
            or ``cpu``) when the phase started; ``hardware``: every ``[device, ranks]`` a launch trained it on (a
            phase resumed elsewhere has two: its wall time then compares with no other's); ``precision``: every
            autocast its launches trained it in (``bf16`` or ``fp32``: ``train.precision: auto`` resolves by GPU).
        global_batch, batch_per_rank, grad_accum, world_size: the phase's global batch and how it was split
            (clips per rank per micro-batch, micro-batches per step, ranks) by the launch that trained it last.
        ended_by, ended_at, end_note: why and when the phase ended (None while it runs).
        memory_estimate_bytes: what ``common.models.memory`` estimated one rank needs for this phase.
        peak_memory_bytes, peak_memory_source: the measured peak on one rank while the phase trained (rank 0's
            on several) and how it was measured (``common.models.memory.PeakMemory``).
        extra: fields of a ledger file this version does not know, kept as they are.
    """

    name: str | None = None
    compression: str | None = None
    factor: int | None = None
    flops_per_sample: int = 0
    tokens_per_sample: int | None = None
    patch_transfer: str | None = None
    steps: int = 0
    epochs: int = 0
    samples: int = 0
    train_flops: int = 0
    wall_seconds: float = 0.0
    eval_seconds: float = 0.0
    device_seconds: float = 0.0
    device: str | None = None
    hardware: list | None = None
    precision: list | None = None
    global_batch: int | None = None
    batch_per_rank: int | None = None
    grad_accum: int | None = None
    world_size: int | None = None
    ended_by: str | None = None
    ended_at: dict | None = None
    end_note: str | None = None
    memory_estimate_bytes: int | None = None
    peak_memory_bytes: int | None = None
    peak_memory_source: str | None = None
    extra: dict = field(default_factory=dict)

    _COUNTERS = ("steps", "epochs", "samples", "train_flops", "wall_seconds", "eval_seconds", "device_seconds")
    _DESCRIPTION = ("name", "compression", "factor", "flops_per_sample", "tokens_per_sample", "patch_transfer",
                    "device", "hardware", "precision")
    _BATCH = ("global_batch", "batch_per_rank", "grad_accum", "world_size")
    _END = ("ended_by", "ended_at", "end_note")
    _MEMORY = ("memory_estimate_bytes", "peak_memory_bytes", "peak_memory_source")

    def to_dict(self) -> dict:
        """The record as ``ledger.json`` stores it (counters first, then the phase's description)."""
        out = {k: getattr(self, k) for k in self._COUNTERS}
        out.update({k: getattr(self, k) for k in self._DESCRIPTION + self._BATCH + self._END + self._MEMORY
                    if getattr(self, k) is not None})
        out.update(self.extra)
        return out

    def trained_on(self, device: str, ranks: int) -> None:
        """A launch trains the phase on ``ranks`` devices named ``device`` (call before :meth:`set_batch`: a phase
        from a ledger written before ``hardware`` existed says its last launch's by ``device`` and ``world_size``)."""
        if self.hardware is None and self.device and self.world_size:
            self.hardware = [[self.device, int(self.world_size)]]
        self.device = self.device or device
        if [device, ranks] not in (self.hardware or []):
            self.hardware = [*(self.hardware or []), [device, ranks]]

    def trained_in(self, precision: str) -> None:
        """A launch trains the phase in ``precision`` (``bf16`` autocast or ``fp32``)."""
        if precision not in (self.precision or []):
            self.precision = [*(self.precision or []), precision]

    def set_batch(self, split) -> None:
        """Record the phase's global batch and its split (a :class:`common.training.batch.BatchSplit`)."""
        self.global_batch, self.batch_per_rank = split.global_batch, split.per_rank
        self.grad_accum, self.world_size = split.grad_accum, split.world_size

    @classmethod
    def from_dict(cls, data: dict, where: str = "phase") -> "PhaseRecord":
        """A phase as :meth:`to_dict` wrote it.

        Raises:
            LedgerError: ``data`` is not a mapping, or a field has the wrong type (``where`` names the phase).
        """
        _check(isinstance(data, dict), where, data, "a mapping")
        for key in cls._COUNTERS:
            if key in data:
                _check(_number(data[key]), f"{where}.{key}", data[key], "a number")
        for key in ("factor", "flops_per_sample", "tokens_per_sample", *cls._BATCH, "memory_estimate_bytes",
                    "peak_memory_bytes"):
            if data.get(key) is not None:
                _check(_number(data[key]), f"{where}.{key}", data[key], "a number")
        for key, kind, words in (("ended_at", dict, "a mapping"), ("hardware", list, "a list"),
                                 ("precision", list, "a list")):
            if data.get(key) is not None:
                _check(isinstance(data[key], kind), f"{where}.{key}", data[key], words)
        known = set(cls._COUNTERS) | set(cls._DESCRIPTION) | set(cls._BATCH) | set(cls._END) | set(cls._MEMORY)
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})


class Window(NamedTuple):
    """Training accounted by one :meth:`Ledger.add_training` call: clips (all ranks) and seconds."""

    samples: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


class Ledger:
    """Per-phase compute records, evaluations and the baseline to compare against.

    Args:
        score: the validation metric that ranks evaluations (higher is better).
    """

    def __init__(self, score: str | None = None) -> None:
        self.score = score
        self.phases: list[PhaseRecord] = []
        self.evals: list[dict] = []
        self.baseline: dict | None = None
        self.interventions: list[dict] = []
        self.stop_target: dict | None = None
        self.data: dict | None = None  # the manifests' fingerprints (common.data.fingerprint)
        self.upsampled: dict[tuple[str, int, int], int] = {}  # (split, clip rate, model rate) -> clips
        self.bad_audio: dict[str, dict] = {}  # split -> {"seen", "bad", "reasons"}: the run's totals so far
        self.evaluation: dict | None = None  # the validation settings (common.phases.baseline.evaluation_settings)
        self.init: dict | None = None  # where the run started: its --init and what was kept of it
        self.code: dict | None = None  # the code that trained it last (common.system.version; absent: not recorded)

    def start_phase(self, index: int, **info) -> PhaseRecord:
        """The record of phase ``index``, created from ``info`` (:class:`PhaseRecord` fields) on first use;
        a resumed phase keeps its counters."""
        if index < len(self.phases):
            return self.phases[index]
        if index != len(self.phases):
            raise ValueError(f"phase {index} started before phase {len(self.phases)}")
        self.phases.append(PhaseRecord(**info))
        return self.phases[index]

    def add_training(self, index: int, steps: int, samples: int, seconds: float, ranks: int = 1) -> Window:
        """Add trained steps, clips (all ranks) and seconds to phase ``index``, with ``ranks`` devices busy;
        returns what was added."""
        record = self.phases[index]
        record.steps += steps
        record.samples += samples
        record.train_flops = record.samples * record.flops_per_sample
        record.wall_seconds += seconds
        record.device_seconds += seconds * ranks
        return Window(samples, seconds)

    def set_epochs(self, index: int, epochs: int) -> None:
        """Phase ``index`` has completed ``epochs`` epochs."""
        self.phases[index].epochs = epochs

    def end_phase(self, index: int, ended_by: str, note: str, **at) -> None:
        """Phase ``index`` ended because of ``ended_by`` (``note`` in words); ``at`` says when (``step``,
        ``epoch``, ``total_step``); the cumulative training FLOPs are added."""
        record = self.phases[index]
        record.ended_by, record.end_note = ended_by, note
        record.ended_at = {**at, "train_flops": self.totals()["train_flops"]}

    def set_peak_memory(self, index: int, nbytes: int, source: str) -> None:
        """Phase ``index`` peaked at ``nbytes`` (the larger of this and what was recorded: a resumed phase)."""
        record = self.phases[index]
        record.peak_memory_bytes = max(record.peak_memory_bytes or 0, int(nbytes))
        record.peak_memory_source = source

    def add_eval_time(self, index: int, seconds: float, ranks: int = 1) -> None:
        self.phases[index].eval_seconds += seconds
        self.phases[index].device_seconds += seconds * ranks

    def totals(self) -> dict:
        keys = ("steps", "samples", "train_flops", "wall_seconds", "eval_seconds", "device_seconds")
        return {k: sum(getattr(p, k) for p in self.phases) for k in keys}

    def add_eval(self, phase: int, metrics: dict, **where) -> dict:
        """Record an evaluation of ``phase`` with the cumulative cost so far; ``where`` says when
        (``total_step``, ``phase_step``, ``epoch``, ...)."""
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

    def add_upsampled(self, counts: dict[str, dict[tuple[int, int], int]]) -> None:
        """Add clips resampled up: ``{split: {(clip rate, model rate): clips}}`` (one rank's, or all ranks')."""
        for split, pairs in counts.items():
            for (low, high), clips in pairs.items():
                key = (split, int(low), int(high))
                self.upsampled[key] = self.upsampled.get(key, 0) + int(clips)

    def set_bad_audio(self, counts: dict[str, dict]) -> None:
        """The run's bad-audio counts so far, ``{split: {"seen", "bad", "reasons"}}`` (every rank's totals, as the
        run's tracker holds them: they replace what was recorded); kept once some clip was bad."""
        if any(c["bad"] for c in counts.values()) or self.bad_audio:
            self.bad_audio = {split: {"seen": int(c["seen"]), "bad": int(c["bad"]), "reasons": dict(c["reasons"])}
                              for split, c in counts.items()}

    def bad_clips(self) -> int:
        """The clips skipped as bad audio so far, every split, every time met."""
        return sum(c["bad"] for c in self.bad_audio.values())

    def set_baseline(self, name: str, train_flops: float | None, flops_per_sample: int | None = None,
                     epochs: int | None = None) -> None:
        """The baseline's planned training FLOPs; for an epoch-based baseline (one phase) give
        ``flops_per_sample`` and ``epochs`` instead: its FLOPs are then counted with the clips per epoch
        of this run's first finished phase."""
        self.baseline = {"recipe": name, "train_flops": train_flops}
        if train_flops is None:
            self.baseline.update(flops_per_sample=flops_per_sample, epochs=epochs)

    def baseline_flops(self) -> float | None:
        """The baseline's planned training FLOPs (None when unknown: an epoch-based baseline's before this
        run's first phase has ended)."""
        if not self.baseline:
            return None
        if self.baseline.get("train_flops") is None and self.baseline.get("epochs"):
            done = next((p for p in self.phases if p.ended_by is not None and p.epochs), None)
            if done is None:
                return None
            return self.baseline["flops_per_sample"] * self.baseline["epochs"] * (done.samples // done.epochs)
        return self.baseline.get("train_flops")

    def flops_saving(self) -> float | None:
        """``1 - train FLOPs / baseline's planned FLOPs``, or None without a baseline."""
        planned = self.baseline_flops()
        if not planned:
            return None
        return 1 - self.totals()["train_flops"] / planned

    def set_stop_target(self, target: dict) -> None:
        """``train.stop_when_surpassing``: the baseline run and the best score the final phase must beat
        (``common.phases.baseline.stop_target``: ``run``, ``score``, ``best``, ...)."""
        self.stop_target = dict(target)

    def to_dict(self) -> dict:
        data = {"score": self.score, "phases": [p.to_dict() for p in self.phases], "total": self.totals(),
                "evals": self.evals}
        if self.baseline:
            data["baseline"] = {**self.baseline, "train_flops": self.baseline_flops()}
            data["flops_saving"] = self.flops_saving()
        if self.interventions:
            data["interventions"] = self.interventions
        if self.stop_target:
            data["stop_when_surpassing"] = self.stop_target
        if self.data:
            data["data"] = self.data
        if self.upsampled:
            data["upsampled"] = [{"split": s, "from_hz": a, "to_hz": b, "clips": n}
                                 for (s, a, b), n in sorted(self.upsampled.items())]
        if self.bad_audio:
            data["bad_audio"] = self.bad_audio
        if self.evaluation:
            data["evaluation"] = self.evaluation
        if self.init:
            data["init"] = self.init
        if self.code:
            data["code"] = self.code
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Ledger":
        """A ledger as :meth:`to_dict` wrote it.

        Raises:
            LedgerError: ``data`` is not of that shape (what is wrong, by key: ``phases.0.steps is 'x', ...``).
        """
        _check(isinstance(data, dict), "the ledger", data, "a mapping")
        for key in ("phases", "evals", "interventions", "upsampled"):
            _check(isinstance(data.get(key, []), list), key, data.get(key), "a list")
        for key in ("baseline", "stop_when_surpassing", "data", "evaluation", "init", "code", "bad_audio"):
            if data.get(key) is not None:
                _check(isinstance(data[key], dict), key, data[key], "a mapping")
        if data.get("score") is not None:
            _check(isinstance(data["score"], str), "score", data["score"], "a metric's name")
        for key in ("evals", "interventions"):
            for i, entry in enumerate(data.get(key, [])):
                _check(isinstance(entry, dict), f"{key}.{i}", entry, "a mapping")
        for i, entry in enumerate(data.get("evals", [])):
            if "metrics" in entry:
                _check(isinstance(entry["metrics"], dict), f"evals.{i}.metrics", entry["metrics"], "a mapping")
        for i, entry in enumerate(data.get("upsampled", [])):
            _check(isinstance(entry, dict) and {"split", "from_hz", "to_hz", "clips"} <= set(entry),
                   f"upsampled.{i}", entry, "a mapping of split, from_hz, to_hz and clips")
        for split, counts in (data.get("bad_audio") or {}).items():
            _check(isinstance(counts, dict) and {"seen", "bad", "reasons"} <= set(counts)
                   and _number(counts["seen"]) and _number(counts["bad"]) and isinstance(counts["reasons"], dict),
                   f"bad_audio.{split}", counts, "a mapping of seen, bad and reasons")
        ledger = cls(data.get("score"))
        ledger.phases = [PhaseRecord.from_dict(p, f"phases.{i}") for i, p in enumerate(data.get("phases", []))]
        ledger.evals = [{**e, "metrics": undefined_as_nan(e["metrics"])} if "metrics" in e else dict(e)
                        for e in data.get("evals", [])]  # ledger.json: an undefined metric is null
        ledger.baseline = data.get("baseline")
        ledger.interventions = [dict(i) for i in data.get("interventions", [])]
        ledger.stop_target = data.get("stop_when_surpassing")
        ledger.data = data.get("data")
        ledger.upsampled = {(u["split"], u["from_hz"], u["to_hz"]): u["clips"] for u in data.get("upsampled", [])}
        ledger.bad_audio = {split: dict(c) for split, c in (data.get("bad_audio") or {}).items()}
        ledger.evaluation = data.get("evaluation")
        ledger.init = data.get("init")
        ledger.code = data.get("code")
        return ledger

    @classmethod
    def read(cls, path: str | Path) -> "Ledger":
        """The ledger in ``path`` (a run directory or its ``ledger.json``).

        Raises:
            FileNotFoundError: there is none.
            LedgerError: (a ``ValueError`` naming the file) it is not JSON, or JSON of another shape.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "ledger.json"
        if not path.is_file():
            raise FileNotFoundError(f"no ledger at {path}")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:  # cut short, or not a ledger's file (UnicodeDecodeError is one too)
            raise LedgerError(f"{path} is not valid JSON ({err})") from None
        try:
            return cls.from_dict(data)
        except LedgerError as err:
            raise LedgerError(f"{path} is not a ledger of this package ({err})") from None

    def write(self, path: str | Path) -> None:
        atomic_write_text(path, jsonfile.dumps(self.to_dict(), indent=1))
