"""The baseline run a run is compared with: its reference score, and whether the comparison is fair.

The paper (section 3.3) terminates the final phase "at the earliest epoch that surpasses the baseline
performance", the reference being the baseline's "epoch number with the highest accuracy". Both sides of
that comparison are scores of a model as it stood at the end of a training round (an epoch, or
``train.eval_every`` steps). A run with weight averaging also appends, at its end, the evaluation of the
average of several such models (``weight_averaged`` in its ledger): another kind of model, usually a
better one. So the scores are compared like with like:

- the live stop (``train.stop_when_surpassing``) and ``common/reports/compare.py`` compare this run's per-round
  evaluations with the best of the baseline's *per-round* evaluations (:func:`reference`); the baseline's
  averaged score is never the target;
- averaged scores are compared with averaged scores, only where both runs averaged, after the fact: the
  report's whole-run table, and the trainer's log line about the run's own average. The live rule does not
  wait for an average: this run's average exists only once the phase has ended (it averages the best epochs
  that ran), and averaging at every round would cost an extra validation per round and, early on, average
  fewer models than the baseline did, which is no more like with like.

A baseline is refused (:func:`stop_target`, :func:`differences`) when its scores are not comparable with this
run's, naming each difference: it has not finished (no ``model.safetensors``: its best may still move); it
was validated on other manifests (the SHA-256 fingerprints its ledger records, ``common.data.fingerprint``);
or it was evaluated otherwise (another metric, ``train.eval_batches``, and with ``eval_batches`` the clips per
validation batch, which decide which clips are scored; ``data.eval_crop``, ``data.pad``; the ledger's
``evaluation`` record, :func:`evaluation_settings`). ``train.accept_baseline_differences: true`` accepts
them, and the ledger's ``stop_when_surpassing`` record lists what was accepted. A resumed run reads no
baseline: the target is in its checkpoint and ledger (:func:`recorded_target`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from common.data.fingerprint import key_for, run_fingerprints

__all__ = ["Reference", "is_averaged", "reference", "averaged_score", "evaluation_settings",
           "setting_differences", "differences", "stop_target", "recorded_target", "precheck"]

ACCEPT = "train.accept_baseline_differences"


@dataclass(frozen=True)
class Reference:
    """A run's best per-round evaluation: its score and where it was (``phase``, and ``epoch`` or ``step``)."""

    score: float
    phase: int
    epoch: int | None = None
    step: int | None = None

    def where(self) -> dict:
        out = {"phase": self.phase}
        out.update({"epoch": self.epoch} if self.epoch is not None else {"step": self.step})
        return out


def is_averaged(evaluation: dict) -> bool:
    """Whether a ledger evaluation scores a weight average (the one a run appends at its end)."""
    return bool(evaluation.get("weight_averaged"))


def reference(evals: Iterable[dict], score: str) -> Reference | None:
    """The best per-round evaluation of ``score`` (the first of equal maxima); None if there is none."""
    best = None
    for ev in evals:
        if is_averaged(ev) or score not in ev.get("metrics", {}):
            continue
        value = float(ev["metrics"][score])
        if best is None or value > best.score:
            best = Reference(value, int(ev.get("phase", 0)), ev.get("epoch"), ev.get("phase_step"))
    return best


def averaged_score(evals: Iterable[dict], score: str) -> float | None:
    """The score of the run's weight average (its last averaged evaluation), or None."""
    values = [float(ev["metrics"][score]) for ev in evals if is_averaged(ev) and score in ev.get("metrics", {})]
    return values[-1] if values else None


def evaluation_settings(train, data, batch_size: int, ranks: int, score: dict | None = None) -> dict:
    """What decides the clips a validation round scores and how (the ledger's ``evaluation`` record).

    Args:
        train: the run's ``TrainConfig`` (``eval_batches``).
        data: its ``DataConfig`` (``eval_batch_size``, ``eval_crop``, ``pad``).
        batch_size: the final phase's batch size per rank (the validation batch without ``eval_batch_size``).
        ranks: the processes that share a validation round.
        score: what sets the score's scale besides the clips, at the final phase (the objective's
            ``score_settings``: SSAST's masked-patch accuracy depends on how many patches are masked, and how);
            None: nothing (a classifier's mAP or accuracy).
    """
    settings = {"eval_batches": train.eval_batches, "eval_batch_size": data.eval_batch_size or batch_size,
                "ranks": ranks, "eval_crop": data.eval_crop, "pad": data.pad}
    return {**settings, "score": score} if score else settings


