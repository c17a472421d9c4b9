"""SSAST masked-patch pretraining, coarse to fine.

    deepspeed pretrain/run.py --recipe recipes/ssast_fshift4.yaml [--run-dir DIR] [--set key=value ...]
    deepspeed --num_gpus 8 pretrain/run.py --recipe ...          # one node, 8 GPUs
    deepspeed --hostfile hosts pretrain/run.py --recipe ...      # several nodes
    python pretrain/run.py --recipe recipes/synth_pretrain.yaml  # one process, no launcher

Running the same command on an existing run directory resumes where it stopped. The run directory
receives the resolved recipe, TensorBoard events (``tb/``), checkpoints, ``export/phaseN.safetensors``
at each phase end, the final ``model.safetensors`` (what ``finetune/run.py --init`` takes) and
``ledger.json`` (FLOPs and time per phase, saving against the recipe's baseline).
"""

from __future__ import annotations

import argparse
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
    add_run_arguments(parser, "runs/pretrain")
    return parser


def plan(recipe, world_size: int = 1, memory: dict | None = None):
    """The recipe's :class:`common.phases.PhasePlan` per phase (geometry, tokens, planned FLOPs; the memory
    estimate per rank too when ``memory`` gives its setting, ``common.memory.training_setting``)."""
    from common.phases import plan_phases
    from pretrain.ssast import SSASTObjective

    objective = SSASTObjective(recipe.ssast)
    estimate = None if memory is None else (lambda cfg, batch: objective.memory_estimate(cfg, batch, **memory).total)
    return plan_phases(recipe.phases, recipe.encoder_configs(), objective.flops_per_sample,
                       recipe.data.batch_size, recipe.optim.grad_accum, world_size, estimate)


def planned_total(recipe_path: str, world_size: int) -> float:
    from pretrain.recipe import load_recipe

    return sum(r.train_flops for r in plan(load_recipe(recipe_path), world_size))


def print_plan(recipe, world_size: int) -> None:
    from common.memory import describe_setting, training_setting
    from common.phases import format_plan

    setting = training_setting(recipe.train.precision, recipe.train.zero_stage, world_size)
    rows = plan(recipe, world_size, memory=setting)
    print(format_plan(rows))
    print(describe_setting(setting))
    total = sum(r.train_flops for r in rows)
    line = f"total planned training FLOPs: {total:.4g}"
    if recipe.baseline:
        base = planned_total(recipe.baseline, world_size)
        line += f"; baseline {Path(recipe.baseline).name}: {base:.4g} -> saving {1 - total / base:.1%}"
    print(line)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from pretrain.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            print_plan(recipe, world_size=1)
            return 0
        from common.trainer import RunSpec, Trainer
        from pretrain.ssast import SSASTObjective

        run_dir = args.run_dir or Path("runs/pretrain") / args.recipe.stem
        with training_session(run_dir, recipe, restart=args.restart) as dist:
            baseline = None
            if recipe.baseline:
                baseline = (Path(recipe.baseline).stem, planned_total(recipe.baseline, dist.world_size))
            spec = RunSpec(run_dir=run_dir, base=recipe.base, audio=recipe.audio, phases=recipe.phases,
                           transfer=recipe.transfer, optim=recipe.optim, train=recipe.train, data=recipe.data,
                           baseline=baseline, meta={"recipe": args.recipe.name})
            log.info("pretraining %s into %s on %d rank(s) (%s)", args.recipe, run_dir, dist.world_size,
                     dist.device)
            done = Trainer(spec, SSASTObjective(recipe.ssast), dist).run(stop_after=args.stop_after_steps)
        if dist.is_main and done:
            print(f"done: {run_dir / 'model.safetensors'} (ledger: {run_dir / 'ledger.json'})")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
