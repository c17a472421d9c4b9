"""What a resumed run finds changed since its checkpoint, and how each change is recorded.

A run resumed exactly continues the run it resumes; a change that makes it continue otherwise is an
*intervention*: allowed where the package can carry the run across it, said in a warning, and recorded in
``ledger.json`` (``Ledger.add_intervention``) so that its results say how they were made. Each function here
compares what a checkpoint recorded with what this launch has and records what differs:

- :func:`check_data`: the manifests' fingerprints (``common.data.fingerprint``): refused unless
  ``--accept-changed-data``;
- :func:`check_evaluation`: the validation settings that choose which clips a validation scores;
- :func:`check_sampler`: how the training clips are drawn (balanced sampling, Shar folders read per rank);
- :func:`reshard_position`: another number of ranks or per-rank batch: the data position converted;
- :func:`check_code`: another version or commit of the package (``common.system.version``): allowed, recorded;
- recipe keys changed at a resume (``common.training.run_recipe``) are recorded by ``RunRecord.open``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.data.fingerprint import DataChanged, changes, run_fingerprints
from common.data.shar_stream import reads_per_rank
from common.data.shards import reshard_index
from common.phases.baseline import evaluation_settings, setting_differences
from common.system.version import code_version, same_code
from common.training.ledger import Ledger
from common.training.spec import RunSpec
from common.training.train_state import TrainState

__all__ = ["sampler", "check_data", "check_evaluation", "check_sampler", "reshard_position", "check_code"]

log = logging.getLogger(__name__)


def sampler(spec: RunSpec) -> str:
    """How the run draws its training clips, as its checkpoints record it (a resume says what changed)."""
    return "balanced" if spec.data.balanced else "shar-per-rank" if reads_per_rank(spec.data) else "shuffle"


def check_data(ledger: Ledger, spec: RunSpec, state: TrainState, resumed: bool) -> None:
    """Record the manifests' fingerprints; a resumed run's must be those it trained on, unless
    ``--accept-changed-data`` (then recorded as an intervention).

    Raises:
        DataChanged: a manifest changed since the run started and the change was not accepted.
    """
    current = run_fingerprints([m.path for m in spec.data.train], spec.data.valid)
    changed = changes(ledger.data, current) if resumed else {}
    if changed:
        listed = "; ".join(f"{k} (sha256 {(v['from'] or 'none')[:12]} -> {(v['to'] or 'none')[:12]})"
                           for k, v in changed.items())
        if not (spec.run_recipe is not None and spec.run_recipe.accept_changed_data):
            raise DataChanged(
                f"{Path(spec.run_dir)}: manifests changed since the run started: {listed}. The saved data position "
                f"(pass {state.data_epoch + 1} over the training set, batch {state.data_index}) would now point at "
                f"other clips, "
                f"so the resumed run would not continue the one it resumes. Restore the manifests, start a new "
                f"run (--run-dir), or resume anyway with --accept-changed-data (recorded in ledger.json)")
        log.warning("resuming with changed manifests (--accept-changed-data): %s; recorded in ledger.json as an "
                    "intervention", listed)
        ledger.add_intervention(step=state.total_steps, phase=state.phase,
                                changes={f"manifest {k}": v for k, v in changed.items()})
    ledger.data = current


def check_evaluation(ledger: Ledger, spec: RunSpec, state: TrainState, batch_per_rank: int, world_size: int,
                     score_settings: dict, resumed: bool) -> None:
    """Record the validation settings (``common.phases.baseline.evaluation_settings``, of the final phase's
    ``batch_per_rank`` and ``score_settings``); a resumed run whose ``train.eval_batches`` or
    ``data.eval_batch_size`` change which clips are scored records the change as an intervention (a change of
    ranks has its own, :func:`reshard_position`; the default validation batch, the per-rank training batch,
    follows the ranks and keeps the clips a round scores: no change then)."""
    current = evaluation_settings(spec.train, spec.data, batch_per_rank, world_size, score_settings)
    old = ledger.evaluation
    compared = current if spec.data.eval_batch_size is None else {**current, "ranks": old and old.get("ranks")}
    if resumed and old and setting_differences(old, compared):
        keys = {"eval_batches": "train.eval_batches"}
        ledger.add_intervention(step=state.total_steps, phase=state.phase, changes={
            keys.get(k, f"data.{k}"): {"from": old.get(k), "to": v} for k, v in current.items()
            if k not in ("ranks", "score") and old.get(k) != v})
    ledger.evaluation = current


def check_sampler(ledger: Ledger, spec: RunSpec, state: TrainState, saved: dict, tag: str) -> None:
    """A checkpoint (trainer state ``saved``, of checkpoint ``tag``) written before the run's way of drawing its
    clips existed: said, and recorded where the rest of the run draws otherwise than the part before."""
    if "sampler" not in saved and spec.data.balanced:
        log.warning("data.balanced: %s was written before balanced sampling reached training sets held in memory "
                    "or indexed on disk (data.shuffle: full, the default); if this run's set is one, its epochs "
                    "so far were plain shuffles, and from here on they are balanced (recorded in ledger.json)", tag)
        ledger.add_intervention(step=state.total_steps, phase=state.phase, changes={
            "data.balanced": {"from": "a plain shuffle, unless streamed (data.shuffle: buffer)", "to": "applied"}})
    if sampler(spec) == "shar-per-rank" and saved.get("sampler") != "shar-per-rank" and state.data_index:
        log.warning("data.train: %s was written while every rank read the whole Shar folder and kept its share; "
                    "its folders are now read in one part per rank, in another order: the rest of epoch %d is the "
                    "new order's (some of its clips seen again, some left for the next epoch; recorded in "
                    "ledger.json)", tag, state.data_epoch)
        ledger.add_intervention(step=state.total_steps, phase=state.phase, changes={
            "sampler": {"from": saved.get("sampler", "shuffle"), "to": "shar-per-rank"}})


def reshard_position(ledger: Ledger, spec: RunSpec, state: TrainState, saved_ranks: int, saved_batch: int,
                     ranks: int, batch: int, say: bool = True) -> None:
    """Resuming on ``ranks`` x ``batch`` clips a run checkpointed on ``saved_ranks`` x ``saved_batch``: each rank's
    shard of an epoch changes, so the data position keeps the clips of the epoch already seen (batches consumed x
    per-rank batch x ranks, in the new global batches), and the run continues close to, not exactly as, an
    uninterrupted one; the ledger records it (the per-rank batch only where it changed otherwise than the global
    batch's split over the new ranks, ``common.training.batch``). ``say``: log the warning (rank 0: every rank
    reshards alike, and the console showed the paragraph once per rank)."""
    index = reshard_index(state.data_index, saved_batch, saved_ranks, batch, ranks)
    shar = saved_ranks != ranks and reads_per_rank(spec.data)  # each rank reads its own part of the epoch
    where = ("at the start of a pass over the training set" if index == 0 else
             f"after the same share of this pass over the training set ({index} batches of {batch} clips per rank"
             + (f"; {state.data_index} of {saved_batch} before)" if index != state.data_index else ")"))
    (log.warning if say else log.debug)(
        "resuming on %d rank(s) x %d clips a run checkpointed on %d x %d: the micro-batches change (and "
        "each rank's share of the data with the ranks), so the clips a micro-batch mixes and its random "
        "augmentation draws are others; the resumed run goes on %s and is close to, not bitwise equal to, an "
        "uninterrupted run%s; recorded in ledger.json", ranks, batch, saved_ranks, saved_batch, where,
        " (its Shar folders are read in one part per rank: the rest of the epoch is the rest of the new "
        "ranks' parts, some of its clips seen again, some left for the next epoch)" if shar else "")
    state.data_index = index
    changed = {"world_size": {"from": saved_ranks, "to": ranks}} if saved_ranks != ranks else {}
    if saved_batch != batch and saved_batch * saved_ranks != batch * ranks:
        changed["batch_per_rank"] = {"from": saved_batch, "to": batch}
    ledger.add_intervention(step=state.total_steps, phase=state.phase, changes=changed)


def _code_words(code: dict) -> str:
    said = ([f"commit {code['commit'][:12]}"] if code.get("commit") else []) + \
        ([f"source {code['source']}"] if code.get("source") else [])  # both: edits not committed change the source
    return f"{code.get('version', '?')}" + (f" ({', '.join(said)})" if said else "")


def check_code(ledger: Ledger, state: TrainState, resumed: bool, say: bool = True) -> None:
    """Record the code that trains the run (``ledger.code``); a resumed run whose checkpoint was written by another
    version, commit or source of the package (``common.system.version.same_code``) goes on under this one (what
    changed between them is not known here), said in a warning (``say``: rank 0 of several) and recorded as an
    intervention, so that its results say that the run spans two versions. A checkpoint that records no code
    (written before it was recorded) is such a change too, from an unknown version (``from: null``): the ledger
    does not claim that this code trained the whole run."""
    current = code_version()
    if not resumed or (ledger.code is not None and same_code(ledger.code, current)):
        ledger.code = current
        return
    if say:
        log.warning("resuming under coarse2fine-ast %s; the run's checkpoint was written by %s: from step %d on, "
                    "the run trains with this code; recorded in ledger.json as an intervention", _code_words(current),
                    _code_words(ledger.code) if ledger.code is not None else
                    "an earlier version that recorded no code", state.total_steps)
    ledger.add_intervention(step=state.total_steps, phase=state.phase,
                            changes={"code": {"from": ledger.code, "to": current}})
    ledger.code = current