def setting_differences(base: dict, run: dict) -> list[str]:
    """How two :func:`evaluation_settings` score other clips or score them otherwise, one phrase each."""
    out = []
    if base.get("eval_batches") != run.get("eval_batches"):
        out.append(f"train.eval_batches {base.get('eval_batches')} (baseline) vs {run.get('eval_batches')} (this run)")
    elif run.get("eval_batches") is not None:  # a partial round: which clips it scores depends on the batches
        clips = [s.get("eval_batch_size", 0) * s.get("ranks", 1) for s in (base, run)]
        if clips[0] != clips[1]:
            out.append(f"validation clips per batch (data.eval_batch_size x ranks) {clips[0]} (baseline) vs "
                       f"{clips[1]} (this run), with train.eval_batches {run['eval_batches']}: other clips are scored")
    for key in ("eval_crop", "pad"):
        if base.get(key) != run.get(key):
            out.append(f"data.{key} {base.get(key)} (baseline) vs {run.get(key)} (this run)")
    mine, theirs = run.get("score"), base.get("score")
    if mine is not None and theirs is not None:  # (a ledger from before any: not compared)
        # a setting one ledger lacks was recorded only by later code: not compared either
        keys = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
        if keys:
            out.append("the score's scale: " + ", ".join(f"{k} {theirs[k]} (baseline) vs {mine[k]} (this run)"
                                                          for k in keys))
    return out


def _valid_sha(fingerprints: dict | None, key: str = "sha256") -> list[str] | None:
    if not fingerprints or "valid" not in fingerprints:
        return None
    return sorted(v.get(key) or "" for v in fingerprints["valid"].values())


def _valid_key(*sides: dict | None) -> str:
    """The fingerprint field both sides' validation manifests compare by (``common.data.fingerprint.key_for``)."""
    return key_for(*(v for side in sides if side and "valid" in side for v in side["valid"].values()))


def differences(baseline: dict, score: str, valid: dict | None, evaluation: dict | None,
                strict: bool = True) -> list[str]:
    """Why a baseline ledger's scores are not comparable with this run's, one phrase each (empty: comparable).

    Args:
        baseline: the baseline's ledger (``ledger.json`` as a dict).
        score: this run's metric.
        valid: this run's manifest fingerprints (``{"valid": {path: {"sha256", "bytes"}}}``), or None (unknown).
        evaluation: this run's :func:`evaluation_settings`, or None (unknown).
        strict: a baseline that does not record its fingerprints or settings differs (the live rule); not
            strict: only what both sides record is compared (the report, on ledgers of any age).
    """
    out = []
    if baseline.get("score") not in (None, score):
        out.append(f"metric {baseline['score']} (baseline) vs {score} (this run)")
    key = _valid_key(valid, baseline.get("data"))
    mine, theirs = _valid_sha(valid, key), _valid_sha(baseline.get("data"), key)
    if theirs is None and strict and mine is not None:
        out.append("its ledger does not record its validation manifests (a run from before they were recorded)")
    elif theirs is not None and mine is not None and theirs != mine:
        def listed(side: dict) -> str:  # each manifest with its own hash
            return "; ".join(f"{path} sha256 {(v.get(key) or '?')[:12]}" for path, v in sorted(side["valid"].items()))

        out.append(f"other validation manifests: the baseline's ({listed(baseline['data'])}) are not this run's "
                   f"({listed(valid)})")
    recorded = baseline.get("evaluation")
    if recorded is None and strict and evaluation is not None:
        out.append("its ledger does not record its evaluation settings (a run from before they were recorded)")
    elif recorded is not None and evaluation is not None:
        out += setting_differences(recorded, evaluation)
    return out


def _read(path: Path, key: str) -> tuple[Path, dict]:
    """The baseline's run directory and its ledger."""
    ledger = path / "ledger.json" if path.is_dir() or not path.suffix else path
    if not ledger.is_file():
        raise FileNotFoundError(f"{key}: no ledger at {ledger} (the baseline run must exist before this one starts)")
    try:
        data = json.loads(ledger.read_text())
    except ValueError as err:
        raise ValueError(f"{key}: {ledger} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{key}: {ledger} is not a ledger (a JSON object)")
    return ledger.parent, data


