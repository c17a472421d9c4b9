"""SSAST masked-patch pretraining, coarse to fine.

    deepspeed pretrain/run.py --recipe recipes/ssast_fshift4.yaml [--run-dir DIR] [--set key=value ...]
    deepspeed --num_gpus 8 pretrain/run.py --recipe ...          # one node, 8 GPUs
    deepspeed --hostfile hosts pretrain/run.py --recipe ...      # several nodes
    python pretrain/run.py --recipe recipes/synth_pretrain.yaml  # one process, no launcher
    python pretrain/run.py --recipe recipes/ssast_baseline.yaml --coarse fshift:4 --dry-run   # derived schedule
    python pretrain/run.py --recipe my_corpus.yaml --init SSAST-Base-Patch-400.pth     # continue a released model

Running the same command on an existing run directory resumes where it stopped. The run directory
receives the resolved recipe, TensorBoard events (``tb/``), checkpoints, ``export/phaseN.safetensors``
at each phase end, the final ``model.safetensors`` (what ``finetune/run.py --init`` takes) and
``ledger.json`` (FLOPs and time per phase, saving against the recipe's baseline).

``--init`` continues pretraining from an official SSAST checkpoint (its pretext heads too), this package's
pretraining run or export, an official AST checkpoint or timm ImageNet ViT / DeiT weights: the file's
grid-dependent weights are fitted to the first phase, the heads kept where it has them (``pretrain.init``;
the decisions are logged and recorded in ``ledger.json``'s ``init``). A resumed run does not read it again.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from common.cli import add_run_arguments, run_main, training_session

log = logging.getLogger("pretrain")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain/run.py",
        description="SSAST masked-patch pretraining with coarse-to-fine phases (DeepSpeed; also runs as plain "
                    "python for one process). Re-running on an existing run directory resumes it.",
        epilog="example: deepspeed pretrain/run.py --recipe recipes/ssast_fshift4.yaml",
    )
    parser.add_argument("--recipe", type=Path, required=True, help="a pretraining recipe (YAML), e.g. "
                        "recipes/ssast_fshift4.yaml")
    parser.add_argument("--init", default=None,
                        help="continue pretraining from these weights: an official SSAST .pth (with its pretext "
                             "heads), a pretraining run directory or export of this package, an official AST .pth "
                             "or timm ImageNet ViT/DeiT weights (default: from scratch)")
    add_run_arguments(parser, "runs/pretrain")
    return parser


def _resumes(run_dir: Path, restart: bool) -> bool:
    """Whether the run in ``run_dir`` continues from its own checkpoints (then ``--init`` is not read)."""
    checkpoints = run_dir / "checkpoints"
    return not restart and ((run_dir / "model.safetensors").is_file() or
                            (checkpoints.is_dir() and any(p.is_dir() for p in checkpoints.iterdir())))


def _started_from(run_dir: Path) -> str:
    """Where a resumed run started, as its ledger says."""
    import json

    try:
        init = json.loads((run_dir / "ledger.json").read_text()).get("init")
    except (OSError, ValueError):
        return "as its ledger says"
    return f"it started from {init['source']}" if isinstance(init, dict) else "it started from scratch"


@functools.lru_cache(maxsize=64)
def _flops_per_sample(ssast, cfg) -> int:
    """SSAST training FLOPs per sample (cached: a plan and its baseline share the full-resolution geometry)."""
    from pretrain.ssast import SSASTObjective

    return SSASTObjective(ssast).flops_per_sample(cfg)


def plan(recipe, world_size: int = 1, phases=None, memory: dict | None = None):
    """The recipe's :class:`common.phases.config.PhasePlan` per phase (geometry, tokens, planned FLOPs; the memory
    estimate per rank too when ``memory`` gives its setting, ``common.models.memory.training_setting``); ``phases``
    replace the recipe's (e.g. the baseline a coarse-to-fine schedule was derived from)."""
    from common.models.arch import architecture_for
    from common.models.arch import geometries
    from common.training.batch import phase_splits
    from common.phases.config import plan_phases
    from pretrain.ssast import SSASTObjective

    phases = recipe.phases if phases is None else phases
    configs = geometries(architecture_for(recipe.base, recipe.audio), phases)
    estimate = None
    if memory is not None:
        objective = SSASTObjective(recipe.ssast)
        estimate = lambda cfg, batch: objective.memory_estimate(cfg, batch, **memory).total  # noqa: E731
    return plan_phases(phases, configs, lambda cfg: _flops_per_sample(recipe.ssast, cfg),
                       phase_splits(phases, recipe.data, recipe.optim, world_size), estimate)


