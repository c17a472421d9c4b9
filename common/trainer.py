"""The one training loop, shared by SSAST pretraining and supervised fine-tuning.

What differs between the two (model heads, loss, evaluation, export) is an :class:`Objective`; the
trainer owns everything else:

- phases: per phase, the encoder geometry of its compression; at a change the previous model's weights
  are adapted (positional embedding, patch kernel, heads) and a fresh DeepSpeed engine is made, so the
  optimiser and the learning-rate schedule restart from their initial settings (paper section 2.2);
- data: one resumable stream of waveform batches; features are made on the device per phase;
- DeepSpeed engines (ZeRO stage, gradient accumulation and clipping from the recipe), bf16 autocast on
  GPU, fp32 on CPU;
- validation every ``eval_every`` steps (iteration-based phases) or every epoch (epoch-based);
- checkpoints every ``save_every`` steps / every epoch and at each phase end, atomic, with the data
  position, RNG states and ledger, so that re-running the same command resumes exactly;
- a non-finite loss stops the run before the optimiser step, leaving the last checkpoint intact;
- TensorBoard scalars, a progress bar on rank 0, ``ledger.json`` and an export at every phase end.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Protocol, Sequence

import torch
from torch import nn

from common.augment import SpecAugmentConfig
from common.cli import recipe_checkpointed, record_interventions
from common.data import BadAudioTracker, Batch, ClipDataset, ClipLoader, DataConfig, open_cuts
from common.distributed import Dist
from common.features import AudioConfig, FeaturePipeline
from common.ledger import Ledger
from common.logger import Scalars, progress
from common.model import ASTEncoder, EncoderConfig
from common.optim import LRSchedule, OptimConfig, build_optimizer, param_groups
from common.phases import PhaseConfig, TransferConfig, patch_mode_between, phase_encoder_configs
from common.resize import adapt_state_dict
from common.run_checkpoint import (
    latest_tag,
    make_tag,
    read_module_state,
    read_rng_state,
    read_trainer_state,
    remove_partial,
    save_checkpoint,
)

__all__ = ["TrainConfig", "Objective", "RunSpec", "Trainer", "NonFiniteLoss"]

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped before applying the update."""


@dataclass(frozen=True)
class TrainConfig:
    """How the loop runs.

    Args:
        seed: seeds model init, data order, crops, masks and augmentation.
        precision: ``auto`` (bf16 autocast on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
        zero_stage: DeepSpeed ZeRO stage (0, 1 or 2).
        log_every: optimiser steps between log lines / TensorBoard points.
        eval_every: optimiser steps between validations in iteration-based phases (epoch-based phases
            validate after every epoch).
        save_every: optimiser steps between checkpoints in iteration-based phases.
        keep_checkpoints: how many of the newest checkpoints to keep.
        eval_batches: validate on at most this many batches per rank (None: the whole set).
        deterministic: ``torch.use_deterministic_algorithms`` (for exact-resume tests; slower).
        weight_average_from: average the weights of the final phase's epochs from this one (1-based) on
            and make the average the run's model (AST's weight averaging; epoch-based runs only).
    """

    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    zero_stage: int = 0
    log_every: int = 50
    eval_every: int = 4000
    save_every: int = 4000
    keep_checkpoints: int = 2
    eval_batches: int | None = None
    deterministic: bool = False
    weight_average_from: int | None = None

    def __post_init__(self) -> None:
        if self.weight_average_from is not None and self.weight_average_from < 1:
            raise ValueError(f"weight_average_from must be >= 1, got {self.weight_average_from}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        for name in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1 (or null: the whole set), got {self.eval_batches}")


