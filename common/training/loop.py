"""The one training loop, shared by SSAST pretraining and supervised fine-tuning.

What differs between the two (model heads, loss, evaluation, export) is an :class:`Objective`. The
trainer runs the phases in order; for each phase it builds the phase's model (``common.phases.transition``: the
previous model's weights adapted to the new grid) and a fresh DeepSpeed engine (``common.training.optim``: the
optimiser and the learning-rate schedule restart, paper section 2.2), streams waveform batches
(``common.data.loader``) through the phase's feature pipeline, and steps:

    for each optimiser step: micro-batches -> features -> objective loss -> backward -> step
        every log_every steps: log the window's losses and throughput
        at a save point: checkpoint (``common.training.checkpoints``), then validate if due
        at an epoch end (epoch-based phases): keep weights for averaging, checkpoint, validate

A phase ends at its planned length, or, with an ``until`` section or ``train.stop_when_surpassing``, at the
validation round where its criterion decides so (``common.phases.criteria``: rank 0 decides, every rank follows;
the criterion's state is checkpointed); the ledger records why and when each phase ended.

Validation follows the checkpoint of the same step (the checkpoint remembers that it is pending), so an
error in validation never loses training. A non-finite loss stops the run before the optimiser step,
leaving the last checkpoint intact. A micro-batch whose clips were all bad audio takes its step with a zero
gradient, so that every rank takes the same steps; too much bad audio is judged on the counts of all ranks
at the log windows and checkpoints (``common.data.loader.BadAudioTracker``). Re-running on the same run directory resumes exactly. Compute and time
go into the ledger (``common.training.ledger``), scalars into TensorBoard, and each phase's model into
``export/phaseN.safetensors``; the final model (or the weight average, ``common.training.weight_average``) becomes
``model.safetensors``.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from torch import nn

from common.models.arch import architecture_for
from common.models.arch import geometries
from common.system.atomic import atomic_copy
from common.audio.augment import SpecAugmentConfig
from common.training.batch import phase_splits
from common.training.compile import maybe_compile
from common.phases.baseline import evaluation_settings, setting_differences, stop_target
from common.phases.criteria import PhaseEnd
from common.data.loader import BadAudioTracker, Batch, eval_loader, make_cache, reshard_index, train_loader
from common.data.fingerprint import DataChanged, changes, run_fingerprints
from common.system.distributed import Dist
from common.system.engine_config import resolve_zero_stage
from common.training.ledger import Ledger, Window
from common.system.logger import Scalars, progress
from common.models.memory import PeakMemory, gib, training_setting
from common.training.nonfinite import NonFiniteLoss, NonFiniteWatch
from common.training.objective import Objective
from common.training.optim import build_engine
from common.training.release import collect, release_engine
from common.training.checkpoints import RunCheckpoints, capture_rng, make_tag, restore_rng
from common.training.spec import RunSpec, TrainState
from common.phases.transition import initial_model, next_phase_model
from common.training.weight_average import WeightAverage, averaged_epochs

__all__ = ["Trainer", "step_groups"]

log = logging.getLogger(__name__)


class StepGroup(NamedTuple):
    """One optimiser step's micro-batches, or an epoch end (``batches`` empty, ``epoch_end`` set)."""

    batches: list[Batch]
    position: tuple[int, int]  # the data position after these batches: (epoch, batches consumed)
    epoch_end: int | None = None  # the epoch that just ended


def step_groups(stream: Iterator[Batch], accum: int, epoch_based: bool,
                start_epoch: int | None = None) -> Iterator[StepGroup]:
    """Group a batch stream into optimiser steps of ``accum`` micro-batches.

    Every batch takes its place, also one whose clips were all unusable (empty): the trainer runs it as a
    micro-step that contributes nothing (``Trainer._micro_step``), so that every rank takes the same steps
    whatever its clips and the accumulation groups follow the data positions. In epoch-based phases an
    epoch end is announced as a group of its own, and a partial group left at an epoch end is dropped (as
    a DataLoader with ``drop_last``: a step never mixes two epochs). ``start_epoch``: the epoch the stream starts in, whose
    end is announced even when the stream has no batch left of it (a resume at the end of an epoch).
    """
    group: list[Batch] = []
    current = start_epoch
    for batch in stream:
        if epoch_based and current is not None and batch.epoch != current:
            group = []
            yield StepGroup([], (current + 1, 0), epoch_end=current)
        current = batch.epoch
        group.append(batch)
        if len(group) == accum:
            yield StepGroup(group, (batch.epoch, batch.index + 1))
            group = []
    if epoch_based and current is not None:
        yield StepGroup([], (current + 1, 0), epoch_end=current)


