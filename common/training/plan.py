"""A run's plan: what each phase is and costs, and what the run is compared with, before it runs.

:func:`build_plan` makes a :class:`RunPlan` from any recipe (pretraining or fine-tuning: both entry points call
it, and so does the trainer for a run given without one): the architecture, each phase's geometry
(``common.models.arch.geometries``), its global batch split over the launch (``common.training.batch``), its
FLOPs per clip and planned FLOPs, and its memory estimate; the baseline as a plan of its own phases
(:class:`BaselinePlan`: the recipe a ``--coarse`` schedule was derived from, or a pretraining recipe's
``baseline:``); the files the run needs and its run directory. ``--dry-run`` prints it (:func:`format_plan`),
the ledger takes the baseline's planned FLOPs from it and the trainer its geometries, splits and FLOPs.

The planned cost of a schedule is counted here only (:meth:`RunPlan.cost`): training FLOPs for
iteration-based phases, and for epoch-based ones the FLOPs per clip of the training set summed over every
epoch (the data's size cancels in a saving).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from common.models.arch import Architecture, architecture_for, geometries
from common.models.memory import describe_setting, training_setting
from common.phases.config import PhaseConfig
from common.phases.until import describe_ends
from common.training import batch as batching
from common.training.batch import BatchSplit, phase_splits

__all__ = ["PhasePlan", "BaselinePlan", "RunPlan", "build_plan", "recipe_baseline", "planned_cost", "format_table", "format_plan"]


@dataclass(frozen=True)
class PhasePlan:
    """What a phase will cost, before it runs.

    Attributes:
        label: the phase's label.
        length, unit: ``steps`` or ``epochs``.
        global_batch: clips per optimiser step over every rank and accumulation.
        per_rank, grad_accum, world_size: how this launch splits it (``common.training.batch``).
        grid, tokens: the token grid ``(f, t)`` and its size (patch tokens, prefix tokens not counted).
        flops_per_sample: training FLOPs (forward + backward) per clip.
        train_flops: planned training FLOPs of the phase (iteration-based phases only: an epoch's size is
            the data's).
        memory: estimated bytes per rank at the phase's micro-batch (``common.models.memory``), if asked for.
    """

    label: str
    length: int
    unit: str
    global_batch: int
    grid: tuple[int, int]
    tokens: int
    flops_per_sample: int
    train_flops: float | None
    memory: int | None = None
    per_rank: int | None = None
    grad_accum: int = 1
    world_size: int = 1


def planned_cost(rows: Sequence[PhasePlan], lengths: Sequence[int] | None = None) -> float:
    """Planned training FLOPs of phases (iteration-based), or FLOPs per clip of the training set summed over
    every epoch (epoch-based: the data's size cancels in a saving). ``lengths`` replace the phases'."""
    lengths = lengths or [r.length for r in rows]
    return float(sum(r.flops_per_sample * n * (r.global_batch if r.unit == "steps" else 1)
                     for r, n in zip(rows, lengths)))


@dataclass(frozen=True)
class BaselinePlan:
    """The run a schedule is compared with, as a plan of its phases.

    Attributes:
        name: how the ledger names it.
        phases: its phases' plans (this run's geometry and batch settings).
        shown: how ``--dry-run`` names it (default: ``name``).
    """

    name: str
    phases: list[PhasePlan]
    shown: str | None = None

    @property
    def cost(self) -> float:
        return planned_cost(self.phases)

    @property
    def iteration_based(self) -> bool:
        return all(r.unit == "steps" for r in self.phases)

    def ledger_fields(self) -> dict:
        """What :meth:`common.training.ledger.Ledger.set_baseline` records: the planned training FLOPs, or for
        an epoch-based baseline (one phase: a derived schedule's) its FLOPs per clip and epochs (the ledger
        counts them with the clips per epoch this run trains on)."""
        if self.iteration_based:
            return {"name": self.name, "train_flops": sum(r.train_flops for r in self.phases)}
        only, = self.phases
        return {"name": self.name, "train_flops": None, "flops_per_sample": only.flops_per_sample,
                "epochs": only.length}


@dataclass(frozen=True)
class RunPlan:
    """A run before it runs (:func:`build_plan`).

    Attributes:
        arch: the model family's answers (``common.models.arch``).
        phases: the recipe's phases; ``configs`` their geometries, ``splits`` their batch splits over
            ``world_size`` ranks, ``rows`` their plans.
        setting: what the memory estimates assume (``common.models.memory.training_setting``).
        baseline: what the run is compared with, or None.
        coarse: the ``coarse`` section a schedule was derived by (None: written by hand).
        stop_when_surpassing: the baseline run the final phase may stop at (``train.stop_when_surpassing``).
        data_batch: the data section's global batch (after ``--set``).
        run_dir: where the run goes (None: not given).
        checks: the checks of the files the run reads (each raises naming a missing file).
    """

    arch: Architecture
    phases: list[PhaseConfig]
    configs: list
    splits: list[BatchSplit]
    rows: list[PhasePlan]
    setting: dict
    world_size: int
    baseline: BaselinePlan | None = None
    coarse: Any = None
    stop_when_surpassing: str | None = None
    data_batch: int | None = None
    run_dir: Path | None = None
    checks: list[Callable[[], None]] = field(default_factory=list)

    @property
    def iteration_based(self) -> bool:
        return self.phases[0].iteration_based

    def cost(self, lengths: Sequence[int] | None = None) -> float:
        """:func:`planned_cost` of this schedule (``lengths`` replace the phases')."""
        return planned_cost(self.rows, lengths)

    def saving(self, lengths: Sequence[int] | None = None) -> float | None:
        """The planned saving against the baseline (None without one)."""
        if self.baseline is None:
            return None
        return 1 - self.cost(lengths) / self.baseline.cost

    def warmup_cautions(self, warmup_steps: int) -> list[str]:
        """Iteration-based phases that end before their learning-rate warm-up does (it starts again with each
        phase): their learning rate never reaches the recipe's (a phase as long as its warm-up reaches it at its
        last step)."""
        return [f"phases.{i} ({phase.label(i)}): its {phase.steps} steps end inside the learning-rate warm-up "
                f"(optim.warmup_steps: {warmup_steps}, started again with each phase), so its learning rate never "
                f"reaches the recipe's; shorten the warm-up or lengthen the phase"
                for i, phase in enumerate(self.phases) if phase.iteration_based and warmup_steps > phase.steps]

    def schedule_cautions(self) -> list[str]:
        """What a hand-written ``phases:`` list may hold by a slip of the pen: a phase coarser than the one before
        it (the method trains the compressed phases first; ``coarse:`` refuses such factors), and a
        ``patch_transfer`` on a phase that is not a patch phase (the kernel moves into and out of a patch phase by
        that phase's own ``patch_transfer``; the key elsewhere changes nothing)."""
        out = []
        for i, (before, phase) in enumerate(zip([None, *self.phases], self.phases)):
            if before is not None and phase.factor > before.factor:
                out.append(f"phases.{i} ({phase.label(i)}) is coarser than phases.{i - 1} ({before.label(i - 1)}): "
                           f"coarse to fine trains the compressed phases first; check the order of phases")
            if self.coarse is None and phase.compression != "patch" and phase.patch_transfer != "pi":
                patch = [j for j in (i - 1, i + 1) if 0 <= j < len(self.phases)
                         and self.phases[j].compression == "patch"]
                where = (f"the transfer to and from phases.{patch[0]} is its own patch_transfer "
                         f"({self.phases[patch[0]].patch_transfer})" if patch else "it has no patch phase beside it")
                out.append(f"phases.{i}.patch_transfer: {phase.patch_transfer} changes nothing on a "
                           f"{phase.compression} phase: {where}")
        return out

    def saving_lines(self) -> list[str]:
        """What ``--dry-run`` says about the cost: for a derived schedule its planned FLOPs and saving (and the
        range of the saving when phases end by a criterion); for a hand-written iteration-based one its
        planned FLOPs, and the saving against a ``baseline:`` recipe."""
        base = self.baseline
        if self.coarse is None:
            if not self.iteration_based:
                return []
            line = f"total planned training FLOPs: {sum(r.train_flops for r in self.rows):.4g}"
            if base is not None:
                line += f"; baseline {base.shown or base.name}: {base.cost:.4g} -> saving {self.saving():.1%}"
            return [line]
        unit = "training FLOPs" if self.iteration_based else "training FLOPs per clip of the training set"
        lines = [f"planned {unit}: {self.cost():.4g}; baseline {base.name} "
                 f"({' + '.join(str(r.length) for r in base.phases)} {base.phases[0].unit}): {base.cost:.4g} -> "
                 f"saving {self.saving():.1%}"]
        if any(p.until is not None for p in self.phases):
            low = self.saving([max(p.until.min, 1) if p.until else p.length for p in self.phases])
            high = self.saving([p.max_length for p in self.phases])
            lines.append(f"phases ending by a criterion: the saving lies between {high:.1%} (every such phase at "
                         f"its max) and {low:.1%} (at its min)")
        return lines


def _rows(phases: Sequence[PhaseConfig], configs: Sequence, splits: Sequence[BatchSplit],
          flops_per_sample: Callable[[Any], int], memory: Callable[[Any, int], int] | None) -> list[PhasePlan]:
    rows = []
    for i, (phase, cfg, split) in enumerate(zip(phases, configs, splits)):
        flops = flops_per_sample(cfg)
        rows.append(PhasePlan(phase.label(i), phase.length, "steps" if phase.iteration_based else "epochs",
                              split.global_batch, cfg.grid, cfg.num_patches, flops,
                              flops * phase.steps * split.global_batch if phase.iteration_based else None,
                              memory(cfg, split.per_rank) if memory is not None else None,
                              split.per_rank, split.grad_accum, split.world_size))
    return rows


def build_plan(recipe, objective, world_size: int, *, base=None, audio=None, baseline: BaselinePlan | None = None,
               memory: bool = False, run_dir: Path | None = None,
               checks: Sequence[Callable[[], None]] = ()) -> RunPlan:
    """The plan of ``recipe`` (anything with ``phases``, ``data``, ``optim`` and ``train``: a pretraining or
    fine-tuning recipe, or a ``RunSpec``) trained with ``objective`` on ``world_size`` ranks.

    Args:
        base, audio: the full-resolution model config and front end (default: the recipe's ``base`` and
            ``audio``; fine-tuning derives them from its init).
        baseline: the baseline plan (a pretraining recipe's ``baseline:``, planned with :func:`build_plan`);
            a derived schedule's baseline (``recipe.coarse.baseline``) is planned here.
        memory: estimate each phase's memory per rank (what ``--dry-run`` shows).
        run_dir, checks: the run directory and the checks of the files the run reads.

    Raises:
        ValueError: a phase is impossible at this geometry (``phases.N: ...``).
        RecipeError: a phase's global batch does not split over ``world_size`` ranks.
    """
    arch = architecture_for(recipe.base if base is None else base, recipe.audio if base is None else audio)
    flops = functools.lru_cache(maxsize=None)(objective.flops_per_sample)  # a baseline shares the full geometry
    setting = training_setting(recipe.train.precision, recipe.train.zero_stage, world_size)
    estimate = (lambda cfg, micro: objective.memory_estimate(cfg, micro, **setting).total) if memory else None

    def plan_of(phases, estimate=None) -> tuple[list, list[BatchSplit], list[PhasePlan]]:
        configs = geometries(arch, phases)
        splits = phase_splits(phases, recipe.data, recipe.optim, world_size)
        return configs, splits, _rows(phases, configs, splits, flops, estimate)

    configs, splits, rows = plan_of(recipe.phases, estimate)
    coarse = getattr(recipe, "coarse", None)
    if coarse is not None and coarse.baseline is not None:  # the recipe it was derived from
        baseline = BaselinePlan(coarse.baseline.name, plan_of(coarse.baseline.phases)[2])
    return RunPlan(arch, list(recipe.phases), configs, splits, rows, setting, world_size, baseline, coarse,
                   recipe.train.stop_when_surpassing, recipe.data.batch_size,
                   None if run_dir is None else Path(run_dir), list(checks))


def recipe_baseline(path: str | Path, plan: RunPlan) -> BaselinePlan:
    """The plan of a ``baseline:`` recipe (``plan``: planned with this run's geometry and batch), named with its
    schedule, so that a shortened run is compared with the full plan."""
    steps = sum(r.length for r in plan.rows)
    return BaselinePlan(f"{Path(path).stem} (planned, {steps} steps)", plan.rows, shown=Path(path).name)


def format_table(rows: Sequence[PhasePlan]) -> str:
    """The phases as a table: the global batch and its split per rank (micro-batch x accumulation), planned
    FLOPs in PFLOPs where they are known, memory per rank in GiB if estimated."""
    unit = rows[0].unit if rows else "steps"
    with_memory = any(r.memory is not None for r in rows)
    lines = [f"{'phase':<32} {unit:>8} {'batch':>6} {'per rank':>9} {'grid':>7} {'tokens':>6} {'GFLOPs/sample':>14} "
             f"{'PFLOPs':>9}" + (f" {'GiB/rank':>9}" if with_memory else "")]
    for r in rows:
        total = f"{r.train_flops / 1e15:>9.4g}" if r.train_flops is not None else f"{'-':>9}"
        memory = (f" {r.memory / 2**30:>9.3g}" if r.memory is not None else f" {'-':>9}") if with_memory else ""
        per_rank = "-" if r.per_rank is None else f"{r.per_rank}" + (f"x{r.grad_accum}" if r.grad_accum > 1 else "")
        lines.append(f"{r.label:<32} {r.length:>8} {r.global_batch:>6} {per_rank:>9} {r.grid[0]:>3}x{r.grid[1]:<3} "
                     f"{r.tokens:>6} {r.flops_per_sample / 1e9:>14.4g} {total}{memory}")
    return "\n".join(lines)


def format_plan(plan: RunPlan, stated: int | None = None, source: str = "the recipe", header: Sequence[str] = (),
                notes: Sequence[str] = (), cautions: Sequence[str] = (), missing: Sequence[str] = (),
                refused: Sequence[str] = ()) -> str:
    """What ``--dry-run`` prints: ``header``, the table (after the schedule's origin, for a derived one), the
    batch and its split (``stated``: the global batch ``source`` states, to say when ``--set`` changed it), the
    memory setting, how phases end, the planned cost and saving, ``notes``, ``cautions``, what the command refuses
    in the run directory (``refused``: ``common.cli.resume_check``; no file is missing there) and the files a run
    would not find (``missing``)."""
    lines = list(header)
    if plan.coarse is not None:
        lines.append(f"coarse to fine ({plan.coarse.describe()}) derived from {plan.coarse.baseline.name}:")
    lines += [format_table(plan.rows), *batching.plan_lines(plan.splits, plan.data_batch, stated, source),
              describe_setting(plan.setting), *describe_ends(plan.phases, plan.stop_when_surpassing),
              *plan.saving_lines(), *notes, *(f"warning: {c}" for c in cautions)]
    if refused:
        lines += ["what the command refuses in its run directory (it would stop before any compute):",
                  *(f"  {problem}" for problem in refused)]
    if missing:
        lines += ["files a run needs and does not find (it would stop before any compute):",
                  *(f"  {problem}" for problem in missing)]
    return "\n".join(lines)
