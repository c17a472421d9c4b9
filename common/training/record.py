"""A run's record: everything the run directory holds, and the bookkeeping that keeps it.

:class:`RunRecord` owns the run directory: where the run is (:class:`common.training.spec.TrainState`), the
ledger (``ledger.json``, ``common.training.ledger``), the bad-audio list (``bad_audio.tsv``), the RNG, the
run's ``recipe.yaml`` (``common.training.run_recipe``), the checkpoints (``common.training.checkpoints``) and
resuming from them, on other ranks too, with what a resumed run finds changed (the manifests, the validation
settings, the ranks: ``common.training.interventions``), the exports (``export/phaseN``,
``export/best``, ``export/weight_averaged``, ``model.safetensors``), weight averaging's files
(``common.training.weight_average``) and TensorBoard's scalars. The loop (``common.training.loop``) calls it
when a phase starts, at a save, after a validation and at a phase end.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from common.data.bad_audio import BadAudioTracker
from common.models.memory import PeakMemory, gib, training_setting
from common.phases.baseline import stop_target
from common.phases.phase_end import Decision
from common.system.atomic import atomic_copy
from common.system.distributed import Dist
from common.system.engine_config import resolve_zero_stage
from common.system.logger import Scalars
from common.training.checkpoint_files import NoUsableCheckpoint
from common.training.checkpoints import RunCheckpoints, capture_rng, make_tag, restore_rng, tag_place
from common.training.interventions import (
    check_code,
    check_data,
    check_evaluation,
    check_sampler,
    reshard_position,
    sampler,
)
from common.training.ledger import Ledger, Window
from common.training.log_window import LogWindow
from common.training.nonfinite import NonFiniteLoss
from common.training.objective import Objective
from common.training.plan import RunPlan
from common.training.run_dir import FINISHED, LOST, lost_run_message, run_state
from common.training.spec import RunSpec
from common.training.train_state import TrainState
from common.training.weight_average import WeightAverage, averaged_epochs

__all__ = ["RunRecord", "saving_words"]

log = logging.getLogger(__name__)


def _changes(changes: dict) -> str:
    """``optim.lr 0.001 -> 0.0005, ...``: a resume's recipe changes (``RunRecipe.changes``) in one line."""
    return ", ".join(f"{k} {v['from']} -> {v['to']}" for k, v in changes.items())


def saving_words(saving: float) -> str:
    """A FLOPs saving (a fraction of the baseline's) in words: ``34.6% fewer FLOPs``, ``5.0% more FLOPs``."""
    return f"{abs(saving):.1%} {'fewer' if saving >= 0 else 'more'} FLOPs"