def planned_total(recipe, world_size: int) -> float:
    """Planned training FLOPs of a whole recipe (all phases)."""
    return sum(r.train_flops for r in plan(recipe, world_size))


def baseline_of(recipe, baseline, world_size: int) -> tuple[str, float] | None:
    """``(name, planned training FLOPs)`` of the run's baseline: the recipe a ``coarse`` schedule was derived
    from, or the ``baseline`` recipe (loaded with this run's geometry and batch: ``load_baseline``)."""
    if recipe.coarse is not None:
        return recipe.coarse.baseline.name, planned_total_of(recipe, recipe.coarse.baseline.phases, world_size)
    if baseline is not None:  # named with its schedule: a shortened run is compared with the full plan
        steps = sum(p.steps for p in baseline.phases)
        return f"{Path(recipe.baseline).stem} (planned, {steps} steps)", planned_total(baseline, world_size)
    return None


def planned_total_of(recipe, phases, world_size: int) -> float:
    return sum(r.train_flops for r in plan(recipe, world_size, phases))


def _phase_overrides(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0].strip() for o in overrides if o.split("=", 1)[0].strip().startswith("phases")]


def print_plan(recipe, world_size: int, baseline=None, overrides: list[str] = (), stated: int | None = None,
               source: str = "the recipe") -> None:
    """The ``--dry-run`` plan on ``world_size`` ranks; ``stated``: the global batch the recipe file states
    (``source`` names it), to say when ``--set`` changed it."""
    from common.training import batch
    from common.phases.coarse import plan_lines
    from common.models.memory import training_setting

    setting = training_setting(recipe.train.precision, recipe.train.zero_stage, world_size)
    rows = plan(recipe, world_size, memory=setting)
    splits = batch.phase_splits(recipe.phases, recipe.data, recipe.optim, world_size)
    print("\n".join(plan_lines(recipe, rows, setting,
                               lambda: plan(recipe, world_size, recipe.coarse.baseline.phases),
                               batch.plan_lines(splits, recipe.data.batch_size, stated, source))))
    if recipe.coarse is not None:
        return
    total = sum(r.train_flops for r in rows)
    line = f"total planned training FLOPs: {total:.4g}"
    if baseline is not None:
        base = planned_total(baseline, world_size)
        line += f"; baseline {Path(recipe.baseline).name}: {base:.4g} -> saving {1 - total / base:.1%}"
    print(line)
    if baseline is not None:
        from pretrain.recipe import shared_with_baseline

        shared = shared_with_baseline(overrides)
        if shared:
            print(f"(the baseline is planned with the same {', '.join(o.split('=', 1)[0] for o in shared)})")
        if _phase_overrides(overrides):
            print(f"(--set {', '.join(_phase_overrides(overrides))} changes this run's schedule only; the baseline "
                  f"keeps its own {sum(p.steps for p in baseline.phases)} steps)")