@contextmanager
def _norms_frozen(model: nn.Module, frozen: bool = True):
    """BatchNorm layers of ``model`` in eval mode within (their running statistics stay as they are)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training] \
        if frozen else []
    for module in norms:
        module.eval()
    try:
        yield
    finally:
        for module in norms:
            module.train()


class _Pending:
    """Training not yet moved into the ledger: steps and clips (this rank) since ``clock``."""

    def __init__(self) -> None:
        self.steps, self.samples, self.clock = 0, 0, time.perf_counter()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()


class Trainer:
    """Runs (or resumes) the phases of ``spec`` with ``objective``."""

    def __init__(self, spec: RunSpec, objective: Objective, dist: Dist) -> None:
        self.spec = spec
        self.objective = objective
        self.dist = dist
        self.run_dir = Path(spec.run_dir)
        self.arch = architecture_for(spec.base, spec.audio)
        self.cfgs = geometries(self.arch, spec.phases)
        # each phase's global batch over this launch's ranks (refused here, before any compute, if it does not split)
        self.splits = phase_splits(spec.phases, spec.data, spec.optim, dist.world_size)
        self.device = dist.device
        self.zero_stage = resolve_zero_stage(spec.train.zero_stage, dist.world_size)  # a resume keeps its own
        bf16 = spec.train.precision == "bf16" or (spec.train.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.state = TrainState()
        self.ledger = Ledger(objective.score_name)
        if spec.baseline is not None:
            self.ledger.set_baseline(*spec.baseline)
        self.ledger.init = spec.init_record  # a resumed run's comes back with its ledger
        self.checkpoints = RunCheckpoints(self.run_dir / "checkpoints", dist, spec.train.keep_checkpoints)
        self.average = WeightAverage(self.run_dir / "average",
                                     averaged_epochs(spec.train.weight_average_from or
                                                     (1 if spec.train.weight_average_top else None), spec.phases),
                                     top=spec.train.weight_average_top)
        self.tracker = BadAudioTracker(spec.data.max_bad_fraction, log_path=str(self.run_dir / "bad_audio.tsv"),
                                       dist=dist)  # judged on every rank's counts together; rank 0 writes the list
        self.generator = torch.Generator().manual_seed(spec.train.seed * 1000 + dist.rank)
        self.scalars = Scalars(self.run_dir, enabled=dist.is_main)
        self._flops: dict[int, int] = {}
        self._pending = _Pending()
        self._end: PhaseEnd | None = None  # what may end the current phase (see _phase_end)
        self._memory = PeakMemory(self.device)
        self._clips = make_cache(spec.data.cache, spec.data.cache_dir)  # decoded clips, kept across phases
        self._train_cuts: dict = {}  # the training set once read into memory, kept across phases (train_loader)
        self._finite = NonFiniteWatch(dist, spec.train.nonfinite_check, self.splits[0].grad_accum)

    # ------------------------------------------------------------------------------------- the run
    def run(self, stop_after: int | None = None) -> bool:
        """Train until every phase is done (True) or ``stop_after`` optimiser steps in this call (False)."""
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic or self.spec.train.deterministic)
        try:
            return self._run(stop_after)
        finally:
            torch.use_deterministic_algorithms(deterministic)
            self.scalars.close()

    def _run(self, stop_after: int | None) -> bool:
        model, resume_tag = self._resume()
        self.tracker.recheck_listed()  # bad_audio.tsv lists what is bad now (files may have come back)
        last = len(self.spec.phases) - 1
        if self.state.phase == last and self.state.phase_done and (self.run_dir / "model.safetensors").is_file():
            log.info("run in %s is already complete: %s", self.run_dir, self.run_dir / "model.safetensors")
            return True
        resumed = model is not None or resume_tag is not None
        if resumed and self.spec.run_recipe is not None and self.spec.run_recipe.changes:
            self.ledger.add_intervention(step=self.state.total_steps, phase=self.state.phase,
                                         changes=self.spec.run_recipe.changes)
        self._check_data(resumed)
        self._check_evaluation(resumed)
        self._read_stop_target()
        if self.state.phase_done:  # resumed at the end of a phase: finish what follows its checkpoint
            self._complete_phase(model, self.state.phase, scheduler=None)
        steps_this_call = 0
        while True:
            index = self.state.phase
            if self.state.phase_done:
                if index == last:
                    break
                model = self._next_phase(model, index)
                collect()  # the previous phase's model is gone now: free its cycles (common.training.release)
                continue
            if model is None:  # the phase's model from scratch or the initial weights (a resume loads its own)
                init = self.spec.init if index == 0 and resume_tag is None else None
                model = initial_model(self.arch, self.objective, self.cfgs[index], self.spec.phases[index],
                                      self.spec.train.seed + index, init,
                                      self.spec.init_pos_embed or self.spec.transfer.pos_embed)
                if init is not None:
                    log.info("initialised the encoder from %s", self.spec.meta.get("init", "the given weights"))
                self._seed_rank(index)
            engine = self._engine(model, index, resume_tag)
            if resume_tag is not None:  # mid-phase: weights, optimiser and schedule from the checkpoint
                self.checkpoints.load_engine(engine, resume_tag)
                self._restore_rng(resume_tag)
                resume_tag = None
                if self.state.pending_eval:
                    self._validate(engine.module, index, engine.lr_scheduler)
            budget = None if stop_after is None else stop_after - steps_this_call
            finished, steps = self._train_phase(engine, index, budget)
            steps_this_call += steps
            model = release_engine(engine)  # the bare model: the engine's hooks, optimizer state, gradients released
            del engine
            if not finished:
                log.info("stopped after %d steps as asked; run the same command again to resume", steps_this_call)
                return False
        self._finish(model)
        return True

    def _train_phase(self, engine, index: int, budget: int | None) -> tuple[bool, int]:
        """Train phase ``index`` to its end (True) or until ``budget`` steps (False); returns the steps done."""
        spec, st, phase = self.spec, self.state, self.spec.phases[index]
        if self._phase_end(index).decision is not None:  # decided by the validation a resume re-ran
            self._start_phase(index)
            return self._end_phase(engine, index), 0
        pipeline = self._frontend(index, self.objective.specaug)
        epochs_left = None if phase.iteration_based else phase.max_length - st.epoch_in_phase
        loader = self._train_loader(index)
        stream = loader.batches(st.data_epoch, st.data_index, epochs_left)
        self._start_phase(index)
        batches = None if phase.iteration_based else loader.estimated_batches_per_epoch()  # epochs x steps
        total = phase.steps if phase.iteration_based else \
            None if batches is None else phase.max_length * (batches // self.splits[index].grad_accum)
        bar = progress(total, st.step, phase.label(index), self.dist.is_main)
        window: dict[str, float] = {}
        self._pending.restart_clock()
        steps_done = 0
        try:
            for group in step_groups(stream, self.splits[index].grad_accum, not phase.iteration_based,
                                     st.data_epoch):
                if group.epoch_end is not None:  # epoch-based phases: evaluate (and maybe finish) per epoch
                    self._check_finite(index)
                    st.epoch_in_phase += 1
                    st.data_epoch, st.data_index = group.position
                    self.ledger.set_epochs(index, st.epoch_in_phase)
                    if index == len(spec.phases) - 1 and self.dist.is_main:
                        self.average.keep(engine.module, st.epoch_in_phase)
                    if st.epoch_in_phase == phase.max_length:
                        return self._end_phase(engine, index), steps_done
                    self._save(engine, index, pending_eval=True)
                    self._validate(engine.module, index, engine.lr_scheduler)
                    if self._end.decision is not None:
                        return self._end_phase(engine, index), steps_done
                    continue
                for batch in group.batches:
                    logs = self._micro_step(engine, batch, pipeline, index)
                    if not len(batch):  # no usable clip: a step that contributes nothing, logged as nothing
                        continue
                    self._end.add_loss(logs["loss"])
                    for key, value in logs.items():  # summed on the device: no host sync per step
                        window[key] = window.get(key, 0.0) + value.detach().double()
                    self._pending.samples += len(batch)
                    window["_n"] = window.get("_n", 0) + 1
                st.step += 1
                st.total_steps += 1
                steps_done += 1
                self._pending.steps += 1
                st.data_epoch, st.data_index = group.position
                bar.update(1)
                if st.step % spec.train.log_every == 0:
                    self._log_window(engine, index, window, bar)
                    window = {}
                if phase.iteration_based and st.step == phase.max_length:
                    return self._end_phase(engine, index), steps_done
                eval_due = phase.iteration_based and st.step % spec.train.eval_every == 0
                out_of_budget = budget is not None and steps_done >= budget
                if (phase.iteration_based and st.step % spec.train.save_every == 0) or out_of_budget:
                    self._save(engine, index, pending_eval=eval_due)
                if eval_due:
                    self._validate(engine.module, index, engine.lr_scheduler)
                    if self._end.decision is not None:
                        return self._end_phase(engine, index), steps_done
                if out_of_budget:
                    return False, steps_done
        finally:
            bar.close()
            if hasattr(stream, "close"):
                stream.close()
        raise RuntimeError(f"{phase.label(index)}: the data stream ended early")

    def _end_phase(self, engine, index: int) -> bool:
        """The phase's last step is done: checkpoint it as done, validate (unless a criterion just decided
        on this step's validation), export."""
        self.state.phase_done = True
        self._save(engine, index, pending_eval=self._end.decision is None)
        self._complete_phase(engine.module, index, engine.lr_scheduler)
        return True

    def _complete_phase(self, model: nn.Module, index: int, scheduler) -> None:
        """The end-of-phase work that follows its checkpoint: the pending validation, the ledger's record of
        why the phase ended, and the phase's export."""
        model.to(self.device)
        if self.state.pending_eval:
            self._validate(model, index, scheduler)
        self._record_end(index)
        if self.dist.is_main:
            path = self.run_dir / "export" / f"phase{index + 1}.safetensors"
            self.objective.export(model, path, self._export_meta(index))
            record = self.ledger.phases[index]
            log.info("%s done; exported %s; %.3g %s-hours (training and validation, all ranks); peak memory "
                     "%.3g GiB (%s; estimate %.3g GiB)", self.spec.phases[index].label(index), path,
                     record.device_seconds / 3600, "GPU" if self.device.type == "cuda" else self.device.type.upper(),
                     gib(record.peak_memory_bytes or 0), record.peak_memory_source,
                     gib(record.memory_estimate_bytes or 0))

    def _next_phase(self, model: nn.Module, index: int) -> nn.Module:
        """After phase ``index``: the model of phase ``index + 1``, its weights adapted to the new grid."""
        st, spec = self.state, self.spec
        prev, nxt = spec.phases[index], spec.phases[index + 1]
        data_epoch, data_index = st.data_epoch, st.data_index
        if self._batch_size(index) != self._batch_size(index + 1) and data_index:
            data_epoch, data_index = data_epoch + 1, 0  # positions count batches: a new batch size starts an epoch
        # the best score is per phase: "best" means the best of the final phase (the paper's reports)
        self.state = TrainState(phase=index + 1, data_epoch=data_epoch, data_index=data_index,
                                total_steps=st.total_steps)
        old, new = self.cfgs[index], self.cfgs[index + 1]
        fresh = next_phase_model(self.arch, self.objective, model, old, new, prev, nxt, spec.transfer,
                                 seed=spec.train.seed + index + 1)
        log.info("phase change -> %s: grid %s -> %s, tokens %d -> %d; optimizer and LR schedule restart",
                 nxt.label(index + 1), "x".join(map(str, old.grid)), "x".join(map(str, new.grid)),
                 old.num_patches, new.num_patches)
        self.scalars.log({"phase": index + 2}, st.total_steps)
        self._seed_rank(index + 1)
        return fresh

    def _phase_end(self, index: int) -> PhaseEnd:
        """What may end phase ``index`` (built on first use in the phase, from the checkpointed state)."""
        if self._end is None or self._end.index != index:
            self._end = PhaseEnd.for_phase(self.spec.phases, index, self.ledger.stop_target, self.state.until,
                                           lambda i: self.objective.flops_per_sample(self.cfgs[i]),
                                           self.spec.optim.warmup_steps)
        return self._end

    def _judge(self, index: int, score: float | None, score_se: float | None = None) -> None:
        """A validation round of phase ``index`` ended (``score``: None without a validation set; ``score_se``:
        its standard error, if the objective reports one): may the phase end here? Collective: every rank
        takes rank 0's decision."""
        at = self.state.step if self.spec.phases[index].iteration_based else self.state.epoch_in_phase
        end = self._phase_end(index)
        decision = end.check(self.dist, at, score, self.ledger.phases[index].train_flops, score_se, self.state.step)
        if end.learned is not None and end.learned == end.checks and end.criterion is not None:
            log.info("%s has shown that it learns (two rounds beyond the noise past its first): its criterion "
                     "may end it from here", self.spec.phases[index].label(index))
        if decision is not None:
            log.info("%s ends here (%s %d): %s", self.spec.phases[index].label(index),
                     "step" if self.spec.phases[index].iteration_based else "epoch", at, decision.note)

    def _record_end(self, index: int) -> None:
        """Write why and when phase ``index`` ended into the ledger."""
        st, phase = self.state, self.spec.phases[index]
        decision = self._phase_end(index).end_reason(st.step if phase.iteration_based else st.epoch_in_phase)
        where = {} if phase.iteration_based else {"epoch": st.epoch_in_phase}
        self.ledger.end_phase(index, decision.reason, decision.note, step=st.step, total_step=st.total_steps, **where)
        log.info("%s ended (%s): %s", phase.label(index), decision.reason, decision.note)

    def _seed_rank(self, index: int) -> None:
        """After a phase's model is built (identically on every rank): a different random stream per rank
        and phase, so that stochastic depth and dropout differ between ranks."""
        torch.manual_seed((self.spec.train.seed * 1_000 + index) * 1_000 + self.dist.rank)

    def _engine(self, model: nn.Module, index: int, resume_tag: str | None = None):
        phase, optim = self.spec.phases[index], self.spec.optim
        model = maybe_compile(model, self.spec.train.compile, self.spec.train.compile_backend,
                              self.spec.train.compile_mode)
        return build_engine(model, optim, phase.lr or optim.lr, self._batch_size(index), self.zero_stage, self.device,
                            phase.steps if phase.iteration_based else None,
                            getattr(model, "head_prefixes", ()), self.autocast_dtype,
                            load_universal=resume_tag is not None and self.checkpoints.resharded(resume_tag),
                            grad_accum=self.splits[index].grad_accum,
                            zero_overlap_comm=self.spec.train.zero_overlap_comm,
                            zero_bucket_size=self.spec.train.zero_bucket_size)

    def _batch_size(self, index: int) -> int:
        """Phase ``index``'s micro-batch per rank (its global batch split over this launch, ``common.training.batch``)."""
        return self.splits[index].per_rank

    def _frontend(self, index: int, specaug: SpecAugmentConfig) -> nn.Module:
        """The phase's front end on the device (training augmentation from ``specaug``)."""
        return self.arch.frontend(self.cfgs[index], self.spec.phases[index].as_compression(), specaug).to(self.device)

    def _train_loader(self, index: int):
        return train_loader(self.spec.data, self.objective.classes, self.arch.clip_samples, self.arch.sample_rate,
                            self._batch_size(index), self.spec.train.seed, self.dist.rank, self.dist.world_size,
                            self.tracker, pin_memory=self.device.type == "cuda", cache=self._clips,
                            memo=self._train_cuts)

    def _eval_loader(self, index: int):
        spec = self.spec
        return eval_loader(spec.data.valid, self.objective.classes, self.arch.clip_samples, self.arch.sample_rate,
                           spec.data.eval_batch_size or self._batch_size(index), spec.data.num_workers,
                           spec.data.eval_crop, self.dist.rank, self.dist.world_size,
                           tracker=self.tracker.for_split("valid", spec.data.valid, dist=self.dist),
                           pin_memory=self.device.type == "cuda", pad=spec.data.pad, cache=self._clips)

    def _start_phase(self, index: int) -> None:
        """Open (or, resumed, find) the phase's ledger record and say what the phase costs."""
        phase, cfg = self.spec.phases[index], self.cfgs[index]
        if index not in self._flops:
            self._flops[index] = self.objective.flops_per_sample(cfg)
        record = self.ledger.start_phase(
            index, name=phase.label(index), compression=phase.compression, factor=phase.factor,
            flops_per_sample=self._flops[index], tokens_per_sample=cfg.num_tokens,
            patch_transfer=phase.patch_transfer if phase.compression == "patch" else None)
        estimate = self.objective.memory_estimate(cfg, self._batch_size(index), **training_setting(
            self.spec.train.precision, self.zero_stage, self.dist.world_size, self.device))
        record.memory_estimate_bytes = estimate.total
        record.set_batch(self.splits[index])  # this launch's split (a resume on other ranks records its own)
        record.device = record.device or (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                                          else self.device.type)
        self._memory.reset()
        self._finite.restart(self.state.step, self.splits[index].grad_accum)
        log.info("%s: %s, %s tokens per clip (grid %dx%d), %.3g GFLOPs per training sample, batch %s; memory "
                 "estimate %s", phase.label(index),
                 f"{phase.steps} steps" if phase.iteration_based else f"{phase.epochs} epochs",
                 cfg.num_patches, *cfg.grid, record.flops_per_sample / 1e9, self.splits[index].describe(),
                 estimate.describe())

    def _micro_step(self, engine, batch: Batch, pipeline: nn.Module, index: int) -> dict[str, torch.Tensor]:
        """Forward, backward and (at the end of an accumulation group) the optimiser step of one micro-batch.

        A micro-batch without a usable clip (all bad audio, left out and listed) still takes its micro-step
        with a zero gradient, so that every rank takes the same steps and its gradients reach the step's
        all-reduce: a stand-in clip (:meth:`_stand_in`) goes through the same objective, model and backward
        with its loss multiplied by 0 (the same graph, because ZeRO-2 reduces the gradients in the order the
        backward makes them); BatchNorm layers see it in eval mode, so their statistics learn nothing from
        it; it counts as no sample and no logged loss. The step averages over the ``n`` micro-batches of all
        ranks, so with ``e`` empty its gradient is the others' times ``(n - e) / n``. That is not rescaled:
        rescaling needs ``e`` before the backward (a collective per micro-batch), a partly bad micro-batch
        already weighs as much as a full one, and the event is rare (the run stops past
        ``data.max_bad_fraction``). One rank alone does the same, so that the steps of a phase follow the data
        positions on any number of ranks (a step whose micro-batches are all empty has a zero gradient, and
        Adam still moves the weights by its momentum).
        """
        empty = not len(batch)
        if empty:
            log.warning("batch %d of epoch %d (rank %d) has no usable clip: it takes its step with a zero gradient",
                        batch.index, batch.epoch, self.dist.rank)
            batch = self._stand_in(batch)
        batch.waveforms = batch.waveforms.to(self.device, non_blocking=True)
        batch.lengths = batch.lengths.to(self.device, non_blocking=True)
        if batch.targets is not None:
            batch.targets = batch.targets.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None), _norms_frozen(engine.module, empty):
            loss, logs = self.objective.train_step(engine, batch, pipeline, self.generator)
        if empty:
            loss = loss * 0.0
        if self._finite.observe(loss):  # train.nonfinite_check: step
            raise self._nonfinite(index, self.state.step + 1, f"({loss.item()}) ", "stopped before the update")
        engine.backward(loss)
        engine.step()
        return {"loss": loss.detach(), **logs}

    def _stand_in(self, batch: Batch) -> Batch:
        """One clip of silence (and all-zero targets) in place of ``batch``, which has no usable clip; only its
        graph matters (its loss is multiplied by 0)."""
        samples = self.arch.clip_samples
        classes = self.objective.classes
        return Batch(torch.zeros(1, samples), torch.tensor([samples]),
                     None if classes is None else torch.zeros(1, len(classes)), ["(stand-in)"],
                     epoch=batch.epoch, index=batch.index)

    def _nonfinite(self, index: int, step: int, value: str, what: str) -> NonFiniteLoss:
        tag = self.checkpoints.latest_tag()
        return NonFiniteLoss(
            f"non-finite loss {value}in {self.spec.phases[index].label(index)} at step {step}; {what}. The last "
            f"good checkpoint is {self.checkpoints.ckdir / tag if tag else 'none (no checkpoint yet)'}; check the data, or "
            f"lower the learning rate (e.g. --set optim.lr=...: a resumed run accepts learning-rate and schedule "
            f"changes and records them in ledger.json), then run the command again to resume from it")

    def _check_finite(self, index: int) -> None:
        """Raise :class:`NonFiniteLoss` if a loss since the last check was not finite (collective)."""
        first = self._finite.check(self.state.step)
        if first is not None:
            raise self._nonfinite(index, first, "", f"stopped at step {self.state.step}, before saving anything "
                                                    f"after it")

    # --------------------------------------------------------------------------- accounting, logging
    def _account(self, index: int) -> Window:
        """Move the steps / clips / seconds trained since the last call into the ledger (collective)."""
        now = time.perf_counter()
        samples = int(self.dist.all_reduce_sum(torch.tensor([self._pending.samples], device=self.device)).item())
        window = self.ledger.add_training(index, self._pending.steps, samples, now - self._pending.clock,
                                          self.dist.world_size)
        self.ledger.set_peak_memory(index, self._memory.peak(), self._memory.source)
        self._pending.steps, self._pending.samples, self._pending.clock = 0, 0, now
        return window

    def _count_upsampled(self) -> None:
        """Add the clips every rank resampled up since the last call to the ledger (collective: before each
        ledger write)."""
        self.ledger.add_upsampled(self.tracker.take_upsampled(self.dist))

    def _log_window(self, engine, index: int, window: dict, bar) -> None:
        self._check_finite(index)
        self.tracker.check(whole=False)  # every rank's bad clips so far, judged together (collective)
        trained = self._account(index)
        n = window.pop("_n", 1)
        sums = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in window.values()]).tolist() \
            if window else []  # one host read for the window
        values = {f"train/{k}": v / n for k, v in zip(window, sums)}
        values.update({
            "train/lr": engine.lr_scheduler.get_last_lr()[0],
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

    # ----------------------------------------------------------------------------------- validation
    def _evaluate(self, model: nn.Module, index: int) -> dict[str, float]:
        """The objective's validation metrics of ``model`` (on the device) at phase ``index``'s resolution."""
        spec = self.spec
        pipeline = self._frontend(index, SpecAugmentConfig())
        batches = self._eval_loader(index).batches(epochs=1)
        if spec.train.eval_batches is not None:
            batches = (b for _, b in zip(range(spec.train.eval_batches), batches))
        model.eval()
        generator = torch.Generator().manual_seed(spec.train.seed + 7919)  # the same masks every time
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                                 enabled=self.autocast_dtype is not None):
                metrics = self.objective.evaluate(model, batches, pipeline, self.dist, generator)
        finally:
            model.train()
        # a whole pass was judged at its end (the loader); a partial one (train.eval_batches) here (collective)
        self.tracker.for_split("valid").check(whole=False)
        return metrics

    def _validate(self, model: nn.Module, index: int, scheduler) -> None:
        """Validate, record, let the LR schedule react (plateau / multistep), export the phase's best."""
        self._account(index)
        self.state.pending_eval = False
        if not self.spec.data.valid:
            self._judge(index, None)
            return
        epoch = None if self.spec.phases[index].iteration_based else self.state.epoch_in_phase
        start = time.perf_counter()
        metrics = self._evaluate(model, index)
        score = metrics[self.objective.score_name]
        if scheduler is not None and scheduler.report(score):
            log.info("learning rate now %.3g (%s schedule)", scheduler.get_last_lr()[0], self.spec.optim.schedule)
        self.ledger.add_eval_time(index, time.perf_counter() - start, self.dist.world_size)
        where = {"epoch": epoch} if epoch is not None else {}
        record = self.ledger.add_eval(index, metrics, total_step=self.state.total_steps,
                                      phase_step=self.state.step, **where)
        self.scalars.log({f"eval/{k}": v for k, v in metrics.items()}, self.state.total_steps)
        self.scalars.flush()
        self._count_upsampled()
        log.info("validation (%s, %s): %s", self.spec.phases[index].label(index),
                 f"epoch {epoch}" if epoch is not None else f"step {self.state.step}",
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self.dist.is_main:
            if self.state.best_score is None or score > self.state.best_score:
                self.state.best_score = score
                self.objective.export(model, self.run_dir / "export" / "best.safetensors",
                                      self._export_meta(index, eval=record))
            self.ledger.write(self.run_dir / "ledger.json")
        self._judge(index, score, metrics.get(f"{self.objective.score_name}_se"))
        self._pending.restart_clock()

    def _export_meta(self, index: int, **extra) -> dict:
        phase = self.spec.phases[index]
        return {**self.spec.meta, **self.arch.export_meta(self.cfgs[index]),
                "phase": {"index": index + 1, "of": len(self.spec.phases), "compression": phase.compression,
                          "factor": phase.factor, "patch_transfer": phase.patch_transfer}, **extra}

    # ---------------------------------------------------------------------------------- checkpoints
    def _save(self, engine, index: int, pending_eval: bool = False) -> None:
        self._check_finite(index)  # nothing after a non-finite loss is ever saved
        self._account(index)
        self.tracker.check(whole=False)  # every rank's bad clips counted into the checkpoint, judged (collective)
        st = self.state
        st.pending_eval = pending_eval
        st.until = self._phase_end(index).state_dict()
        tag = make_tag(index, st.step if self.spec.phases[index].iteration_based else st.epoch_in_phase)
        self._count_upsampled()
        trainer_state = {"state": asdict(st), "ledger": self.ledger.to_dict(), "tracker": self.tracker.state_dict(),
                         "world_size": self.dist.world_size, "batch_per_rank": self._batch_size(index),
                         "zero_stage": self.zero_stage}
        if self.dist.is_main and self.spec.run_recipe is not None:
            self.spec.run_recipe.write_pending()  # the run's recipe.yaml appears with its first checkpoint
        self.checkpoints.save(engine, tag, trainer_state, capture_rng(self.generator, self.device))
        if self.dist.is_main:
            self.ledger.write(self.run_dir / "ledger.json")
        self._pending.restart_clock()

    def _restore_rng(self, tag: str) -> None:
        rng = self.checkpoints.rng_state(tag)
        if rng is not None:
            restore_rng(rng, self.generator, self.device)

    def _check_data(self, resumed: bool) -> None:
        """Record the manifests' fingerprints; a resumed run's must be those it trained on
        (``common.data.fingerprint``), unless ``--accept-changed-data`` (then recorded as an intervention)."""
        current = run_fingerprints([m.path for m in self.spec.data.train], self.spec.data.valid)
        changed = changes(self.ledger.data, current) if resumed else {}
        if changed:
            listed = "; ".join(f"{k} (sha256 {(v['from'] or 'none')[:12]} -> {(v['to'] or 'none')[:12]})"
                               for k, v in changed.items())
            if not (self.spec.run_recipe is not None and self.spec.run_recipe.accept_changed_data):
                raise DataChanged(
                    f"{self.run_dir}: manifests changed since the run started: {listed}. The saved data position "
                    f"(epoch {self.state.data_epoch}, batch {self.state.data_index}) would now point at other clips, "
                    f"so the resumed run would not continue the one it resumes. Restore the manifests, start a new "
                    f"run (--run-dir), or resume anyway with --accept-changed-data (recorded in ledger.json)")
            log.warning("resuming with changed manifests (--accept-changed-data): %s; recorded in ledger.json as an "
                        "intervention", listed)
            self.ledger.add_intervention(step=self.state.total_steps, phase=self.state.phase,
                                         changes={f"manifest {k}": v for k, v in changed.items()})
        self.ledger.data = current

    def _check_evaluation(self, resumed: bool) -> None:
        """Record the validation settings (``common.phases.baseline.evaluation_settings``); a resumed run whose
        ``train.eval_batches`` or ``data.eval_batch_size`` change which clips are scored records the change as
        an intervention (a change of ranks has its own, ``_reshard_position``; the default validation batch, the
        per-rank training batch, follows the ranks and keeps the clips a round scores: no change then)."""
        spec, last = self.spec, len(self.spec.phases) - 1
        current = evaluation_settings(spec.train, spec.data, self._batch_size(last), self.dist.world_size)
        old = self.ledger.evaluation
        compared = current if spec.data.eval_batch_size is None else {**current, "ranks": old and old.get("ranks")}
        if resumed and old and setting_differences(old, compared):
            keys = {"eval_batches": "train.eval_batches"}
            self.ledger.add_intervention(step=self.state.total_steps, phase=self.state.phase, changes={
                keys.get(k, f"data.{k}"): {"from": old.get(k), "to": v} for k, v in current.items()
                if k != "ranks" and old.get(k) != v})
        self.ledger.evaluation = current

    def _read_stop_target(self) -> None:
        """``train.stop_when_surpassing``: the baseline's best per-epoch score, read once when the run starts
        (``common.phases.baseline``: a baseline that is not comparable is refused, or accepted and recorded); a
        resumed run keeps the target of its checkpoint and needs no baseline directory."""
        path = self.spec.train.stop_when_surpassing
        if not path or self.ledger.stop_target is not None:
            return
        target = stop_target(path, self.objective.score_name, self.ledger.data, self.ledger.evaluation,
                             self.spec.train.accept_baseline_differences)
        for difference in target.get("accepted_differences", []):
            log.warning("train.stop_when_surpassing: comparing with %s although it differs (accepted by "
                        "train.accept_baseline_differences, recorded in ledger.json): %s", path, difference)
        self.ledger.set_stop_target(target)

    def _reshard_position(self, saved_ranks: int, saved_batch: int) -> None:
        """Resuming on another number of ranks (or per-rank batch): each rank's shard of an epoch changes, so the
        data position keeps the clips of the epoch already seen (batches consumed x per-rank batch x ranks, in
        the new global batches), and the run continues close to, not exactly as, an uninterrupted one; the
        ledger records it (the per-rank batch only where it changed otherwise than the global batch's split over
        the new ranks, ``common.training.batch``)."""
        st, ranks, batch = self.state, self.dist.world_size, self._batch_size(self.state.phase)
        index = reshard_index(st.data_index, saved_batch, saved_ranks, batch, ranks)
        log.warning("resuming on %d rank(s) x %d clips a run checkpointed on %d x %d: each rank's share of the data "
                    "changes, so the resumed run continues from the same share of epoch %d (batch %d instead of %d) "
                    "and is close to, not bitwise equal to, an uninterrupted run; recorded in ledger.json", ranks,
                    batch, saved_ranks, saved_batch, st.data_epoch, index, st.data_index)
        st.data_index = index
        changes = {"world_size": {"from": saved_ranks, "to": ranks}} if saved_ranks != ranks else {}
        if saved_batch != batch and saved_batch * saved_ranks != batch * ranks:
            changes["batch_per_rank"] = {"from": saved_batch, "to": batch}
        self.ledger.add_intervention(step=st.total_steps, phase=st.phase, changes=changes)

    def _resume(self) -> tuple[nn.Module | None, str | None]:
        """Restore the newest intact checkpoint if there is one.

        Returns ``(model, None)`` for a checkpoint taken at the end of a phase, ``(None, tag)`` for one
        taken within a phase (the engine loads it), ``(None, None)`` without a checkpoint.
        """
        tag = self.checkpoints.find_resume()
        if tag is None:
            return None, None
        saved = self.checkpoints.trainer_state(tag)
        self.state = TrainState(**saved["state"])
        baseline = self.ledger.baseline
        self.ledger = Ledger.from_dict(saved["ledger"])  # with the stop target the run started with
        self.ledger.baseline = baseline or self.ledger.baseline
        self.tracker.load_state_dict(saved["tracker"])
        saved_ranks = self.checkpoints.saved_world_size(tag)
        stage = saved.get("zero_stage")  # absent before it was recorded: ZeRO if the optimizer state is partitioned
        stage = stage if stage is not None else int(any(self.checkpoints.ckdir.joinpath(tag).glob("zero_pp_rank_*")))
        self.zero_stage = resolve_zero_stage(self.spec.train.zero_stage, self.dist.world_size, stage)
        saved_batch = saved.get("batch_per_rank", self._batch_size(self.state.phase))  # absent before it was recorded
        if (saved_ranks, saved_batch) != (self.dist.world_size, self._batch_size(self.state.phase)):
            self._reshard_position(saved_ranks, saved_batch)
        if self.state.phase_done:
            model = self.objective.build_model(self.cfgs[self.state.phase])
            model.load_state_dict(self.checkpoints.module_state(tag))
            self._restore_rng(tag)
            log.info("resuming after the end of phase %d (checkpoint %s)", self.state.phase + 1, tag)
            return model, None
        log.info("resuming %s at step %d (checkpoint %s)", self.spec.phases[self.state.phase].label(self.state.phase),
                 self.state.step, tag)
        return None, tag

    # ------------------------------------------------------------------------------------- the end
    def _finish(self, model: nn.Module) -> None:
        """Weight-average if asked, and make the final phase's model (or the average) the run's model."""
        last = len(self.spec.phases) - 1
        final = self.run_dir / "export" / f"phase{last + 1}.safetensors"
        if self.average.epochs:
            final = self._weight_average(model, last)
        self._count_upsampled()
        if self.dist.is_main:
            atomic_copy(final, self.run_dir / "model.safetensors")
            self.ledger.write(self.run_dir / "ledger.json")
            totals, saving = self.ledger.totals(), self.ledger.flops_saving()
            log.info("run complete: %d steps, %.3g training FLOPs, %.0f s training%s; model: %s",
                     totals["steps"], totals["train_flops"], totals["wall_seconds"],
                     f", {saving:.1%} fewer FLOPs than {self.ledger.baseline['recipe']}" if saving is not None
                     else "", self.run_dir / "model.safetensors")
        self.state.phase = len(self.spec.phases)

    def _weight_average(self, model: nn.Module, index: int) -> Path:
        """Average the kept epochs' weights into ``model``, evaluate and export the average (AST's WA)."""
        scores = {e["epoch"]: e["metrics"][self.objective.score_name] for e in self.ledger.evals
                  if e["phase"] == index and "epoch" in e and self.objective.score_name in e.get("metrics", {})}
        epochs = self.average.chosen(scores, ran=self.state.epoch_in_phase)
        top = self.average.top
        if top is not None and len(epochs) < top:
            log.warning("train.weight_average_top: the final phase ended after %d epochs, fewer than the %d to "
                        "average; averaging all %d", self.state.epoch_in_phase, top, len(epochs))
        model.load_state_dict(self.average.average(epochs))
        model.to(self.device)
        metrics = self._evaluate(model, index) if self.spec.data.valid else {}
        self.ledger.add_eval(index, metrics, total_step=self.state.total_steps, phase_step=self.state.step,
                             weight_averaged=epochs)
        target = self.ledger.stop_target or {}
        versus = "" if target.get("averaged") is None else \
            f" (the baseline's weight average: {target['score']}={target['averaged']:.4f})"  # like with like
        log.info("weight average of epochs %s: %s%s", ", ".join(map(str, epochs)),
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), versus)
        path = self.run_dir / "export" / "weight_averaged.safetensors"
        if self.dist.is_main:
            self.objective.export(model, path, self._export_meta(index, weight_averaged=epochs, eval=metrics))
        return path