class _Pending:
    """Training not yet moved into the ledger: steps and clips (this rank) since ``clock``.

    The clock is read after the device has finished the work queued so far (a CUDA device runs behind the
    host): the seconds between two readings are the device's, not the host's queueing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps, self.samples, self.clock = 0, 0, self.now()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def restart_clock(self) -> None:
        self.clock = self.now()


class RunRecord:
    """The run directory of ``spec`` planned as ``plan`` and trained with ``objective`` on ``dist``.

    Attributes:
        state: where the run is (saved in every checkpoint).
        ledger: its account of compute and evaluations.
        stop_target: what ``train.stop_when_surpassing`` makes the final phase surpass (None: nothing).
        pending: training not yet in the ledger (the loop counts steps and clips into it).
    """

    def __init__(self, spec: RunSpec, plan: RunPlan, objective: Objective, dist: Dist) -> None:
        self.spec, self.plan, self.objective, self.dist = spec, plan, objective, dist
        self.run_dir = Path(spec.run_dir)
        self.device = dist.device
        self.state = TrainState()
        self.ledger = Ledger(objective.score_name)
        if plan.baseline is not None:
            self.ledger.set_baseline(**plan.baseline.ledger_fields())
        self.ledger.init = spec.init_record  # a resumed run's comes back with its ledger
        self.zero_stage = resolve_zero_stage(spec.train.zero_stage, dist.world_size)  # a resume keeps its own
        self.bf16: bool | None = None  # the precision the ranks agreed on (PhaseMachinery): the ledger, the estimate
        self.stop_target: dict | None = None
        self.checkpoints = RunCheckpoints(self.run_dir / "checkpoints", dist, spec.train.keep_checkpoints)
        self.average = WeightAverage(self.run_dir / "average",
                                     averaged_epochs(spec.train.weight_average_from or
                                                     (1 if spec.train.weight_average_top else None), spec.phases),
                                     top=spec.train.weight_average_top)
        self.tracker = BadAudioTracker(spec.data.max_bad_fraction, log_path=str(self.run_dir / "bad_audio.tsv"),
                                       dist=dist)  # judged on every rank's counts together; rank 0 writes the list
        self.generator = torch.Generator().manual_seed(spec.train.seed * 1000 + dist.rank)
        self.scalars = Scalars(self.run_dir, enabled=dist.is_main)
        self.pending = _Pending(self.device)
        self._schedule: dict | None = None  # a resumed checkpoint's schedule after its validation (close_validation)
        # a resume within a phase on its checkpoint's layout: the checkpoint's place (tag_place) and how many
        # interventions its ledger held
        self._resumed_as_saved: tuple[tuple, int] | None = None
        self._memory = PeakMemory(self.device)

    def _batch_size(self, index: int) -> int:
        return self.plan.splits[index].per_rank

    # ---------------------------------------------------------------------------------- the start
    def resume(self) -> tuple[nn.Module | None, str | None]:
        """Restore the newest intact checkpoint if there is one.

        Returns ``(model, None)`` for a checkpoint taken at the end of a phase, ``(None, tag)`` for one
        taken within a phase (the engine loads it, :meth:`load`), ``(None, None)`` without a checkpoint (and, for
        a finished run whose checkpoints were deleted, a state that :meth:`complete` reads as done).

        Raises:
            NoUsableCheckpoint: checkpoints exist but none is intact, or the run trained (its ledger or model is
                there), is unfinished and its checkpoints are gone (``common.training.run_dir.run_state``).
        """
        tag = self.checkpoints.find_resume()
        if tag is None:
            # no checkpoint: a finished run whose checkpoints were deleted (to free disk) is complete; an unfinished
            # run that trained is refused, not replaced by one from step 0 (rank 0 reads for every rank)
            held = self.dist.broadcast_object(run_state(self.run_dir, len(self.spec.phases))
                                              if self.dist.is_main else None)
            if held == FINISHED:
                if self.dist.is_main:  # the same decision on every rank: said once
                    log.warning("%s holds no checkpoint (deleted?), but its run is finished (%s and a complete %s): "
                                "nothing is trained or replaced", self.checkpoints.ckdir,
                                self.run_dir / "model.safetensors", self.run_dir / "ledger.json")
                self.state = TrainState(phase=len(self.spec.phases) - 1, phase_done=True, phase_closed=True)
                return None, None
            if held == LOST:
                raise NoUsableCheckpoint(lost_run_message(self.run_dir))
            # from step 0: what a launch that stopped before its first checkpoint logged is hidden
            self.scalars.resumed_at(-1)
            return None, None
        # rank 0's reading for every rank: the file can be rewritten in place (a phase's close, RunCheckpoints.restate)
        # and another host's cached view of it may lag
        saved = self.dist.broadcast_object(self.checkpoints.trainer_state(tag) if self.dist.is_main else None)
        self.state = TrainState.from_dict(saved["state"])  # its shape checked by damage() before it was picked
        self._schedule = saved.get("schedule") if not self.state.pending_eval else None
        self.scalars.resumed_at(self.state.total_steps)
        baseline = self.ledger.baseline
        self.ledger = Ledger.from_dict(saved["ledger"])  # with the stop target the run started with
        self.ledger.baseline = baseline or self.ledger.baseline
        self.stop_target = self.ledger.stop_target
        self.tracker.load_state_dict(saved["tracker"])
        check_sampler(self.ledger, self.spec, self.state, saved, tag)
        saved_ranks = self.checkpoints.saved_world_size(tag, saved)
        stage = saved.get("zero_stage")  # absent before it was recorded: ZeRO if the optimizer state is partitioned
        stage = stage if stage is not None else int(any(self.checkpoints.ckdir.joinpath(tag).glob("zero_pp_rank_*")))
        self.zero_stage = resolve_zero_stage(self.spec.train.zero_stage, self.dist.world_size, stage)
        saved_batch = saved.get("batch_per_rank", self._batch_size(self.state.phase))  # absent before it was recorded
        if (saved_ranks, saved_batch) != (self.dist.world_size, self._batch_size(self.state.phase)):
            reshard_position(self.ledger, self.spec, self.state, saved_ranks, saved_batch, self.dist.world_size,
                             self._batch_size(self.state.phase), say=self.dist.is_main)
        if self.state.phase_done:
            model = self.objective.build_model(self.plan.configs[self.state.phase])
            model.load_state_dict(self.checkpoints.module_state(tag))
            self._restore_rng(tag)
            log.info("resuming after the end of phase %d (checkpoint %s)", self.state.phase + 1, tag)
            return model, None
        if (saved_ranks, saved_batch) == (self.dist.world_size, self._batch_size(self.state.phase)):
            self._resumed_as_saved = (tag_place(tag), len(saved["ledger"].get("interventions", [])))
        phase = self.spec.phases[self.state.phase]
        log.info("resuming %s at step %d%s (checkpoint %s)", phase.label(self.state.phase), self.state.step,
                 "" if phase.iteration_based else f", {self.state.epoch_in_phase} epoch(s) done", tag)
        return None, tag

    def complete(self) -> bool:
        """The run has finished already (its final phase is done and its model is there)."""
        last = len(self.spec.phases) - 1
        if self.state.phase == last and self.state.phase_done and (self.run_dir / "model.safetensors").is_file():
            log.info("run in %s is already complete: %s", self.run_dir, self.run_dir / "model.safetensors")
            if self.spec.run_recipe is not None and self.spec.run_recipe.changes:
                log.warning("the run is complete: changed %s trains nothing (nothing recorded; a new --run-dir "
                            "starts a run with them)", _changes(self.spec.run_recipe.changes))
            return True
        return False

    def open(self, resumed: bool) -> None:
        """Before the first step of this call: the recipe changes a resumed run was allowed, the code that trains it,
        the manifests' fingerprints, the validation settings and the stop target."""
        self.tracker.recheck_listed()  # bad_audio.tsv lists what is bad now (files may have come back)
        if resumed and self.spec.run_recipe is not None and self.spec.run_recipe.changes:
            if self.dist.is_main:  # rank 0 writes the ledger; every rank has the same changes (same_inputs)
                log.warning("resuming %s with changed %s; recorded in ledger.json as an intervention",
                            self.run_dir, _changes(self.spec.run_recipe.changes))
            self.ledger.add_intervention(step=self.state.total_steps, phase=self.state.phase,
                                         changes=self.spec.run_recipe.changes)
        check_code(self.ledger, self.state, resumed, say=self.dist.is_main)
        check_data(self.ledger, self.spec, self.state, resumed)
        last = len(self.spec.phases) - 1
        check_evaluation(self.ledger, self.spec, self.state, self._batch_size(last), self.dist.world_size,
                         self.objective.score_settings(self.plan.configs[last]), resumed)
        self._read_stop_target()

    def load(self, engine, tag: str) -> None:
        """A resume within a phase: weights, optimiser, schedule and RNG from checkpoint ``tag``; the schedule as
        the checkpoint's validation left it where that validation was done (:meth:`close_validation`)."""
        self.checkpoints.load_engine(engine, tag)
        if self._schedule is not None and engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(self._schedule)
        self._restore_rng(tag)

    def _restore_rng(self, tag: str) -> None:
        rng = self.checkpoints.rng_state(tag)
        if rng is not None:
            restore_rng(rng, self.generator, self.device)

    def _read_stop_target(self) -> None:
        """``train.stop_when_surpassing``: the baseline's best per-epoch score, read once when the run starts
        (``common.phases.baseline``: a baseline that is not comparable is refused, or accepted and recorded); a
        resumed run keeps the target of its checkpoint and needs no baseline directory."""
        path = self.spec.train.stop_when_surpassing
        if not path or self.stop_target is not None:
            return
        target = stop_target(path, self.objective.score_name, self.ledger.data, self.ledger.evaluation,
                             self.spec.train.accept_baseline_differences)
        for difference in target.get("accepted_differences", []):
            log.warning("train.stop_when_surpassing: comparing with %s although it differs (accepted by "
                        "train.accept_baseline_differences, recorded in ledger.json): %s", path, difference)
        self.stop_target = dict(target)
        self.ledger.set_stop_target(target)

    # ---------------------------------------------------------------------------------- the phases
    def start_phase(self, index: int) -> None:
        """Open (or, resumed, find) the phase's ledger record and say what the phase costs."""
        phase, cfg, row, split = (self.spec.phases[index], self.plan.configs[index], self.plan.rows[index],
                                  self.plan.splits[index])
        record = self.ledger.start_phase(
            index, name=phase.label(index), compression=phase.compression, factor=phase.factor,
            flops_per_sample=row.flops_per_sample, tokens_per_sample=cfg.num_tokens,
            patch_transfer=phase.patch_transfer if phase.compression == "patch" else None)
        setting = training_setting(self.spec.train.precision, self.zero_stage, self.dist.world_size, self.device)
        if self.bf16 is not None:  # the job's, not this rank's GPU's (a job of A100s and V100s trains in fp32)
            setting["bf16"] = self.bf16
        estimate = self.objective.memory_estimate(cfg, split.per_rank, **setting)
        record.memory_estimate_bytes = estimate.total
        record.trained_on(torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type,
                          split.world_size)  # before set_batch: a ledger older than `hardware` holds the last ranks
        record.set_batch(split)  # this launch's split (a resume on other ranks records its own)
        precision = None if self.bf16 is None else "bf16" if self.bf16 else "fp32"
        if precision:
            record.trained_in(precision)
        self._memory.reset()
        self.pending.restart_clock()
        prefix = cfg.num_tokens - cfg.num_patches  # the ledger's tokens_per_sample counts them (and tokens/s)
        log.info("%s: %s, %s tokens per clip (grid %dx%d%s), %.3g GFLOPs per training sample, batch %s%s; memory "
                 "estimate %s", phase.label(index),
                 f"{phase.steps} steps" if phase.iteration_based else f"{phase.epochs} epochs",
                 cfg.num_patches, *cfg.grid, f"; {cfg.num_tokens} with the {prefix} prefix tokens" if prefix else "",
                 record.flops_per_sample / 1e9, split.describe(),
                 {"bf16": ", in bf16 autocast", "fp32": ", in fp32", None: ""}[precision], estimate.describe())

    def restart_clock(self) -> None:
        """Training time and peak memory count from now (after a resume's set-up: the checkpoint read, the model and
        engine built, which are no training and would otherwise be timed with the next window)."""
        self._memory.reset()
        self.pending.restart_clock()

    @contextmanager
    def untimed(self):
        """What runs inside is no training time (the weights kept for averaging at an epoch's end: a write to
        disk, like a checkpoint): the clock moves on by what it took."""
        start = self.pending.now()
        try:
            yield
        finally:
            self.pending.clock += self.pending.now() - start

    def account(self, index: int) -> Window:
        """Move the steps / clips / seconds trained since the last call into the ledger (collective)."""
        now = self.pending.now()
        samples = int(self.dist.all_reduce_sum(torch.tensor([self.pending.samples], device=self.device)).item())
        window = self.ledger.add_training(index, self.pending.steps, samples, now - self.pending.clock,
                                          self.dist.world_size)
        self.ledger.set_peak_memory(index, self._memory.peak(), self._memory.source)
        self.pending.steps, self.pending.samples, self.pending.clock = 0, 0, now
        return window

    def _count_clips(self) -> None:
        """Add the clips every rank resampled up since the last call to the ledger, and set the run's bad-audio
        counts in it (every rank's, per split: the tracker's, which each checkpoint keeps, so a resume goes on from
        the checkpoint's counts) (collective: before each ledger write)."""
        self.ledger.add_upsampled(self.tracker.take_upsampled(self.dist))
        self.ledger.set_bad_audio(self.tracker.counts())

    def save(self, engine, index: int, pending_eval: bool, until: dict, window: LogWindow) -> None:
        """Checkpoint the run (``until``: the phase end criterion's state; ``window``: the open log window, saved
        folded over the ranks: :meth:`LogWindow.fold`), with its ledger (and, the first time, its recipe.yaml)."""
        self.account(index)
        self.tracker.check(whole=False)  # every rank's bad clips counted into the checkpoint, judged (collective)
        st = self.state
        st.pending_eval, st.until, st.window = pending_eval, until, window.fold()
        tag = self._tag(index)
        self._count_clips()
        if self.dist.is_main and self.spec.run_recipe is not None:
            self.spec.run_recipe.write_pending()  # the run's recipe.yaml appears with its first checkpoint
        self.checkpoints.save(engine, tag, self._trainer_state(index), capture_rng(self.generator, self.device))
        if self.dist.is_main:
            self.ledger.write(self.run_dir / "ledger.json")
        self.pending.restart_clock()

    def validated(self, model: nn.Module, index: int, metrics: dict, seconds: float) -> None:
        """After a validation of phase ``index``: the ledger, TensorBoard, and the best model's export."""
        epoch = None if self.spec.phases[index].iteration_based else self.state.epoch_in_phase
        self.ledger.add_eval_time(index, seconds, self.dist.world_size)
        where = {"epoch": epoch} if epoch is not None else {}
        record = self.ledger.add_eval(index, metrics, total_step=self.state.total_steps,
                                      phase_step=self.state.step, **where)
        self.scalars.log({f"eval/{k}": v for k, v in metrics.items()}, self.state.total_steps)
        self.scalars.flush()
        self._count_clips()
        log.info("validation (%s, %s): %s", self.spec.phases[index].label(index),
                 f"epoch {epoch}" if epoch is not None else f"step {self.state.step}",
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self.dist.is_main:
            score = metrics[self.objective.score_name]
            if self.state.best_score is None or score > self.state.best_score:
                self.state.best_score = score
                self.objective.export(model, self.run_dir / "export" / "best.safetensors",
                                      self._export_meta(index, eval=record))
            self.ledger.write(self.run_dir / "ledger.json")
            if index == len(self.spec.phases) - 1 and epoch is not None:  # weights that cannot be averaged any more
                self.average.prune(self._epoch_scores(index))

    def end_phase(self, model: nn.Module, index: int, decision: Decision) -> None:
        """Phase ``index`` ended (``decision``: why): the ledger's record of it, and the phase's export."""
        st, phase = self.state, self.spec.phases[index]
        where = {} if phase.iteration_based else {"epoch": st.epoch_in_phase}
        self.ledger.end_phase(index, decision.reason, decision.note, step=st.step, total_step=st.total_steps, **where)
        log.info("%s ended (%s): %s", phase.label(index), decision.reason, decision.note)
        if self.dist.is_main:
            self.ledger.write(self.run_dir / "ledger.json")  # why it ended, on disk before a stop at this point
            path = self.run_dir / "export" / f"phase{index + 1}.safetensors"
            self.objective.export(model, path, self._export_meta(index))
            record = self.ledger.phases[index]
            log.info("%s done; exported %s; %.3g %s-hours (training and validation, all ranks); peak memory "
                     "%.3g GiB (%s; estimate %.3g GiB)", phase.label(index), path,
                     record.device_seconds / 3600, "GPU" if self.device.type == "cuda" else self.device.type.upper(),
                     gib(record.peak_memory_bytes or 0), record.peak_memory_source,
                     gib(record.memory_estimate_bytes or 0))

    def _tag(self, index: int) -> str:
        """The tag of a checkpoint of phase ``index`` where the run is (its step, or epoch in an epoch phase)."""
        iteration_based = self.spec.phases[index].iteration_based
        return make_tag(index, self.state.progress(iteration_based), epochs=not iteration_based)

    def _trainer_state(self, index: int) -> dict:
        """What a checkpoint of phase ``index`` records besides the engine's files: where the run is, its ledger
        and bad-audio counts, and the layout its data position counts in (ranks, clips per rank)."""
        return {"state": asdict(self.state), "ledger": self.ledger.to_dict(), "tracker": self.tracker.state_dict(),
                "world_size": self.dist.world_size, "batch_per_rank": self._batch_size(index),
                "zero_stage": self.zero_stage, "sampler": sampler(self.spec)}

    def close_validation(self, index: int, until: dict, scheduler) -> None:
        """The validation that this step's checkpoint left pending is done and the phase goes on: the checkpoint
        says so, with the ledger, the phase end criterion's state (``until``) and the learning-rate schedule as
        that validation left them (its reaction to the score: the engine's files were written before it), so that
        a resume from it trains on instead of validating again. Rank 0 writes; every rank calls."""
        self.state.until = until
        schedule = scheduler.state_dict() if scheduler is not None else None
        self.checkpoints.restate(self._tag(index), **self._trainer_state(index), schedule=schedule)

    def close_resumed_validation(self, index: int, until: dict, scheduler) -> None:
        """The validation that the checkpoint this run resumed from left pending (cut short) is done again and the
        phase goes on: the checkpoint says so as :meth:`close_validation` does, so that a later resume from it
        (this launch ending before its next checkpoint) does not validate a third time. Only where the trainer
        state restated is the checkpoint's own plus that validation: the run resumed on the checkpoint's layout
        (ranks, clips per rank: its engine files and data position stay theirs) and nothing was changed at the
        resume (no intervention recorded: a later resume records its own changes once). Otherwise the checkpoint
        stays as it was saved. Collective: rank 0 decides."""
        resumed, self._resumed_as_saved = self._resumed_as_saved, None
        as_saved = resumed is not None and resumed == (tag_place(self._tag(index)), len(self.ledger.interventions))
        if self.dist.broadcast_object(as_saved if self.dist.is_main else None):
            self.close_validation(index, until, scheduler)

    def close_phase(self, index: int) -> None:
        """Phase ``index``'s end work (its validation, record and export) is done: its checkpoint, taken before
        that work, says so, so that a resume from it goes straight on to what follows (it redid the validation).
        The whole trainer state is written again, as of now: a run resumed there on another layout holds its data
        position in this layout's terms, not the checkpoint's."""
        self.state.phase_closed, self.state.pending_eval = True, False
        self.checkpoints.restate(self._tag(index), **self._trainer_state(index))

    def next_phase(self, index: int) -> None:
        """Where the run is at the start of phase ``index + 1``; the best score is per phase ("best" means the
        best of the final phase, the paper's reports)."""
        st = self.state
        data_epoch, data_index = st.data_epoch, st.data_index
        if self._batch_size(index) != self._batch_size(index + 1) and data_index:
            data_epoch, data_index = data_epoch + 1, 0  # positions count batches: a new batch size starts an epoch
        self.state = TrainState(phase=index + 1, data_epoch=data_epoch, data_index=data_index,
                                total_steps=st.total_steps)

    def nonfinite(self, label: str, step: int, value: str, what: str) -> NonFiniteLoss:
        """The error of a non-finite loss in phase ``label`` at ``step``, naming the last good checkpoint."""
        tag = self.checkpoints.latest_tag()
        return NonFiniteLoss(
            f"non-finite loss {value}in {label} at step {step}; {what}. The last good checkpoint is "
            f"{self.checkpoints.ckdir / tag if tag else 'none (no checkpoint yet)'}; the data can cause it as well as "
            f"the learning rate: run the command again to resume from it with a lower one (e.g. --set optim.lr=...: a "
            f"resumed run accepts learning-rate and schedule changes and records them in ledger.json), and if the "
            f"loss turns non-finite at this step again (the clips come in the same seeded order), look for a clip "
            f"whose audio or labels are broken in the training data rather than lowering the rate further")

    def log_window(self, index: int, window: LogWindow, lr: float, bar) -> None:
        """A log window's mean losses over every rank's micro-batches (``window`` empties) and the throughput
        since the last account, to TensorBoard, the progress bar and the log (collective)."""
        trained = self.account(index)
        values = {f"train/{k}": v for k, v in window.means().items()}
        values.update({
            "train/lr": lr,
            "perf/samples_per_s": trained.samples_per_second,
            "perf/tokens_per_s": trained.samples_per_second * self.ledger.phases[index].tokens_per_sample,
            "perf/train_flops": self.ledger.totals()["train_flops"],
            "perf/peak_memory_gib": gib(self.ledger.phases[index].peak_memory_bytes),
            "phase": index + 1,
        })
        self.scalars.log(values, self.state.total_steps)
        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in values.items()
                         if k.startswith("train/") and k != "train/lr"} | {"lr": f"{values['train/lr']:.2e}"})
        log.info("step %d (%s): %s | %.1f samples/s", self.state.step, self.spec.phases[index].label(index),
                 ", ".join(f"{k[6:]}={v:.4g}" for k, v in values.items() if k.startswith("train/")),
                 values["perf/samples_per_s"])

    def _export_meta(self, index: int, **extra) -> dict:
        phase = self.spec.phases[index]
        return {**self.spec.meta, **self.plan.arch.export_meta(self.plan.configs[index]),
                "phase": {"index": index + 1, "of": len(self.spec.phases), "compression": phase.compression,
                          "factor": phase.factor, "patch_transfer": phase.patch_transfer},
                # how validation filled and cut its clips: evaluation and prediction of the export do the same
                "clips": {"pad": self.spec.data.pad, "crop": self.spec.data.eval_crop,
                          "channels": self.spec.data.channels_for(self.plan.arch)}, **extra}

    # ------------------------------------------------------------------------------------- the end
    def _epoch_scores(self, index: int) -> dict[int, float]:
        """Phase ``index``'s validation score per epoch, from the ledger."""
        return {e["epoch"]: e["metrics"][self.objective.score_name] for e in self.ledger.evals
                if e["phase"] == index and "epoch" in e and self.objective.score_name in e.get("metrics", {})}

    def average_into(self, model: nn.Module, index: int) -> list[int]:
        """Load the average of the kept epochs' weights (the best ``weight_average_top``, if set) into
        ``model``; returns the epochs averaged (AST's weight averaging)."""
        scores, ran = self._epoch_scores(index), self.state.epoch_in_phase
        epochs = self.average.chosen(scores, ran=ran, kept_only=True)
        removed = sorted(set(self.average.chosen(scores, ran=ran)) - set(epochs))
        if removed:
            log.warning("train.weight_average_top: epoch(s) %s rank among the best now but were removed when %d "
                        "others outscored them (a resume from an older checkpoint went otherwise); averaging the "
                        "best of the epochs kept: %s", ", ".join(map(str, removed)), self.average.top,
                        ", ".join(map(str, epochs)))
        top = self.average.top
        if top is not None and len(epochs) < top:
            log.warning("train.weight_average_top: the final phase ended after %d epochs, fewer than the %d to "
                        "average; averaging all %d", self.state.epoch_in_phase, top, len(epochs))
        model.load_state_dict(self.average.average(epochs))
        model.to(self.device)
        return epochs

    def averaged(self, model: nn.Module, index: int, epochs: list[int], metrics: dict, seconds: float = 0.0) -> Path:
        """Record the average's evaluation (``seconds`` it took: device time as every validation's) and export it;
        returns its export."""
        self.ledger.add_eval_time(index, seconds, self.dist.world_size)
        self.ledger.add_eval(index, metrics, total_step=self.state.total_steps, phase_step=self.state.step,
                             weight_averaged=epochs)
        target = self.stop_target or {}
        versus = "" if target.get("averaged") is None else \
            f" (the baseline's weight average: {target['score']}={target['averaged']:.4f})"  # like with like
        log.info("weight average of epochs %s: %s%s", ", ".join(map(str, epochs)),
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), versus)
        path = self.run_dir / "export" / "weight_averaged.safetensors"
        if self.dist.is_main:
            self.objective.export(model, path, self._export_meta(index, weight_averaged=epochs, eval=metrics))
        return path

    def finish(self, final: Path) -> None:
        """The run is done: ``final`` (the final phase's export or the weight average) becomes its model."""
        self._count_clips()
        if self.dist.is_main:
            atomic_copy(final, self.run_dir / "model.safetensors")
            self.ledger.write(self.run_dir / "ledger.json")
            totals, saving = self.ledger.totals(), self.ledger.flops_saving()
            log.info("run complete: %d steps, %.3g training FLOPs, %.0f s training%s; model: %s",
                     totals["steps"], totals["train_flops"], totals["wall_seconds"],
                     "" if saving is None else f", {saving_words(saving)} than {self.ledger.baseline['recipe']}",
                     self.run_dir / "model.safetensors")
        self.state.phase = len(self.spec.phases)
