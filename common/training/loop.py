"""The one training loop, shared by SSAST pretraining and supervised fine-tuning.

What differs between the two (model heads, loss, evaluation, export) is an :class:`Objective`; what each phase
is and costs is the run's plan (``common.training.plan``); everything the run directory holds is the run's
record (``common.training.record``). The trainer runs the phases in order: for each it builds the phase's
model (``common.phases.transition``: the previous model's weights adapted to the new grid) and a fresh
DeepSpeed engine (``common.training.optim``: the optimiser and the learning-rate schedule restart, paper
section 2.2), streams waveform batches (``common.data.loader``) through the phase's feature pipeline, and steps:

    for each phase: for each optimiser step (``common.training.steps``): micro-batches -> loss -> backward -> step
        every log_every steps: log the window's losses and throughput
        at a save point: checkpoint, then validate if due (the checkpoint then says it was done); at an epoch end:
        keep weights for averaging, checkpoint, validate; then the phase change

A phase ends at its planned length, or, with an ``until`` section or ``train.stop_when_surpassing``, at the
validation round where its criterion decides so (``common.phases.phase_end``: rank 0 decides, every rank follows;
the criterion's state is checkpointed). Validation follows the checkpoint of the same step (the checkpoint
remembers that it is pending), so an error in validation never loses training; a validation done is restated into
that checkpoint (``RunRecord.close_validation``), so a resume there does not run it again. A non-finite loss stops
the run before the optimiser step, leaving the last checkpoint intact. A micro-batch whose clips were all bad audio
takes its step with a zero gradient, so that every rank takes the same steps; too much bad audio is judged on
the counts of all ranks at the log windows and checkpoints (``common.data.bad_audio.BadAudioTracker``).
Re-running on the same run directory resumes exactly.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from common.phases.phase_end import PhaseEnd
from common.phases.transition import initial_model, next_phase_model
from common.system.distributed import Dist
from common.system.logger import progress
from common.system.signals import StoppedBySignal, stop_requested
from common.training.compile import maybe_compile
from common.training.log_window import LogWindow
from common.training.machinery import PhaseMachinery
from common.training.objective import Objective
from common.training.optim import build_engine
from common.training.out_of_memory import OutOfDeviceMemory, is_out_of_memory, out_of_memory
from common.training.plan import RunPlan, build_plan
from common.training.record import RunRecord
from common.training.release import collect, release_engine
from common.training.spec import RunSpec
from common.training.steps import StepGroup, broadcast_statistics, step_groups

__all__ = ["Trainer", "step_groups", "deterministic_mode"]

log = logging.getLogger(__name__)


def deterministic_mode(deterministic: bool, device: torch.device, arch) -> str:
    """What of ``arch``'s step has no deterministic kernel on ``device`` when ``train.deterministic`` asks for them
    all (PyTorch then warns instead of raising at it: HTS-AT stopped at its first backward pass on a GPU), or ""."""
    return arch.nondeterministic_on_cuda if deterministic and device.type == "cuda" else ""


class Trainer(PhaseMachinery):
    """Runs (or resumes) the phases of ``spec`` with ``objective``, as ``plan`` plans them (default: planned
    here, :func:`common.training.plan.build_plan`). What one phase trains with (its loaders, front end,
    micro-step and validation pass: ``self._train_loader``, ``self._evaluate``, ...) is the base class's,
    :class:`common.training.machinery.PhaseMachinery`."""

    def __init__(self, spec: RunSpec, objective: Objective, dist: Dist, plan: RunPlan | None = None) -> None:
        if plan is None or plan.world_size != dist.world_size:  # refuses a global batch that does not split here
            plan = build_plan(spec, objective, dist.world_size, baseline=plan and plan.baseline)
        super().__init__(spec, objective, dist, plan, RunRecord(spec, plan, objective, dist))
        self.scalars = self.record.scalars
        self._end: PhaseEnd | None = None  # what may end the current phase (see _phase_end)
        self._stopped_by: int | None = None  # the signal that stopped this call (common.system.signals)
        self._window = LogWindow(dist)  # the open log window's loss sums on this rank
        # (phase, total steps, epochs done) of this call's last checkpoint: where it is, and its tag
        self._saved_at: tuple[int, int, int] | None = None
        self._per_epoch: int | None = None  # optimiser steps per epoch of an epoch-based phase (None: unknown)
        self.steps_taken = 0  # optimiser steps of the last call of run() (a command's budget spans several runs)

    # ------------------------------------------------------------------------------------- the run
    def run(self, stop_after: int | None = None) -> bool:
        """Train until every phase is done (True) or ``stop_after`` optimiser steps in this call (False)."""
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        lax = deterministic_mode(self.spec.train.deterministic, self.device, self.arch)
        if lax and self.dist.is_main:
            log.warning("train.deterministic on CUDA: PyTorch has no deterministic kernel for %s; it runs as it can "
                        "(PyTorch warns once), the rest deterministically: a resume may differ in the last digits",
                        lax)
        torch.use_deterministic_algorithms(deterministic or self.spec.train.deterministic, warn_only=bool(lax))
        try:
            return self._run(stop_after)
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(err):
                raise
            raise self._out_of_memory(err) from err
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            self._close_loaders()
            self.scalars.close()
            if hasattr(self.objective, "close"):  # its threads (SSAST's mask draws)
                self.objective.close()

    def _run(self, stop_after: int | None) -> bool:
        record, last = self.record, len(self.spec.phases) - 1
        model, resume_tag = record.resume()
        if record.complete():
            return True
        record.open(resumed=model is not None or resume_tag is not None)
        if record.state.phase_done and not record.state.phase_closed:  # resumed at a phase end: what follows it
            record.restart_clock()  # reading the checkpoint and building the model are no training time
            self._complete_phase(model, record.state.phase, scheduler=None)
        self.steps_taken = 0
        while not (record.state.phase_done and record.state.phase == last):
            index = record.state.phase
            if record.state.phase_done:
                if self._signalled(at_sync=True):  # the phase's end is checkpointed: stop before the next one
                    raise StoppedBySignal(self._stopped_by, f"at the end of {self.spec.phases[index].label(index)}")
                if stop_after is not None and self.steps_taken >= stop_after:  # not a step of the next phase more
                    log.info("stopped after %d steps as asked; run the same command again to resume", self.steps_taken)
                    return False
                model = self._next_phase(model, index)
                collect()  # the previous phase's model is gone now: free its cycles (common.training.release)
                continue
            self._stop_before_training(index)
            if model is None:  # the phase's model from scratch or the initial weights (a resume loads its own)
                init = self.spec.init if index == 0 and resume_tag is None else None
                if init is not None and "recorded" in init.meta:  # the init's settings only (a resume without it)
                    raise FileNotFoundError(
                        f"{init.meta.get('file', 'the --init file')} does not exist, and {self.record.run_dir} starts "
                        f"a model from it here (only a run that resumes from its checkpoints goes on without it)")
                model = initial_model(self.arch, self.objective, self.cfgs[index], self.spec.phases[index],
                                      self.spec.train.seed + index, init,
                                      self.spec.init_pos_embed or self.spec.transfer.pos_embed, self.spec.transfer)
                if init is not None:
                    log.info("initialised the encoder from %s", self.spec.meta.get("init", "the given weights"))
                self._seed_rank(index)
            engine = self._engine(model, index, resume_tag)
            record.checkpoints.ensure_room(engine)  # the first checkpoint fits, or nothing is trained to be lost
            if resume_tag is not None:  # mid-phase: weights, optimiser and schedule from the checkpoint
                record.load(engine, resume_tag)
                resume_tag = None
                record.restart_clock()  # reading the checkpoint and building the engine are no training time
                if record.state.pending_eval:  # the checkpoint's validation was cut short: run again
                    self._validate(engine.module, index, engine.lr_scheduler)
                    if self._phase_end(index).decision is None:  # the phase goes on: the checkpoint says it is done
                        record.close_resumed_validation(index, self._phase_end(index).saved_state(self.dist),
                                                        engine.lr_scheduler)
            budget = None if stop_after is None else stop_after - self.steps_taken
            finished, steps = self._train_phase(engine, index, budget)
            self.steps_taken += steps
            model = release_engine(engine)  # the bare model: the engine's hooks, optimizer state, gradients released
            del engine
            if not finished:
                if self._stopped_by is not None:
                    raise StoppedBySignal(self._stopped_by, f"after step {record.state.step} of "
                                                            f"{self.spec.phases[index].label(index)}")
                log.info("stopped after %d steps as asked; run the same command again to resume", self.steps_taken)
                return False
        self._finish(model)
        return True

    def _out_of_memory(self, err: BaseException) -> OutOfDeviceMemory:
        """``err`` (the device out of memory) said with where the run was, its micro-batch and the plan's estimate
        (``common.training.out_of_memory``)."""
        index = self.state.phase
        label = self.spec.phases[index].label(index)
        validating = self._validating
        batch = self._eval_batch(index) if validating else self.splits[index].per_rank
        where = f"{'the validation of ' if validating else ''}{label} at step {self.state.step}"
        phases = self.record.ledger.phases
        estimate = phases[index].memory_estimate_bytes if index < len(phases) and not validating else None
        return out_of_memory(err, self.device, where, batch, estimate, validating)

    def _train_phase(self, engine, index: int, budget: int | None) -> tuple[bool, int]:
        """Train phase ``index`` to its end (True) or until ``budget`` steps (False); returns the steps done."""
        st, phase = self.state, self.spec.phases[index]
        ended, steps = self._phase_end(index).decision is not None, 0  # decided by the validation a resume re-ran
        self._window = LogWindow(self.dist)
        if not ended:  # the workers start (or resume) and decode before the phase's clock starts
            loader = self._train_loader(index)
            stream = loader.batches(st.data_epoch, st.data_index,
                                    None if phase.iteration_based else phase.max_length - st.epoch_in_phase,
                                    count=False)  # counted as trained on (_step): a checkpoint counts what it holds
        self.record.start_phase(index)
        self._finite.restart(st.step, self.splits[index].grad_accum)
        if not ended:
            per_epoch = self._per_epoch = None if phase.iteration_based else self._epoch_steps(index)
            total = phase.steps if phase.iteration_based else \
                None if per_epoch is None else phase.max_length * per_epoch
            bar = progress(total, st.step, phase.label(index), self.dist.is_main)
            pipeline = self._frontend(index, self.objective.specaug)
            window = self._window = LogWindow(self.dist, st.window)  # a resumed window goes on where it was saved
            try:
                for group in step_groups(stream, self.splits[index].grad_accum, not phase.iteration_based,
                                         st.data_epoch):
                    out_of_budget = False  # the budget counts steps: an epoch end is no step
                    if group.epoch_end is not None:
                        ended = self._epoch_end(engine, index, group)
                    else:
                        if steps == 0:  # its first batch is in hand: the data is read, the workers started
                            self._stop_before_training(index)
                        steps += 1
                        out_of_budget = (budget is not None and steps >= budget) or \
                            self._signalled(at_sync=(st.step + 1) % self.spec.train.log_every == 0)
                        ended = self._step(engine, index, group, pipeline, window, bar, out_of_budget)
                    if ended and st.step % self.spec.train.log_every:  # the phase's last, partial window
                        self._log_window(engine, index, window, bar)
                    if ended or out_of_budget:
                        break
                else:
                    raise RuntimeError(f"{phase.label(index)}: the data stream ended early")
            finally:
                bar.close()
                if hasattr(stream, "close"):
                    stream.close()
        if ended:
            self._end_phase(engine, index)
        return ended, steps

    def _stop_before_training(self, index: int) -> None:
        """Before this call's first step (collective, once on every rank at the same points): a stop signal that
        came while the command started (its data read, indexed, the engine built) ends it now, with nothing new
        to save, instead of after a step and a checkpoint that may not fit in the sender's grace period.

        Raises:
            StoppedBySignal: a rank was signalled (not saved: the last checkpoint, if any, is where a rerun goes on).
        """
        if self.steps_taken == 0 and self._signalled(at_sync=True):
            raise StoppedBySignal(self._stopped_by, f"before the first step of {self.spec.phases[index].label(index)}",
                                  saved=False)

    def _signalled(self, at_sync: bool) -> bool:
        """Whether a stop signal ends this call after the step about to be taken (or at this phase end).

        One process decides on its own flag at every step. Several ranks decide together, only where they
        synchronise anyway (``at_sync``: a log window's end, a phase's end; a collective per step would make
        the host wait for the device), so that every rank checkpoints the same step."""
        if self.dist.world_size == 1:
            signum = stop_requested()
        elif at_sync:  # any rank's signal (the highest number where ranks got different ones), on every rank
            flag = torch.tensor([float(stop_requested() or 0)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item()) or None
        else:
            return False
        if signum:
            self._stopped_by = signum
        return bool(signum)

    def _step(self, engine, index: int, group: StepGroup, pipeline: nn.Module, window: LogWindow, bar,
              last: bool) -> bool:
        """One optimiser step, then what falls due after it (``last``: the last of this call's budget: checkpoint
        it); True when the phase ends here."""
        st, phase, train = self.state, self.spec.phases[index], self.spec.train
        for batch in group.batches:
            self.tracker.update(batch)  # its clips and bad clips, counted as trained on
            logs = self._micro_step(engine, batch, pipeline, index)
            if not len(batch):  # no usable clip: a step that contributes nothing, logged as nothing
                continue
            self._end.add_loss(logs["loss"])
            window.add(logs)  # summed on the device: no host sync per step
            self.record.pending.samples += len(batch)
        broadcast_statistics(engine.module, self.dist)  # rank 0's BatchNorm statistics on every rank (HTS-AT's bn0)
        st.step += 1
        st.total_steps += 1
        self.record.pending.steps += 1
        st.data_epoch, st.data_index = group.position
        bar.update(1)
        if st.step % train.log_every == 0:
            self._log_window(engine, index, window, bar)
        if phase.iteration_based and st.step == phase.max_length:
            return True
        eval_due = phase.iteration_based and st.step % train.eval_every == 0
        # within an epoch too, but not at its last step: the epoch's end, checkpointed besides, follows at this step
        epoch_ends = not phase.iteration_based and bool(self._per_epoch) and st.step % self._per_epoch == 0
        if (st.step % train.save_every == 0 and not epoch_ends) or last:
            self._save(engine, index, pending_eval=eval_due)  # checks the losses first
        elif eval_due:
            self._check_finite(index)  # no validation (nor best.safetensors) of weights a non-finite loss broke
        if eval_due:
            self._validate(engine.module, index, engine.lr_scheduler)
            self._validated(engine, index)
        return self._end.decision is not None

    def _epoch_end(self, engine, index: int, group: StepGroup) -> bool:
        """An epoch of an epoch-based phase ended: keep the weights for averaging, then end the phase at its
        length, or checkpoint and validate (its criterion may end it there); True when the phase ends here."""
        st = self.state
        self._check_finite(index)
        st.epoch_in_phase += 1
        st.data_epoch, st.data_index = group.position
        self.record.ledger.set_epochs(index, st.epoch_in_phase)
        if index == len(self.spec.phases) - 1 and self.dist.is_main:
            with self.record.untimed():  # a write to disk, no training time
                self.record.average.keep(engine.module, st.epoch_in_phase)
        if st.epoch_in_phase == self.spec.phases[index].max_length:
            return True
        self._save(engine, index, pending_eval=True)
        self._validate(engine.module, index, engine.lr_scheduler)
        self._validated(engine, index)
        return self._end.decision is not None

    def _end_phase(self, engine, index: int) -> None:
        """The phase's last step is done: checkpoint it as done, validate (unless a criterion just decided
        on this step's validation), export."""
        self.state.phase_done = True
        if self._saved_at != self._here(index):
            self._save(engine, index, pending_eval=self._end.decision is None)
        # else checkpointed at this step already (a save step whose validation ended the phase): the phase's close
        # (RunRecord.close_phase) rewrites that checkpoint's state as done, instead of a second save of one tag
        self._complete_phase(engine.module, index, engine.lr_scheduler)

    def _complete_phase(self, model: nn.Module, index: int, scheduler) -> None:
        """The end-of-phase work that follows its checkpoint: the pending validation, then the record of why the
        phase ended and its export."""
        st = self.state
        model.to(self.device)
        if st.pending_eval:
            self._validate(model, index, scheduler)
        at = st.progress(self.spec.phases[index].iteration_based)
        self.record.end_phase(model, index, self._phase_end(index).end_reason(at))
        self.record.close_phase(index)

    def _next_phase(self, model: nn.Module, index: int) -> nn.Module:
        """After phase ``index``: the model of phase ``index + 1``, its weights adapted to the new grid."""
        spec = self.spec
        prev, nxt = spec.phases[index], spec.phases[index + 1]
        self.record.next_phase(index)
        old, new = self.cfgs[index], self.cfgs[index + 1]
        fresh = next_phase_model(self.arch, self.objective, model, old, new, prev, nxt, spec.transfer,
                                 seed=spec.train.seed + index + 1)
        log.info("phase change -> %s: grid %s -> %s, tokens %d -> %d; optimizer and LR schedule restart",
                 nxt.label(index + 1), "x".join(map(str, old.grid)), "x".join(map(str, new.grid)),
                 old.num_patches, new.num_patches)
        self.scalars.log({"phase": index + 2}, self.state.total_steps)
        self._seed_rank(index + 1)
        return fresh

    def _engine(self, model: nn.Module, index: int, resume_tag: str | None = None):
        phase, optim = self.spec.phases[index], self.spec.optim
        model = maybe_compile(model, self.spec.train.compile, self.spec.train.compile_backend,
                              self.spec.train.compile_mode)
        return build_engine(model, optim, phase.lr or optim.lr, self.splits[index].per_rank,
                            self.record.zero_stage, self.device, self._schedule_steps(index),
                            getattr(model, "head_prefixes", ()), self.autocast_dtype,
                            load_universal=resume_tag is not None and self.record.checkpoints.resharded(resume_tag),
                            grad_accum=self.splits[index].grad_accum, zero_overlap_comm=self.spec.train.zero_overlap_comm,
                            zero_bucket_size=self.spec.train.zero_bucket_size)

    def _schedule_steps(self, index: int) -> int | None:
        """Phase ``index``'s planned length in optimiser steps, what a cosine schedule decays over: its ``steps``, or
        for an epoch-based phase its planned ``epochs`` x the optimiser steps of an epoch (None: a schedule that
        does not need it)."""
        phase = self.spec.phases[index]
        if phase.iteration_based:
            return phase.steps
        if self.spec.optim.schedule != "cosine":
            return None
        per_epoch = self._epoch_steps(index)
        if per_epoch is None:
            raise ValueError(f"optim.schedule: cosine decays over the phase's steps, and the steps of an epoch of "
                             f"{phase.label(index)} are unknown (a streamed training set whose size is not known "
                             f"before it is read); give the phase steps instead of epochs, or another schedule")
        return phase.length * max(1, per_epoch)

    def _epoch_steps(self, index: int) -> int | None:
        """Optimiser steps in an epoch of phase ``index`` (its training set's batches, as the loader counts or
        estimates them, per accumulation group); None when its size is unknown."""
        batches = self._train_loader(index).estimated_batches_per_epoch()
        return None if batches is None else batches // self.splits[index].grad_accum

    def _finish(self, model: nn.Module) -> None:
        """Weight-average if asked, and make the final phase's model (or the average) the run's model."""
        last = len(self.spec.phases) - 1
        final = self.record.run_dir / "export" / f"phase{last + 1}.safetensors"
        if self.record.average.epochs:
            epochs = self.record.average_into(model, last)
            start = time.perf_counter()
            metrics = self._evaluate(model, last) if self.spec.data.valid else {}
            final = self.record.averaged(model, last, epochs, metrics, time.perf_counter() - start)
        self.record.finish(final)

    # ------------------------------------------------------------------------ checkpoints, validation
    def _save(self, engine, index: int, pending_eval: bool = False) -> None:
        self._check_finite(index)  # nothing after a non-finite loss is ever saved
        self.record.save(engine, index, pending_eval, self._phase_end(index).saved_state(self.dist), self._window)
        self._saved_at = self._here(index)

    def _validate(self, model: nn.Module, index: int, scheduler) -> None:
        """Validate, record, let the LR schedule react (plateau / multistep), and judge the phase's end."""
        self.record.account(index)
        self.state.pending_eval = False
        score = se = None
        if self.spec.data.valid:
            start = time.perf_counter()
            metrics = self._evaluate(model, index)
            score, se = metrics[self.objective.score_name], metrics.get(f"{self.objective.score_name}_se")
            if scheduler is not None and scheduler.report(score):
                log.info("learning rate now %.3g (%s schedule)", scheduler.get_last_lr()[0], self.spec.optim.schedule)
            self.record.validated(model, index, metrics, time.perf_counter() - start)
        self._judge(index, score, se)
        if self.spec.data.valid:
            self.record.pending.restart_clock()

    def _here(self, index: int) -> tuple[int, int, int]:
        """Where the run is, as a checkpoint would record it: (phase, total steps, epochs done). A checkpoint taken
        at an epoch's last step (``train.save_every``) is not the epoch end's, which is taken at the same step."""
        return index, self.state.total_steps, self.state.epoch_in_phase

    def _validated(self, engine, index: int) -> None:
        """A validation after this step's checkpoint is done and the phase goes on: the checkpoint says so
        (:meth:`RunRecord.close_validation`), so that a resume from it trains on instead of validating again. A
        phase that ends here is closed by its end's work (:meth:`RunRecord.close_phase`)."""
        if self._saved_at == self._here(index) and self._phase_end(index).decision is None:
            self.record.close_validation(index, self._phase_end(index).saved_state(self.dist), engine.lr_scheduler)

    def _phase_end(self, index: int) -> PhaseEnd:
        """What may end phase ``index`` (built on first use in the phase, from the checkpointed state)."""
        if self._end is None or self._end.index != index:
            self._end = PhaseEnd.for_phase(self.spec.phases, index, self.record.stop_target, self.state.until,
                                           lambda i: self.plan.rows[i].flops_per_sample, self.spec.optim.warmup_steps,
                                           pending_losses=self.dist.is_main)
        return self._end

    def _judge(self, index: int, score: float | None, score_se: float | None = None) -> None:
        """A validation round of phase ``index`` ended (``score``: None without a validation set; ``score_se``:
        its standard error, if the objective reports one): may the phase end here? Collective: every rank
        takes rank 0's decision."""
        phase, st = self.spec.phases[index], self.state
        at = st.progress(phase.iteration_based)
        end = self._phase_end(index)
        decision = end.check(self.dist, at, score, self.record.ledger.phases[index].train_flops, score_se, st.step)
        if end.learned is not None and end.learned == end.checks and end.criterion is not None:
            log.info("%s has shown that it learns (two rounds beyond the noise past its first): its criterion "
                     "may end it from here", phase.label(index))
        if decision is not None:
            log.info("%s ends here (%s %d): %s", phase.label(index), "step" if phase.iteration_based else "epoch",
                     at, decision.note)

    def _log_window(self, engine, index: int, window: LogWindow, bar) -> None:
        self._check_finite(index)
        self.tracker.check(whole=False)  # every rank's bad clips so far, judged together (collective)
        self.record.log_window(index, window, engine.lr_scheduler.used_lr(), bar)