def _unfinished(run_dir: Path, data: dict) -> str | None:
    """Why the baseline run has not finished, or None."""
    if (run_dir / "model.safetensors").is_file():
        return None
    phases = data.get("phases") or []
    open_ = next(((i, p) for i, p in enumerate(phases) if not p.get("ended_by")), None)
    where = ""
    if open_ is not None:
        i, p = open_
        where = f"; phase {i + 1} of its ledger has not ended ({p.get('epochs', 0)} epochs, {p.get('steps', 0)} steps)"
    return f"not finished: no model.safetensors in {run_dir}{where}, so its best may still change"


def stop_target(path: str | Path, score: str, valid: dict | None = None, evaluation: dict | None = None,
                accept: bool = False, key: str = "train.stop_when_surpassing") -> dict:
    """The ledger record of ``train.stop_when_surpassing``: what the final phase must surpass.

    Args:
        path: the baseline's run directory (or its ledger file).
        score: this run's metric (the objective's ``score_name``).
        valid: this run's validation manifest fingerprints (``common.data.fingerprint.run_fingerprints``).
        evaluation: this run's :func:`evaluation_settings`.
        accept: ``train.accept_baseline_differences``: go on with a baseline that differs, recording how.
        key: the recipe key that named the baseline, for messages.

    Returns:
        ``{"run", "score", "best", "at", "averaged"}`` (``best``: the best per-round score, ``at`` where it
        was, ``averaged``: the baseline's weight-averaged score or None), and ``accepted_differences`` when
        ``accept`` let differences through.

    Raises:
        FileNotFoundError: no ledger there.
        ValueError: not comparable (unless ``accept``; each difference named), or no per-round evaluation
            of ``score``.
    """
    run_dir, data = _read(Path(path), key)
    found = [d for d in [_unfinished(run_dir, data)] if d] + differences(data, score, valid, evaluation)
    if found and not accept:
        raise ValueError(f"{key}: the baseline {run_dir} is not comparable with this run: {'; '.join(found)}. "
                         f"Compare with a finished baseline run under the same validation settings, or accept the "
                         f"differences with --set {ACCEPT}=true (they are recorded in ledger.json)")
    evals = data.get("evals") or []
    best = reference(evals, score)
    if best is None:
        averaged = " (only its weight average, which is not compared with epochs)" \
            if averaged_score(evals, score) is not None else ""
        raise ValueError(f"{key}: {run_dir / 'ledger.json'} holds no per-epoch evaluation of {score!r}{averaged}")
    target = {"run": str(path), "score": score, "best": best.score, "at": best.where(),
              "averaged": averaged_score(evals, score)}
    if found:
        target["accepted_differences"] = found
    return target


def recorded_target(run_dir: str | Path) -> dict | None:
    """The ``stop_when_surpassing`` target a run directory's run started with (None: none, or no run there).

    A run that has a checkpoint resumes with the target in it, so it needs no baseline directory; the ledger
    written with every checkpoint holds the same record.
    """
    run_dir = Path(run_dir)
    if not any((run_dir / "checkpoints").glob("*")) and not (run_dir / "model.safetensors").is_file():
        return None
    try:
        data = json.loads((run_dir / "ledger.json").read_text())
    except (OSError, ValueError):
        return None
    return data.get("stop_when_surpassing") if isinstance(data, dict) else None


def precheck(path: str | None, score: str, run_dir: Path, valid: Sequence[str], evaluation: dict,
             accept: bool = False, restart: bool = False) -> None:
    """The entry points' check of a ``stop_when_surpassing`` baseline, before any compute or run directory
    (the trainer reads the target again when the run starts): nothing to check without a baseline, or for a
    run that resumes with its recorded target (unless ``--restart``); manifests that are not there yet (a
    ``--dry-run``) are not compared.

    Raises:
        FileNotFoundError, ValueError: as :func:`stop_target`.
    """
    if not path or (not restart and recorded_target(run_dir) is not None):
        return

    try:
        fingerprints = run_fingerprints([], valid)
    except FileNotFoundError:
        fingerprints = None
    stop_target(path, score, fingerprints, evaluation, accept)
