"""What a run is: its settings (:class:`TrainConfig`), everything the trainer needs besides the objective
and the plan (:class:`RunSpec`, built by the entry points from a recipe; what the phases cost and the baseline
are the plan's, ``common.training.plan``); where it is: ``common.training.train_state``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.audio.pipeline import AudioConfig
from common.data.config import DataConfig
from common.models.weights import EncoderWeights
from common.phases.config import PhaseConfig, TransferConfig
from common.system.engine_config import ZeroStage
from common.training.compile import CompileBackend, CompileMode, check_mode
from common.training.nonfinite import NonFiniteCheck
from common.training.optim import OptimConfig
from common.training.run_recipe import RunRecipe

__all__ = ["TrainConfig", "RunSpec"]


@dataclass(frozen=True)
class TrainConfig:
    """How the loop runs.

    Args:
        seed: seeds model init, data order, crops, masks and augmentation.
        precision: ``auto`` (bf16 autocast on a GPU that computes in bf16, Ampere or later; fp32 on the CPU and on
            older GPUs, which only emulate bf16), ``fp32`` or ``bf16``.
        zero_stage: DeepSpeed ZeRO stage (0, 1 or 2), or ``auto``: 0 on one rank, 1 on several, a resumed run's
            from its checkpoint (``common.system.engine_config``).
        zero_overlap_comm: ZeRO: reduce the gradients while the backward pass runs (None: on several ranks).
        zero_bucket_size: ZeRO: elements per reduce / all-gather bucket (None: 5e7, ``common.system.engine_config``).
        log_every: optimiser steps between log lines / TensorBoard points.
        eval_every: optimiser steps between validations in iteration-based phases (epoch-based phases
            validate after every epoch).
        save_every: optimiser steps between checkpoints (in an epoch-based phase also within its epochs, besides
            the checkpoint at every epoch's end: an AudioSet-2M epoch is many hours).
        keep_checkpoints: how many of the newest checkpoints to keep.
        eval_batches: validate on at most this many batches per rank (None: the whole set).
        deterministic: ``torch.use_deterministic_algorithms`` (for exact-resume tests; slower).
        weight_average_from: average the weights of the final phase's epochs from this one (1-based) on
            and make the average the run's model (AST's weight averaging; epoch-based runs only).
        weight_average_top: average only the this many best of those epochs by validation score (HTS-AT
            averages its top checkpoints; ``weight_average_from`` defaults to 1 then).
        stop_when_surpassing: a baseline run directory: the final phase ends at its first validation whose
            score beats the best per-epoch score in that run's ``ledger.json`` (paper section 3.3; its weight
            average is not compared with epochs), read when the run starts (``common.phases.baseline``).
        accept_baseline_differences: compare with a ``stop_when_surpassing`` baseline that is not comparable
            (unfinished, other validation manifests or evaluation settings); the ledger records the differences.
        compile: ``torch.compile`` the model's blocks at every phase (``common.training.compile``; off by default).
        compile_backend: the ``torch.compile`` backend: ``inductor`` (generated kernels), or ``aot_eager`` /
            ``eager`` to find a capture problem without code generation.
        compile_mode: ``default``, ``reduce-overhead`` (CUDA graphs: for launch-bound GPU steps, e.g. a coarse
            phase at a small batch), ``max-autotune`` or ``max-autotune-no-cudagraphs`` (inductor only).
        nonfinite_check: when a non-finite loss is looked for on the host: ``window`` (once per log window,
            before every checkpoint and at epoch ends; no host sync per step) or ``step`` (every micro-batch,
            before its update). See ``common.training.nonfinite``.
        cpu_threads: intra-op threads of each rank's training process (None: cores per rank minus its loader
            workers, or the environment's ``OMP_NUM_THREADS``; ``common.system.cpu``).
    """

    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    zero_stage: ZeroStage = "auto"
    zero_overlap_comm: bool | None = None
    zero_bucket_size: int | None = None
    log_every: int = 50
    eval_every: int = 4000
    save_every: int = 4000
    keep_checkpoints: int = 2
    eval_batches: int | None = None
    deterministic: bool = False
    weight_average_from: int | None = None
    weight_average_top: int | None = None
    stop_when_surpassing: str | None = None
    accept_baseline_differences: bool = False
    compile: bool = False
    compile_backend: CompileBackend = "inductor"
    compile_mode: CompileMode = "default"
    nonfinite_check: NonFiniteCheck = "window"
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:  # what every generator it seeds takes (numpy's: 0 to 2**32 - 1)
            raise ValueError(f"seed must be a whole number from 0 to {2**32 - 1}, got {self.seed}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 (or null: from the cores), got {self.cpu_threads}")
        if self.weight_average_from is not None and self.weight_average_from < 1:
            raise ValueError(f"weight_average_from must be >= 1, got {self.weight_average_from}")
        if self.weight_average_top is not None and self.weight_average_top < 1:
            raise ValueError(f"weight_average_top must be >= 1, got {self.weight_average_top}")
        if self.zero_stage not in ("auto", 0, 1, 2):
            raise ValueError(f"zero_stage must be auto, 0, 1 or 2, got {self.zero_stage}")
        if self.zero_bucket_size is not None and self.zero_bucket_size < 1:
            raise ValueError(f"zero_bucket_size must be >= 1 (or null: the default), got {self.zero_bucket_size}")
        for name in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_mode(self.compile_backend, self.compile_mode)
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1 (or null: the whole set), got {self.eval_batches}")


@dataclass
class RunSpec:
    """Everything the trainer needs besides the objective (built by the entry points from a recipe).

    Args:
        base: the full-resolution model config (an ``EncoderConfig`` for the AST family, an
            ``HTSATConfig`` for HTS-AT): it picks the architecture (``common.models.arch``).
        audio: the AST family's full-resolution front end (HTS-AT's is part of its config).
        init: the encoder weights the first phase starts from (None: from scratch).
        init_pos_embed: how the initial positional embedding is fitted to the first phase (default: the
            transfer setting; ImageNet weights use ``cut``, AST's rule).
        init_record: the ledger's ``init`` entry (where the run started and what was kept of it), or None.
        run_recipe: the run directory's recipe (``common.training.run_recipe``): written with the first checkpoint;
            accepted recovery changes are recorded in the ledger when the run resumes.
        meta: extra metadata stored in exports (e.g. the front end, the task).
    """

    run_dir: Path
    base: object
    audio: AudioConfig | None
    phases: list[PhaseConfig]
    transfer: TransferConfig
    optim: OptimConfig
    train: TrainConfig
    data: DataConfig
    init: EncoderWeights | None = None
    init_pos_embed: str | None = None
    init_record: dict | None = None
    run_recipe: RunRecipe | None = None
    meta: dict = field(default_factory=dict)