def check_baseline(recipe, run_dir: Path, restart: bool) -> None:
    """``train.stop_when_surpassing``: the baseline run is there, finished and comparable (``common.phases.baseline``)."""
    from common.phases.baseline import evaluation_settings, precheck
    from common.training.batch import launch_world_size, phase_splits
    from pretrain.ssast import SSASTObjective

    split = phase_splits(recipe.phases, recipe.data, recipe.optim, launch_world_size())[-1]  # the final phase's
    evaluation = evaluation_settings(recipe.train, recipe.data, split.per_rank, split.world_size)
    precheck(recipe.train.stop_when_surpassing, SSASTObjective.score_name, run_dir, recipe.data.valid, evaluation,
             recipe.train.accept_baseline_differences, restart)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from common.training.batch import phase_splits, stated_batch
        from common.cli import world_size_of
        from common.data.preflight import check_norm, data_checks, norm_mismatch, problems
        from common.config.recipe import load_yaml
        from pretrain.recipe import load_baseline, load_recipe

        recipe = load_recipe(args.recipe, args.overrides, args.coarse)
        world_size = world_size_of(args)
        phase_splits(recipe.phases, recipe.data, recipe.optim, world_size)  # refuse an impossible split now
        baseline = load_baseline(recipe, args.overrides)
        checks = [*data_checks(recipe.data), lambda: check_norm(recipe.audio.norm, "audio.norm")]
        caution = norm_mismatch(recipe.audio.norm, recipe.audio.target_frames, recipe.audio.num_mel_bins, "audio.norm")
        from common.phases.coarse import coarse_tag

        name = args.recipe.stem + (f"-{coarse_tag(recipe.coarse)}" if args.coarse else "")
        run_dir = args.run_dir or Path("runs/pretrain") / name
        check_baseline(recipe, run_dir, args.restart)  # before any compute: the baseline must be there, comparable
        start = None
        if args.dry_run:
            print_plan(recipe, world_size, baseline, args.overrides, stated_batch(load_yaml(args.recipe)),
                       args.recipe.name)
            from pretrain.clips import clip_lines

            print("\n".join(clip_lines(recipe)))
            if caution:
                print(f"warning: {caution}")
            missing = problems(checks)
            if args.init is not None and _resumes(run_dir, args.restart):
                print(f"init: --init {args.init} is not read: {run_dir} resumes from its checkpoints")
            elif args.init is not None:
                from pretrain.init import load_start, missing_line

                try:
                    print("\n".join(load_start(args.init, recipe).lines))
                except FileNotFoundError as err:
                    missing.insert(0, missing_line(args.init, err))
            if missing:
                print("files a run needs and does not find (it would stop before any compute):")
                print("\n".join(f"  {problem}" for problem in missing))
            return 0
        for check in checks:  # every file the run reads, before a model or the run directory exists
            check()
        if args.init is not None and not _resumes(run_dir, args.restart):
            from pretrain.init import load_start

            start = load_start(args.init, recipe)  # a file that is not a usable start: refused before any compute
        from common.training.spec import RunSpec
        from common.training.loop import Trainer
        from pretrain.ssast import SSASTObjective

        with training_session(run_dir, recipe, restart=args.restart,
                              accept_changed_data=args.accept_changed_data) as session:
            dist = session.dist
            planned = baseline_of(recipe, baseline, dist.world_size)
            spec = RunSpec(run_dir=run_dir, base=recipe.base, audio=recipe.audio, phases=recipe.phases,
                           transfer=recipe.transfer, optim=recipe.optim, train=recipe.train, data=recipe.data,
                           baseline=planned, run_recipe=session.run_recipe, meta={"recipe": args.recipe.name},
                           **({} if start is None else dict(init=start.weights, init_pos_embed=start.pos_mode,
                                                            init_record=start.record)))
            if start is not None:
                spec.meta["init"] = args.init
            log.info("pretraining %s into %s on %d rank(s) (%s)", args.recipe, run_dir, dist.world_size,
                     dist.device)
            for line in start.lines if start is not None else ():
                log.info("%s", line)
            if args.init is not None and start is None:
                log.info("--init %s is not read: the run resumes from its checkpoints (%s)", args.init,
                         _started_from(run_dir))
            if caution:
                log.warning("%s", caution)
            if planned is not None:
                log.info("FLOPs saving is measured against %s planned with this run's geometry and batch: %.4g",
                         planned[0], planned[1])
            objective = SSASTObjective(recipe.ssast, None if start is None else start.heads)
            done = Trainer(spec, objective, dist).run(stop_after=args.stop_after_steps)
        if dist.is_main and done:
            print(f"done: {run_dir / 'model.safetensors'} (ledger: {run_dir / 'ledger.json'})")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
