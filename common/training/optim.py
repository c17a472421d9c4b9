"""Optimiser and learning-rate schedule (SSAST / AST settings), restarted at every phase.

The schedule is a linear warm-up followed by one of

- ``plateau``: multiply by ``decay`` when the validation score has not improved (by more than 1e-4 of
  the best, relatively, as torch's ``ReduceLROnPlateau``) for ``patience`` validation rounds (SSAST
  pretraining: 0.5 after 2 rounds of 4,000 steps);
- ``multistep``: multiply by ``decay`` after validation round ``decay_start`` and every ``decay_every``
  rounds after it (AST fine-tuning's epoch-wise MultiStepLR; a round is an epoch there);
- ``cosine``: cosine decay to ``min_lr`` over the phase's planned length in optimiser steps (an epoch-based
  phase: its ``epochs`` x the steps of an epoch; ``until`` criteria do not change it);
- ``piecewise``: a factor per validation round (epoch), from a table (HTS-AT's epoch-wise LambdaLR);
- ``constant``.

``plateau`` and ``multistep`` decay no lower than ``min_lr`` either (torch's ``ReduceLROnPlateau(min_lr=...)``;
the default 0, as SSAST and AST ran them, sets no floor: the rate halves for as long as the score stalls). A
floor above a phase's peak learning rate is that peak, in every schedule; a param group's ``lr_scale`` scales
its floor too (the head's is ``min_lr * head_lr_scale``).

It is handed to DeepSpeed as its LR scheduler, so DeepSpeed steps it after every optimiser step and
saves / restores it with each checkpoint. Param groups may carry an ``lr_scale`` (AST's head lr factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from common.system.engine_config import zero_config

# a round improves on the best when it beats it by this share (ReduceLROnPlateau's default relative threshold)
PLATEAU_THRESHOLD = 1e-4

__all__ = ["OptimConfig", "build_optimizer", "LRSchedule", "param_groups", "build_engine", "step_engine"]


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation settings (defaults: SSAST pretraining, base model).

    Args:
        optimizer: ``adam`` (SSAST / AST) or ``adamw``.
        lr: peak learning rate.
        betas, weight_decay: Adam settings (SSAST: (0.95, 0.999), 5e-7).
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr`` (0: none).
        schedule: ``plateau``, ``multistep``, ``cosine``, ``piecewise`` or ``constant`` (module docstring).
        patience: plateau: validation rounds without improvement before a decay.
        decay: plateau / multistep factor.
        decay_start, decay_every: multistep: the first decaying round and the period after it.
        min_lr: the lowest learning rate: cosine's final one; plateau and multistep decay no lower (0: no floor,
            as SSAST and AST; a floor above a phase's peak learning rate is that peak).
        piecewise: piecewise: ``[[round, factor], ...]``: from validation round (epoch) ``round`` on, the
            learning rate is ``lr * factor`` (HTS-AT's LambdaLR: ``[[0, 0.02], [1, 0.05], [2, 0.1], [11, 0.05],
            [21, 0.02], [31, 0.03]]``). The first entry must start at round 0.
        grad_clip: clip the global gradient norm to this value (0: off).
        grad_accum: micro-batches per rank per optimiser step (at least: ``data.max_batch_per_rank`` raises it;
            ``common.training.batch`` splits the global batch ``data.batch_size`` by it and the ranks).
        head_lr_scale: learning-rate factor of the task head (AST's ``head_lr``; 1 in every released recipe).
    """

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 5e-7
    warmup_steps: int = 1000
    schedule: Literal["plateau", "multistep", "cosine", "piecewise", "constant"] = "plateau"
    patience: int = 2
    decay: float = 0.5
    decay_start: int = 10
    decay_every: int = 5
    min_lr: float = 0.0
    piecewise: tuple[tuple[int, float], ...] = ()
    grad_clip: float = 0.0
    grad_accum: int = 1
    head_lr_scale: float = 1.0

    def unvalidated_caution(self) -> str | None:
        """What to say of this schedule in a run without a validation set: ``plateau``, ``multistep`` and
        ``piecewise`` change the learning rate at validations only (None for the others)."""
        if self.schedule not in ("plateau", "multistep", "piecewise"):
            return None
        return (f"optim.schedule: {self.schedule} changes the learning rate at validations, and this run has no "
                f"validation set (data.valid is empty): after its warm-up it trains at lr {self.lr:g} to the end; "
                f"give a validation set, or --set optim.schedule=cosine (or constant) to say which schedule is meant")

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:  # also NaN
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if self.warmup_steps < 0 or self.patience < 0 or self.decay_every < 1 or self.decay_start < 1:
            raise ValueError("warmup_steps and patience must be >= 0, decay_start and decay_every >= 1")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.grad_clip < math.inf:  # NaN would clip nothing, silently
            raise ValueError(f"grad_clip must be >= 0 and finite (0: no clipping), got {self.grad_clip}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must both be in [0, 1), got {list(self.betas)}")
        for name in ("weight_decay", "head_lr_scale", "min_lr"):
            if not 0 <= getattr(self, name) < math.inf:  # also catches NaN
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)}")
        if self.schedule == "piecewise" or self.piecewise:
            rounds = [r for r, _ in self.piecewise]
            if self.schedule != "piecewise":
                raise ValueError(f"piecewise: a table for schedule 'piecewise', but schedule is {self.schedule!r}")
            if not rounds or rounds[0] != 0 or any(b <= a for a, b in zip(rounds, rounds[1:])):
                raise ValueError(f"piecewise: needs [[round, factor], ...] from round 0 in increasing rounds, got "
                                 f"{[list(x) for x in self.piecewise]}")
            if any(not f > 0 for _, f in self.piecewise):
                raise ValueError("piecewise: factors must be positive")


