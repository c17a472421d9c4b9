"""The trainer's phase machinery (:class:`PhaseMachinery`, the base class of ``common.training.loop.Trainer``):
what one phase trains with: its model's random streams, its front end, its training and validation loaders
(``common.data.loader``), the micro-step (``common.training.steps``) and the validation pass. The loop
(``common.training.loop.Trainer``, which also builds the phase's engine) builds on it and decides when each is
used.
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch import nn

from common.audio.augment import SpecAugmentConfig
from common.data.cache import make_cache
from common.data.clips import Batch
from common.data.loader import ClipLoader, eval_loader, train_loader
from common.models.memory import autocast_bf16
from common.system.distributed import Dist
from common.training.nonfinite import NonFiniteWatch
from common.training.objective import Objective
from common.training.plan import RunPlan
from common.training.record import RunRecord
from common.training.spec import RunSpec
from common.training.steps import micro_step

log = logging.getLogger(__name__)

__all__ = ["PhaseMachinery", "agreed_bf16"]


def agreed_bf16(precision: str, device: torch.device, dist: Dist) -> bool:
    """Whether the ranks autocast to bf16 (``train.precision``, :func:`~common.models.memory.autocast_bf16`): for
    ``auto`` on GPUs, only where every rank's GPU computes bf16 (a job over an A100 node and a V100 node trained some
    ranks in bf16, the others in fp32, without a word); the main rank says which GPUs keep the job in fp32."""
    bf16 = autocast_bf16(precision, device.type == "cuda")
    if precision != "auto" or device.type != "cuda":
        return bf16
    ranks = dist.gather_objects((torch.cuda.get_device_name(device), bf16))  # every rank's GPU is CUDA (NCCL)
    lacking = sorted({name for name, native in ranks if not native})
    if lacking and dist.is_main:
        log.warning("train.precision auto: fp32%s, as %s compute%s bf16 only by emulation (several times slower)",
                    " on every rank" if len(ranks) > 1 else "", " and ".join(lacking), "s" if len(lacking) == 1 else "")
    return not lacking


class PhaseMachinery:
    """The objects of the phases of ``spec`` planned as ``plan``, trained with ``objective`` on ``dist`` and
    recorded by ``record``."""

    def __init__(self, spec: RunSpec, objective: Objective, dist: Dist, plan: RunPlan, record: RunRecord) -> None:
        self.spec, self.objective, self.dist, self.plan, self.record = spec, objective, dist, plan, record
        self.arch, self.cfgs, self.splits = plan.arch, plan.configs, plan.splits
        self.device = dist.device
        bf16 = agreed_bf16(spec.train.precision, self.device, dist)
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        record.bf16 = bf16
        self.tracker = record.tracker
        self._clips = make_cache(spec.data.cache, spec.data.cache_dir)  # decoded clips, kept across phases
        self._train: ClipLoader | None = None  # one training loader for every phase (its workers kept)
        self._valid: ClipLoader | None = None  # one validation loader for every round (its workers kept)
        self._finite = NonFiniteWatch(dist, spec.train.nonfinite_check, self.splits[0].grad_accum)
        self._validating = False  # in a validation pass (until it returns: what an error raised in it says)

    @property
    def state(self):
        """Where the run is (the record's)."""
        return self.record.state

    @property
    def channels(self) -> str:
        """How a multi-channel file becomes one: ``data.channels``, or for ``auto`` the architecture's official
        code's."""
        return self.spec.data.channels_for(self.arch)

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of this launch's engines (the record's: a resumed run keeps its checkpoint's)."""
        return self.record.zero_stage

    def _evaluate(self, model: nn.Module, index: int) -> dict[str, float]:
        """The objective's validation metrics of ``model`` (on the device) at phase ``index``'s resolution."""
        spec = self.spec
        pipeline = self._frontend(index, SpecAugmentConfig())
        stream = self._eval_loader(index).batches(epochs=1)
        batches = stream if spec.train.eval_batches is None else itertools.islice(stream, spec.train.eval_batches)
        model.eval()
        self._validating = True
        generator = torch.Generator().manual_seed(spec.train.seed + 7919)  # the same masks every time (SSAST)
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                                 enabled=self.autocast_dtype is not None):
                metrics = self.objective.evaluate(model, batches, pipeline, self.dist, generator)
        finally:
            stream.close()  # its prefetch thread ends here, not in the collector (where a Ctrl-C is ignored)
            model.train()
        # a whole pass was judged at its end (the loader); a partial one (train.eval_batches) here (collective)
        self.tracker.for_split("valid").check(whole=False)
        self._validating = False
        return metrics

    def _seed_rank(self, index: int) -> None:
        """After a phase's model is built (identically on every rank): a different random stream per rank
        and phase, so that stochastic depth and dropout differ between ranks."""
        torch.manual_seed((self.spec.train.seed * 1_000 + index) * 1_000 + self.dist.rank)

    def _frontend(self, index: int, specaug: SpecAugmentConfig) -> nn.Module:
        """The phase's front end on the device (training augmentation from ``specaug``)."""
        return self.arch.frontend(self.cfgs[index], self.spec.phases[index].as_compression(), specaug).to(self.device)

    def _train_loader(self, index: int) -> ClipLoader:
        """The run's training loader at phase ``index``'s batch size: made once, its workers kept across the
        phases (the clips are the same in every phase; the front end on the device makes each phase's
        resolution) until :meth:`_close_loaders`."""
        if self._train is None:
            self._train = train_loader(self.spec.data, self.objective.classes, self.arch.clip_samples,
                                       self.arch.sample_rate, self.splits[index].per_rank, self.spec.train.seed,
                                       self.dist.rank, self.dist.world_size, self.tracker,
                                       pin_memory=self.device.type == "cuda", cache=self._clips, keep_workers=True,
                                       channels=self.channels)
        self._train.batch_size = self.splits[index].per_rank
        return self._train

    def _close_loaders(self) -> None:
        """Stop the loaders' worker processes (the run ends, or stops)."""
        for loader in (self._train, self._valid):
            if loader is not None:
                loader.close()
        self._train = self._valid = None

    def _eval_loader(self, index: int) -> ClipLoader:
        """The run's validation loader at phase ``index``'s batch size: made at the first validation, its workers
        kept for every later round and phase (the clips and their crops are the same each time) until
        :meth:`_close_loaders`. Workers forked afresh each round cost their start-up every round, and forking a
        process that runs threads (TensorBoard's writer, the pin-memory thread) is a known source of rare crashes
        of a worker at start-up."""
        data = self.spec.data
        if self._valid is None:
            self._valid = eval_loader(data.valid, self.objective.classes, self.arch.clip_samples,
                                      self.arch.sample_rate, self._eval_batch(index),
                                      data.num_workers, data.eval_crop, self.dist.rank, self.dist.world_size,
                                      tracker=self.tracker.for_split("valid", data.valid, dist=self.dist),
                                      pin_memory=self.device.type == "cuda", pad=data.pad, cache=self._clips,
                                      keep_workers=True, channels=self.channels)
        self._valid.batch_size = self._eval_batch(index)
        return self._valid

    def _eval_batch(self, index: int) -> int:
        """Clips per rank per validation batch at phase ``index``: ``data.eval_batch_size``, by default the phase's
        training micro-batch."""
        return self.spec.data.eval_batch_size or self.splits[index].per_rank

    def _micro_step(self, engine, batch: Batch, pipeline: nn.Module, index: int) -> dict[str, torch.Tensor]:
        """Forward, backward and (at the end of an accumulation group) the optimiser step of one micro-batch
        (``common.training.steps.micro_step``: one without a usable clip steps with a zero gradient)."""
        def nonfinite(loss):  # train.nonfinite_check: step
            if self._finite.observe(loss):
                raise self.record.nonfinite(self.spec.phases[index].label(index), self.state.step + 1,
                                            f"({loss.item()}) ", "stopped before the update")

        return micro_step(engine, batch, pipeline, self.objective, self.record.generator, self.device,
                          self.autocast_dtype, self.arch.clip_samples, nonfinite, self.dist.rank)

    def _check_finite(self, index: int) -> None:
        """Raise :class:`NonFiniteLoss` if a loss since the last check was not finite (collective)."""
        step = self.state.step
        first = self._finite.check(step)
        if first is not None:
            raise self.record.nonfinite(self.spec.phases[index].label(index), first, "",
                                        f"stopped at step {step}, before saving anything after it")