class Objective(Protocol):
    """What pretraining and fine-tuning plug into the trainer."""

    specaug: SpecAugmentConfig  # SpecAugment of training features
    score_name: str  # the validation metric that drives plateau schedules and "best" (higher is better)
    head_prefixes: tuple[str, ...]  # parameter-name prefixes that get OptimConfig.head_lr_scale
    classes: Sequence[str] | None  # target classes (None: unlabeled data)

    def build_model(self, encoder: ASTEncoder) -> nn.Module:
        """The full model around ``encoder`` (stored as ``model.encoder``), heads freshly initialised."""

    def adapt_state(self, state: dict, old: EncoderConfig, new: EncoderConfig) -> dict:
        """Adapt the non-encoder weights of a state dict at a phase change (the encoder is done)."""

    def train_step(self, model: nn.Module, batch: Batch, pipeline: FeaturePipeline,
                   generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch on the device, and detached values to log."""

    def evaluate(self, model: nn.Module, batches: Iterator[Batch], pipeline: FeaturePipeline, dist: Dist,
                 generator: torch.Generator) -> dict[str, float]:
        """Validation metrics, identical on every rank."""

    def flops_per_sample(self, cfg: EncoderConfig) -> int:
        """Training FLOPs (forward + backward) per sample for the encoder geometry ``cfg``."""

    def export(self, model: nn.Module, path: Path, meta: dict) -> None:
        """Write the deliverable of a phase (rank 0 only)."""


@dataclass
class RunSpec:
    """Everything the trainer needs besides the objective (built by the entry points from a recipe).

    Args:
        init: ``(config, encoder state dict)`` the first phase starts from (None: from scratch).
        init_pos_embed: how the initial positional embedding is fitted to the first phase (default: the
            transfer setting; ImageNet weights use ``cut``, AST's rule).
        baseline: ``(name, planned training FLOPs)`` of the baseline recipe, for the ledger.
        meta: extra metadata stored in exports (e.g. the front end, the task).
    """

    run_dir: Path
    base: EncoderConfig
    audio: AudioConfig
    phases: list[PhaseConfig]
    transfer: TransferConfig
    optim: OptimConfig
    train: TrainConfig
    data: DataConfig
    init: tuple[EncoderConfig, dict] | None = None
    init_pos_embed: str | None = None
    baseline: tuple[str, float] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class _State:
    phase: int = 0
    step: int = 0  # optimiser steps done in this phase
    epoch_in_phase: int = 0
    phase_done: bool = False
    data_epoch: int = 0
    data_index: int = 0
    total_steps: int = 0
    best_score: float | None = None


class Trainer:
    """Runs (or resumes) the phases of ``spec`` with ``objective``."""

    def __init__(self, spec: RunSpec, objective: Objective, dist: Dist) -> None:
        self.spec = spec
        self.objective = objective
        self.dist = dist
        self.run_dir = Path(spec.run_dir)
        self.ckdir = self.run_dir / "checkpoints"
        self.cfgs = phase_encoder_configs(spec.base, spec.phases)
        self.device = dist.device
        bf16 = spec.train.precision == "bf16" or (spec.train.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.state = _State()
        self.ledger = Ledger(objective.score_name)
        self.tracker = BadAudioTracker(spec.data.max_bad_fraction, log_path=str(self.run_dir / "bad_audio.tsv")
                                       if dist.is_main else None)
        self.generator = torch.Generator().manual_seed(spec.train.seed * 1000 + dist.rank)
        self.scalars = Scalars(self.run_dir, enabled=dist.is_main)
        self._flops: dict[int, int] = {}
        self._pending = {"steps": 0, "samples": 0, "clock": time.perf_counter()}
        if spec.baseline is not None:
            self.ledger.set_baseline(*spec.baseline)

    # ----------------------------------------------------------------------------------------- running
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
        model = self._resume()
        last = len(self.spec.phases) - 1
        if self.state.phase == last and self.state.phase_done and (self.run_dir / "model.safetensors").is_file():
            log.info("run in %s is already complete: %s", self.run_dir, self.run_dir / "model.safetensors")
            return True
        record_interventions(self.run_dir, self.ledger, self.state.phase, self.state.total_steps)
        steps_this_call = 0
        while self.state.phase < len(self.spec.phases):
            index = self.state.phase
            if self.state.phase_done:  # phase finished (now or in a resumed run): move to the next one
                model = self._transition(model, index)
                continue
            if model is None:
                model = self._fresh_model(index)
            engine = self._engine(model, index)
            if self._resume_tag is not None:  # mid-phase: weights, optimiser and schedule from the checkpoint
                engine.load_checkpoint(str(self.ckdir), tag=self._resume_tag)
                self._restore_rng(self._resume_tag)
                self._resume_tag = None
            finished, steps = self._train_phase(engine, index, None if stop_after is None
                                                else stop_after - steps_this_call)
            steps_this_call += steps
            model = engine.module
            del engine
            gc.collect()
            if not finished:
                return False
        self._finish(model)
        return True

    def _transition(self, model: nn.Module, index: int) -> nn.Module | None:
        """After phase ``index`` is done: the model for phase ``index + 1`` (or None after the last)."""
        self.state = _State(phase=index + 1, data_epoch=self.state.data_epoch, data_index=self.state.data_index,
                            total_steps=self.state.total_steps, best_score=self.state.best_score)
        if index + 1 >= len(self.spec.phases):
            self.state.phase_done = False
            return model
        old, new = self.cfgs[index], self.cfgs[index + 1]
        prev = self.spec.phases[index]
        nxt = self.spec.phases[index + 1]
        if (prev.batch_size or self.spec.data.batch_size) != (nxt.batch_size or self.spec.data.batch_size) \
                and self.state.data_index:
            self.state.data_epoch, self.state.data_index = self.state.data_epoch + 1, 0  # new batch size
        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        state = adapt_state_dict(state, old, new, self.spec.transfer.pos_embed, patch_mode_between(prev, nxt),
                                 prefix="encoder.")
        state = self.objective.adapt_state(state, old, new)
        torch.manual_seed(self.spec.train.seed + index + 1)
        fresh = self.objective.build_model(ASTEncoder(new))
        fresh.load_state_dict(state)
        log.info("phase change -> %s: grid %s -> %s, tokens %d -> %d; optimizer and LR schedule restart",
                 nxt.label(index + 1), "x".join(map(str, old.grid)), "x".join(map(str, new.grid)),
                 old.num_patches, new.num_patches)
        self.scalars.log({"phase": index + 2}, self.state.total_steps)
        return fresh

    def _fresh_model(self, index: int) -> nn.Module:
        cfg = self.cfgs[index]
        torch.manual_seed(self.spec.train.seed + index)
        encoder = ASTEncoder(cfg)
        if self.spec.init is not None and index == 0 and self._resume_tag is None:
            init_cfg, init_state = self.spec.init
            phase = self.spec.phases[0]
            pos_mode = self.spec.init_pos_embed or self.spec.transfer.pos_embed
            state = adapt_state_dict(init_state, init_cfg, cfg, pos_mode,
                                     phase.patch_transfer if phase.compression == "patch" else "pi")
            encoder.load_state_dict({k: v.float() for k, v in state.items()})
            log.info("initialised the encoder from %s", self.spec.meta.get("init", "the given weights"))
        return self.objective.build_model(encoder)

    def _engine(self, model: nn.Module, index: int):
        import deepspeed

        phase, optim = self.spec.phases[index], self.spec.optim
        lr = phase.lr or optim.lr
        groups = param_groups(model, self.objective.head_prefixes, optim.head_lr_scale)
        optimizer = build_optimizer(groups, optim, lr, self.device)
        total = phase.steps if phase.iteration_based else None
        config = {
            "train_micro_batch_size_per_gpu": self._batch_size(index),
            "gradient_accumulation_steps": optim.grad_accum,
            "gradient_clipping": optim.grad_clip,
            "zero_optimization": {"stage": self.spec.train.zero_stage},
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False,
                                          lr_scheduler=lambda opt: LRSchedule(opt, optim, lr, total))
        return engine

    def _batch_size(self, index: int) -> int:
        return self.spec.phases[index].batch_size or self.spec.data.batch_size

    def _loader(self, index: int, train: bool) -> ClipLoader:
        data = self.spec.data
        if train:
            cuts = open_cuts(data.train, seed=self.spec.train.seed)
            weights = None
            if data.balanced:
                from common.data import balanced_weights

                cuts = cuts.to_eager()
                weights = balanced_weights(cuts, self.objective.classes or [])
        else:
            cuts, weights = open_cuts(data.valid), None
        dataset = ClipDataset(self.spec.audio.clip_samples, self.spec.audio.sample_rate, self.objective.classes,
                              crop="random" if train else data.eval_crop, seed=self.spec.train.seed)
        batch = self._batch_size(index) if train else (data.eval_batch_size or self._batch_size(index))
        return ClipLoader(cuts, dataset, batch, shuffle=train, drop_last=train, seed=self.spec.train.seed,
                          rank=self.dist.rank, world_size=self.dist.world_size, num_workers=data.num_workers,
                          weights=weights, pin_memory=self.device.type == "cuda",
                          tracker=self.tracker if train else self.tracker.for_split("valid", data.valid))

    def _flops_per_sample(self, index: int) -> int:
        if index not in self._flops:
            self._flops[index] = self.objective.flops_per_sample(self.cfgs[index])
        return self._flops[index]

    # ------------------------------------------------------------------------------------ one phase
    def _groups(self, stream: Iterator[Batch], accum: int, epoch_based: bool):
        """Micro-batch groups of one optimiser step each; ``("epoch_end", epoch)`` events in epoch phases.

        Batches whose clips were all unusable are skipped; a partial group at an epoch end is dropped.
        """
        group: list[Batch] = []
        current = None
        for batch in stream:
            if epoch_based and current is not None and batch.epoch != current:
                group = []
                yield "epoch_end", current
            current = batch.epoch
            self._position = (batch.epoch, batch.index + 1)
            if not len(batch):
                continue
            group.append(batch)
            if len(group) == accum:
                yield "step", group
                group = []
        if epoch_based and current is not None:
            yield "epoch_end", current

    def _train_phase(self, engine, index: int, budget: int | None) -> tuple[bool, int]:
        spec, st, phase, cfg = self.spec, self.state, self.spec.phases[index], self.cfgs[index]
        extra = {"patch_transfer": phase.patch_transfer} if phase.compression == "patch" else {}
        record = self.ledger.phase(index, name=phase.label(index), compression=phase.compression,
                                   factor=phase.factor, flops_per_sample=self._flops_per_sample(index),
                                   tokens_per_sample=cfg.num_patches + cfg.num_prefix_tokens, **extra)
        pipeline = FeaturePipeline(spec.audio, phase.spec, self.objective.specaug).to(self.device)
        loader = self._loader(index, train=True)
        epochs = None if phase.iteration_based else phase.epochs - st.epoch_in_phase
        stream = loader.batches(st.data_epoch, st.data_index, epochs)
        self._position = (st.data_epoch, st.data_index)
        log.info("%s: %s, %s tokens per clip (grid %dx%d), %.3g GFLOPs per training sample, batch %d x %d "
                 "rank(s) x %d accumulation", phase.label(index),
                 f"{phase.steps} steps" if phase.iteration_based else f"{phase.epochs} epochs",
                 cfg.num_patches, *cfg.grid, record["flops_per_sample"] / 1e9, self._batch_size(index),
                 self.dist.world_size, spec.optim.grad_accum)
        bar = progress(phase.steps if phase.iteration_based else None, st.step, phase.label(index),
                       self.dist.is_main)
        window: dict[str, float] = {}
        self._pending["clock"] = time.perf_counter()
        steps_done, finished = 0, False
        try:
            for kind, item in self._groups(stream, spec.optim.grad_accum, not phase.iteration_based):
                if kind == "epoch_end":
                    st.epoch_in_phase += 1
                    st.data_epoch, st.data_index = item + 1, 0
                    record["epochs"] = st.epoch_in_phase
                    self._validate(engine, index, epoch=st.epoch_in_phase)
                    self._keep_for_average(engine.module, index)
                    if st.epoch_in_phase == phase.epochs:
                        finished = True
                        break
                    self._save(engine, index)
                    continue
                for batch in item:
                    logs = self._micro_step(engine, batch, pipeline, index)
                    for key, value in logs.items():
                        window[key] = window.get(key, 0.0) + float(value)
                    self._pending["samples"] += len(batch)
                window["_n"] = window.get("_n", 0) + len(item)
                st.step += 1
                st.total_steps += 1
                steps_done += 1
                self._pending["steps"] += 1
                st.data_epoch, st.data_index = self._position
                bar.update(1)
                if st.step % spec.train.log_every == 0:
                    self._log_window(engine, index, window, bar)
                    window = {}
                if phase.iteration_based:
                    if st.step == phase.steps:
                        self._validate(engine, index)
                        finished = True
                        break
                    if st.step % spec.train.eval_every == 0:
                        self._validate(engine, index)
                    if st.step % spec.train.save_every == 0:
                        self._save(engine, index)
                if budget is not None and steps_done >= budget:
                    self._save(engine, index)
                    log.info("stopped after %d steps as asked; run the same command again to resume", steps_done)
                    return False, steps_done
        finally:
            bar.close()
            if hasattr(stream, "close"):
                stream.close()
        if not finished:
            raise RuntimeError(f"{phase.label(index)}: the data stream ended early")
        st.phase_done = True
        self._save(engine, index)
        if self.dist.is_main:
            path = self.run_dir / "export" / f"phase{index + 1}.safetensors"
            self.objective.export(engine.module, path, self._export_meta(index))
            log.info("%s done; exported %s", phase.label(index), path)
        return True, steps_done

    def _micro_step(self, engine, batch: Batch, pipeline: FeaturePipeline, index: int) -> dict[str, torch.Tensor]:
        batch.waveforms = batch.waveforms.to(self.device, non_blocking=True)
        batch.lengths = batch.lengths.to(self.device, non_blocking=True)
        if batch.targets is not None:
            batch.targets = batch.targets.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss, logs = self.objective.train_step(engine, batch, pipeline, self.generator)
        bad = not bool(torch.isfinite(loss.detach()).item())
        if self.dist.any(bad):
            tag = latest_tag(self.ckdir) if self.ckdir.exists() else None
            raise NonFiniteLoss(
                f"non-finite loss ({loss.item()}) in {self.spec.phases[index].label(index)} at step "
                f"{self.state.step + 1}; stopped before the update. The last good checkpoint is "
                f"{self.ckdir / tag if tag else 'none (no checkpoint yet)'}; check the data, or lower the learning "
                f"rate (e.g. --set optim.lr=...: a resumed run accepts learning-rate and schedule changes and records "
                f"them in ledger.json), then run the command again to resume from it"
            )
        engine.backward(loss)
        engine.step()
        return {"loss": loss.detach(), **logs}

    # --------------------------------------------------------------------------- accounting, logging
    def _account(self, index: int) -> None:
        """Move the steps / samples / seconds trained since the last call into the ledger (collective)."""
        now = time.perf_counter()
        samples = int(self.dist.all_reduce_sum(torch.tensor([self._pending["samples"]], device=self.device)).item())
        self.ledger.add_training(index, self._pending["steps"], samples, now - self._pending["clock"])
        self._pending.update(steps=0, samples=0, clock=now)

    def _log_window(self, engine, index: int, window: dict[str, float], bar) -> None:
        record = self.ledger.phases[index]
        before = (record["samples"], record["wall_seconds"])
        self._account(index)
        samples = record["samples"] - before[0]
        seconds = max(record["wall_seconds"] - before[1], 1e-9)
        n = window.pop("_n", 1)
        values = {f"train/{k}": v / n for k, v in window.items()}
        values.update({
            "train/lr": engine.lr_scheduler.get_last_lr()[0],
            "perf/samples_per_s": samples / seconds,
            "perf/tokens_per_s": samples * record["tokens_per_sample"] / seconds,
            "perf/train_flops": self.ledger.totals()["train_flops"],
            "phase": index + 1,
        })
        self.scalars.log(values, self.state.total_steps)
        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in values.items()
                         if k.startswith("train/") and k != "train/lr"} | {"lr": f"{values['train/lr']:.2e}"})
        log.info("step %d (%s): %s | %.1f samples/s", self.state.step, self.spec.phases[index].label(index),
                 ", ".join(f"{k[6:]}={v:.4g}" for k, v in values.items() if k.startswith("train/")),
                 values["perf/samples_per_s"])

    def _evaluate(self, model: nn.Module, index: int) -> dict[str, float]:
        """The objective's validation metrics of ``model`` (an engine or a module on the device)."""
        pipeline = FeaturePipeline(self.spec.audio, self.spec.phases[index].spec).to(self.device)
        batches = self._loader(index, train=False).batches(epochs=1)
        if self.spec.train.eval_batches is not None:
            batches = (b for i, b in zip(range(self.spec.train.eval_batches), batches))
        model.eval()
        generator = torch.Generator().manual_seed(self.spec.train.seed + 7919)  # the same masks every time
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                                 enabled=self.autocast_dtype is not None):
                return self.objective.evaluate(model, batches, pipeline, self.dist, generator)
        finally:
            model.train()

    def _validate(self, engine, index: int, epoch: int | None = None) -> None:
        self._account(index)
        if not self.spec.data.valid:
            return
        start = time.perf_counter()
        metrics = self._evaluate(engine, index)
        score = metrics[self.objective.score_name]
        if engine.lr_scheduler.report(score):
            log.info("learning rate now %.3g (%s schedule)", engine.lr_scheduler.get_last_lr()[0],
                     self.spec.optim.schedule)
        self.ledger.phases[index]["eval_seconds"] += time.perf_counter() - start
        where = {"epoch": epoch} if epoch is not None else {}
        record = self.ledger.add_eval(index, metrics, total_step=self.state.total_steps,
                                      phase_step=self.state.step, **where)
        self.scalars.log({f"eval/{k}": v for k, v in metrics.items()}, self.state.total_steps)
        self.scalars.flush()
        log.info("validation (%s, %s): %s", self.spec.phases[index].label(index),
                 f"epoch {epoch}" if epoch is not None else f"step {self.state.step}",
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self.dist.is_main:
            if self.state.best_score is None or score > self.state.best_score:
                self.state.best_score = score
                self.objective.export(engine.module, self.run_dir / "export" / "best.safetensors",
                                      self._export_meta(index, eval=record))
            self.ledger.write(self.run_dir / "ledger.json")
        self._pending["clock"] = time.perf_counter()

    def _export_meta(self, index: int, **extra) -> dict:
        phase = self.spec.phases[index]
        return {**self.spec.meta, "audio": asdict(self.spec.audio),
                "phase": {"index": index + 1, "of": len(self.spec.phases), "compression": phase.compression,
                          "factor": phase.factor}, **extra}

    # ------------------------------------------------------------------------------ checkpoints
    def _save(self, engine, index: int) -> None:
        self._account(index)
        st = self.state
        tag = make_tag(index, st.step if self.spec.phases[index].iteration_based else st.epoch_in_phase)
        trainer_state = {"state": asdict(st), "ledger": self.ledger.to_dict(), "tracker": self.tracker.state_dict()}
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.dist.is_main:
            recipe_checkpointed(self.run_dir)  # the run's recipe.yaml appears with its first checkpoint
        save_checkpoint(engine, self.ckdir, tag, trainer_state, rng, self.dist, self.spec.train.keep_checkpoints)
        if self.dist.is_main:
            self.ledger.write(self.run_dir / "ledger.json")
        self._pending["clock"] = time.perf_counter()

    def _restore_rng(self, tag: str) -> None:
        rng = read_rng_state(self.ckdir, tag, self.dist.rank)
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _resume(self) -> nn.Module | None:
        """Restore the newest checkpoint if there is one; returns a model only for a finished phase."""
        self._resume_tag = None
        if self.dist.is_main and self.ckdir.exists():
            remove_partial(self.ckdir)
        self.dist.barrier()
        tag = latest_tag(self.ckdir) if self.ckdir.exists() else None
        if tag is None:
            return None
        saved = read_trainer_state(self.ckdir, tag)
        self.state = _State(**saved["state"])
        baseline = self.ledger.baseline
        self.ledger = Ledger.from_dict(saved["ledger"])
        self.ledger.baseline = baseline or self.ledger.baseline
        self.tracker.load_state_dict(saved["tracker"])
        if self.state.phase_done:
            model = self.objective.build_model(ASTEncoder(self.cfgs[self.state.phase]))
            model.load_state_dict(read_module_state(self.ckdir, tag))
            self._restore_rng(tag)
            log.info("resuming after the end of phase %d (checkpoint %s)", self.state.phase + 1, tag)
            return model
        self._resume_tag = tag
        log.info("resuming %s at step %d (checkpoint %s)", self.spec.phases[self.state.phase].label(self.state.phase),
                 self.state.step, tag)
        return None

    def _average_epochs(self, index: int) -> list[int]:
        start = self.spec.train.weight_average_from
        phase = self.spec.phases[index]
        if start is None or phase.iteration_based or index != len(self.spec.phases) - 1:
            return []
        return list(range(start, phase.epochs + 1))

    def _keep_for_average(self, model: nn.Module, index: int) -> None:
        """Save this epoch's weights if weight averaging will use them (rank 0)."""
        if self.state.epoch_in_phase in self._average_epochs(index) and self.dist.is_main:
            from common.checkpoint import save_weights

            save_weights(self.run_dir / "average" / f"epoch{self.state.epoch_in_phase:03d}.safetensors",
                         model.state_dict(), {})

    def _weight_average(self, model: nn.Module, index: int) -> Path | None:
        """Average the kept epochs' weights, evaluate the average and export it (AST's WA)."""
        epochs = self._average_epochs(index)
        if not epochs:
            return None
        from common.checkpoint import read_weights

        files = [self.run_dir / "average" / f"epoch{e:03d}.safetensors" for e in epochs]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"weight averaging: epoch weights missing: {', '.join(missing)}")
        total = None
        for file in files:
            tensors, _ = read_weights(file)
            total = {k: v.double() for k, v in tensors.items()} if total is None else \
                {k: total[k] + tensors[k].double() for k in total}
        model.load_state_dict({k: (v / len(files)).float() for k, v in total.items()})
        model.to(self.device)
        metrics = self._evaluate(model, index) if self.spec.data.valid else {}
        self.ledger.add_eval(index, metrics, total_step=self.state.total_steps, phase_step=self.state.step,
                             weight_averaged=epochs)
        log.info("weight average of epochs %d-%d: %s", epochs[0], epochs[-1],
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        path = self.run_dir / "export" / "weight_averaged.safetensors"
        if self.dist.is_main:
            self.objective.export(model, path, self._export_meta(index, weight_averaged=epochs, eval=metrics))
        return path

    def _finish(self, model: nn.Module) -> None:
        last = len(self.spec.phases) - 1
        averaged = self._weight_average(model, last)
        if self.dist.is_main:
            phase_export = averaged or self.run_dir / "export" / f"phase{last + 1}.safetensors"
            tmp = self.run_dir / ".model.safetensors.tmp"
            shutil.copyfile(phase_export, tmp)
            os.replace(tmp, self.run_dir / "model.safetensors")
            self.ledger.write(self.run_dir / "ledger.json")
            totals = self.ledger.to_dict()
            saving = totals.get("flops_saving")
            log.info("run complete: %d steps, %.3g training FLOPs, %.0f s training%s; model: %s",
                     totals["total"]["steps"], totals["total"]["train_flops"], totals["total"]["wall_seconds"],
                     f", {saving:.1%} fewer FLOPs than {self.ledger.baseline['recipe']}" if saving is not None
                     else "", self.run_dir / "model.safetensors")
        self.state.phase = len(self.spec.phases)