def build_optimizer(groups: list[dict], cfg: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam / AdamW over param groups (``{"params": [...], "lr_scale": s}``), fused on CUDA and on the CPU (one
    pass over the weights: on the CPU a third of the time of the multi-tensor version, a cost per step that
    does not shrink with the phase's token count)."""
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    extra = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return cls(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **extra)


class LRSchedule:
    """Warm-up + plateau / multistep / cosine / constant; stepped once per optimiser step.

    Args:
        optimizer: the optimiser whose param groups get the learning rate.
        cfg: the settings.
        lr: the peak learning rate of this phase.
        total_steps: the phase length in optimiser steps (cosine needs it).
    """
    def __init__(self, optimizer, cfg: OptimConfig, lr: float, total_steps: int | None = None) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.base_lr = lr
        self.total_steps = total_steps
        self.steps = 0
        self.factor = 1.0  # accumulated plateau / multistep decay
        self.best: float | None = None
        self.bad_rounds = 0
        self.rounds = 0
        self.used: list[float] | None = None  # the learning rates of the last optimiser step
        self._apply()

    def lr(self) -> float:
        """Learning rate of the next optimiser step."""
        cfg, s = self.cfg, self.steps
        if cfg.warmup_steps and s < cfg.warmup_steps:
            return self.base_lr * (s + 1) / cfg.warmup_steps
        if cfg.schedule == "piecewise":
            return self.base_lr * next(f for r, f in reversed(cfg.piecewise) if self.rounds >= r)
        if cfg.schedule == "cosine" and self.total_steps:
            span = max(1, self.total_steps - cfg.warmup_steps)
            progress = min(1.0, (s - cfg.warmup_steps) / span)
            floor = self._floor()
            return floor + (self.base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return self._decayed()

    def _floor(self) -> float:
        """``min_lr``, or the phase's peak where it is lower (a schedule never rises above its peak)."""
        return min(self.cfg.min_lr, self.base_lr)

    def _decayed(self) -> float:
        """The peak times the plateau / multistep decays so far, no lower than the floor."""
        return max(self.base_lr * self.factor, self._floor())

    def _decay(self) -> bool:
        """One plateau / multistep decay, which stops at the floor (as torch's ``min_lr``: a floor lowered on a
        resume decays on from there); False where the floor already holds the learning rate."""
        before = self._decayed()
        self.factor = max(self.factor * self.cfg.decay, self._floor() / self.base_lr)
        return self._decayed() < before

    def _apply(self) -> None:
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self, *args, **kwargs) -> None:
        """After an optimiser step (DeepSpeed calls this)."""
        self.used = self.get_last_lr()
        self.steps += 1
        self._apply()

    def used_lr(self) -> float:
        """The learning rate of the last optimiser step (what a log of the steps so far shows), or the next
        step's before the first (:meth:`get_last_lr` is the next step's: one warm-up step ahead)."""
        return (self.used or self.get_last_lr())[0]

    def report(self, score: float) -> bool:
        """A validation round ended with ``score`` (higher is better); returns True if the LR decayed."""
        self.rounds += 1
        decayed = False
        if self.cfg.schedule == "plateau":  # torch's ReduceLROnPlateau(mode="max") as SSAST runs it
            if self.best is None or score > self.best * (1 + PLATEAU_THRESHOLD):
                self.best, self.bad_rounds = score, 0
            else:
                self.bad_rounds += 1
                if self.bad_rounds > self.cfg.patience:
                    self.bad_rounds, decayed = 0, self._decay()
        elif self.cfg.schedule == "multistep":
            start, every = self.cfg.decay_start, self.cfg.decay_every
            if self.rounds >= start and (self.rounds - start) % every == 0:
                decayed = self._decay()
        self._apply()
        return decayed

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("steps", "factor", "best", "bad_rounds", "rounds", "base_lr",
                                              "total_steps")}

    def load_state_dict(self, state: dict) -> None:
        # the peak LR and the phase length come from the recipe, not the checkpoint: a resumed run may
        # lower its learning rate (the recovery from a non-finite loss)
        for key, value in state.items():
            if key not in ("base_lr", "total_steps"):
                setattr(self, key, value)
        self._apply()


def param_groups(model: nn.Module, head_prefixes: tuple[str, ...] = (), head_lr_scale: float = 1.0) -> list[dict]:
    """Trainable parameters in one group, or two when a head gets its own learning-rate factor."""
    body, head = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if head_prefixes and name.startswith(head_prefixes) else body).append(param)
    groups = [{"params": body, "lr_scale": 1.0}]
    if head:
        groups.append({"params": head, "lr_scale": head_lr_scale})
    return groups


def _world_size() -> int:
    """The ranks the engine will data-parallelise over (the initialised process group's)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def build_engine(model: nn.Module, cfg: OptimConfig, lr: float, batch_size: int, zero_stage: int,
                 device: torch.device, total_steps: int | None = None, head_prefixes: tuple[str, ...] = (),
                 autocast_dtype: torch.dtype | None = None, load_universal: bool = False,
                 grad_accum: int | None = None, zero_overlap_comm: bool | None = None,
                 zero_bucket_size: int | None = None):
    """A DeepSpeed engine around ``model`` with a fresh optimiser and LR schedule (one per phase).

    DeepSpeed's forward turns off an autocast that its own config does not name (``torch.autocast(...,
    enabled=False)`` around the module, with a one-time warning): a bf16 run whose autocast is set only
    around the engine trains in fp32 (on an H200, SSAST-base ran 6x slower with 1.6x the memory). So the
    run's autocast is named in the engine's ``torch_autocast`` section too, with no module on DeepSpeed's
    "lower precision safe" list: gradients stay fp32 and are all-reduced in fp32, as without DeepSpeed.

    Args:
        model: the phase's model.
        cfg: the optimiser settings.
        lr: the phase's peak learning rate.
        batch_size: micro-batch size per rank.
        zero_stage: DeepSpeed ZeRO stage (resolved: ``common.system.engine_config.resolve_zero_stage``).
        device: where training runs (fused Adam on CUDA and the CPU).
        total_steps: the phase length in optimiser steps (cosine schedules need it).
        head_prefixes: parameter-name prefixes that get ``cfg.head_lr_scale``.
        autocast_dtype: the run's autocast dtype (``train.precision``), or None for fp32.
        load_universal: the engine will load a checkpoint in DeepSpeed's universal format (a resume on
            another number of ranks, ``common.training.checkpoints``).
        grad_accum: micro-batches per optimiser step (default ``cfg.grad_accum``; the trainer gives the phase's
            split, ``common.training.batch``).
        zero_overlap_comm, zero_bucket_size: the recipe's overrides of the ZeRO defaults
            (``common.system.engine_config``).
    """
    # lazy: importing DeepSpeed takes seconds; --help and --dry-run do not need it
    import deepspeed

    optimizer = build_optimizer(param_groups(model, head_prefixes, cfg.head_lr_scale), cfg, lr, device)
    config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": cfg.grad_accum if grad_accum is None else grad_accum,
        # without ZeRO, step_engine clips (DeepSpeed would, one tensor at a time); ZeRO's optimizer clips its own
        "gradient_clipping": cfg.grad_clip if zero_stage > 0 else 0.0,
        "zero_optimization": zero_config(zero_stage, _world_size(), zero_overlap_comm, zero_bucket_size, cfg.grad_clip),
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default) waits for the device at the start and the end of every
        # step, so the host never queues a step ahead; the run's own ledger times the steps instead.
        "timers": {"throughput": {"enabled": False}},
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if autocast_dtype is not None:
        config["torch_autocast"] = {"enabled": True, "dtype": str(autocast_dtype).removeprefix("torch."),
                                    "lower_precision_safe_modules": []}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False,
                                      lr_scheduler=lambda opt: LRSchedule(opt, cfg, lr, total_steps))
    if zero_stage == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False  # on one rank the "all-reduce" flattens and copies every gradient
    engine.c2f_grad_clip = cfg.grad_clip if zero_stage == 0 else 0.0  # step_engine's, over these parameters
    engine.c2f_clip_parameters = list(model.parameters()) if engine.c2f_grad_clip > 0 else []
    if zero_stage == 0:
        engine.zero_grad = _gradients_dropper(list(model.parameters()))
    return engine


def _gradients_dropper(parameters: list[nn.Parameter]):
    """What an engine without ZeRO calls after each optimiser step in place of DeepSpeed's ``zero_grad``: every
    gradient of the model set to None, as DeepSpeed's does, over a list made once instead of a walk of the
    module tree at every step (``named_parameters``: 45 us a step for tiny SSAST's 39 tensors on the CPU, more
    than Adam's own bookkeeping; the engine and its model are made anew at each phase)."""
    def zero_grad() -> None:
        for param in parameters:
            param.grad = None
    return zero_grad


def step_engine(engine) -> None:
    """``engine.step()``; on an engine without ZeRO, the gradients clipped first (``optim.grad_clip``).

    DeepSpeed clips an engine without ZeRO in a Python loop over the parameters, a norm and a multiply per
    tensor (2.4 ms of a 54 ms HTS-AT step at Fshift x4 on the CPU; two kernel launches per tensor on a GPU,
    where the coarse phase is launch-bound). Here ``torch.nn.utils.clip_grad_norm_`` does it with its
    multi-tensor kernels and the same rule: the gradients, already summed over the ranks, scaled by
    ``min(1, max_norm / (norm + 1e-6))`` once per optimiser step (at the accumulation boundary).
    """
    clip = getattr(engine, "c2f_grad_clip", 0.0)
    if clip > 0 and engine.is_gradient_accumulation_boundary():
        torch.nn.utils.clip_grad_norm_([p for p in engine.c2f_clip_parameters if p.grad is not None], clip)
    engine.step()
