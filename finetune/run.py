"""Supervised fine-tuning (or training from scratch) on a downstream task, optionally coarse to fine.

    python finetune/run.py --init runs/pretrain/ssast_fshift4 --task vggsound
    python finetune/run.py --init SSAST-Base-Patch-400.pth --task esc50 --recipe recipes/ft_fshift4.yaml
    python finetune/run.py --init deit_base_distilled_patch16_384.pth --task audioset20k   # AST's ImageNet start
    python finetune/run.py --init none --task my_task.yaml                                 # your own data
    deepspeed --num_gpus 4 finetune/run.py --init ... --task audioset                      # several GPUs

``--init`` takes a pretraining or fine-tuning run directory, an exported model, an official SSAST / AST
``.pth``, timm ImageNet ViT / DeiT weights, or ``none``. The positional embedding and strides adapt to
the task's input length. Each epoch is evaluated on the task's evaluation split; ESC-50 runs its five
folds and reports the fold-averaged accuracy; tasks with a test split (SpeechCommands, VoxCeleb) are
evaluated on it at the end with the best epoch's model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from common.cli import add_run_arguments, run_main, training_session

log = logging.getLogger("finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune/run.py",
        description="Fine-tune an audio spectrogram transformer on a task, optionally coarse to fine. Re-running "
                    "on an existing run directory resumes it.",
        epilog="example: python finetune/run.py --init runs/pretrain/ssast_fshift4 --task vggsound",
    )
    parser.add_argument("--init", help="where the encoder starts: a run directory, an exported model, an SSAST / "
                                       "AST .pth, timm ImageNet ViT/DeiT weights, or 'none' (from scratch)")
    parser.add_argument("--task", help="a task name (see --list-tasks) or a task YAML file")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="recipe overriding the task's defaults, e.g. recipes/ft_fshift4.yaml (coarse to fine)")
    parser.add_argument("--data-root", default=None, help="folder the task's manifests are under (default: data)")
    parser.add_argument("--list-tasks", action="store_true", help="print the registered tasks and exit")
    add_run_arguments(parser, "runs/finetune")
    return parser


def print_plan(recipe, configs, objective) -> None:
    from common.memory import describe_setting, training_setting
    from common.phases import format_plan, plan_phases

    setting = training_setting(recipe.train.precision, recipe.train.zero_stage)
    print(f"task {recipe.task.name}: {recipe.task.description or ''}")
    print(format_plan(plan_phases(recipe.phases, configs, objective.flops_per_sample, recipe.data.batch_size,
                                  recipe.optim.grad_accum,
                                  memory=lambda cfg, batch: objective.memory_estimate(cfg, batch, **setting).total)))
    print(describe_setting(setting))


def _test(run_dir: Path, recipe, classes, dist) -> None:
    """Evaluate the best epoch's model (the weight average if there is one) on the task's test split."""
    from finetune.evaluate import evaluate_export

    averaged = run_dir / "export" / "weight_averaged.safetensors"
    model = averaged if averaged.is_file() else run_dir / "export" / "best.safetensors"
    metrics = evaluate_export(model, [recipe.task.path(p) for p in recipe.task.test], classes,
                              recipe.data.eval_batch_size or recipe.data.batch_size, recipe.data.num_workers,
                              dist.device)
    (run_dir / "test_metrics.json").write_text(json.dumps({"model": str(model), **metrics}, indent=1))
    log.info("test split (%s): %s", model.name, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def _cross_validation(run_root: Path, folds: int, metric: str) -> dict:
    from common.ledger import Ledger
    from finetune.evaluate import cross_validation_summary

    summary = cross_validation_summary([Ledger.read(run_root / f"fold{k + 1}").evals for k in range(folds)], metric)
    (run_root / "cv_summary.json").write_text(json.dumps(summary, indent=1))
    best = summary["best"]
    log.info("%d-fold cross-validation: best mean %s %.4f (phase %d, epoch %d; folds %s)", folds, metric,
             best["mean"], best["phase"] + 1, best["epoch"], ", ".join(f"{v:.4f}" for v in best["folds"]))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.list_tasks and (args.init is None or args.task is None):
        parser.error("--init and --task are required (or --list-tasks)")
    if args.list_tasks:
        from finetune.tasks import TASKS

        for name, (fields, _) in TASKS.items():
            print(f"{name:<16} {fields.get('description', '')}")
        return 0

    def body() -> int:
        from common.corpora.base import read_classes
        from common.phases import phase_encoder_configs
        from finetune.init import init_pos_mode, load_init, task_encoder_config
        from finetune.recipe import load_recipe

        recipe = load_recipe(args.task, args.recipe, args.overrides, init=args.init, data_root=args.data_root)
        classes, names = read_classes(recipe.task.path(recipe.task.classes))
        init = load_init(recipe.init)
        base = task_encoder_config(init, recipe.model, recipe.num_mel_bins, recipe.task.target_frames)
        try:
            configs = phase_encoder_configs(base, recipe.phases)
        except ValueError as err:
            from common.recipe import RecipeError
            raise RecipeError(str(err)) from None
        from finetune.classifier import ClassifierObjective

        objective = ClassifierObjective(classes, recipe.task.metric, recipe.task.loss, recipe.augment, recipe.head,
                                        names)
        if args.dry_run:
            print_plan(recipe, configs, objective)
            return 0
        from common.data import ManifestSpec
        from common.trainer import RunSpec, Trainer

        name = f"{recipe.task.name}-{args.recipe.stem if args.recipe else 'baseline'}"
        run_root = args.run_dir or Path("runs/finetune") / name
        done = True
        with training_session(run_root, recipe, restart=args.restart) as dist:
            splits = recipe.task.fold_splits()
            for k, (train, valid) in enumerate(splits):
                run_dir = run_root / f"fold{k + 1}" if recipe.task.folds else run_root
                data = replace(recipe.data, train=[ManifestSpec(p) for p in train], valid=valid,
                               balanced=recipe.task.balanced)
                spec = RunSpec(run_dir=run_dir, base=base, audio=recipe.audio(base.num_mel_bins),
                               phases=recipe.phases, transfer=recipe.transfer, optim=recipe.optim, train=recipe.train,
                               data=data, init=init,
                               init_pos_embed=init_pos_mode(init, recipe.transfer.pos_embed),
                               meta={"task": recipe.task.name, "init": recipe.init})
                log.info("fine-tuning on %s%s into %s (init: %s)", recipe.task.name,
                         f" fold {k + 1}/{len(splits)}" if recipe.task.folds else "", run_dir, recipe.init)
                done = Trainer(spec, objective, dist).run(stop_after=args.stop_after_steps)
                if not done:
                    break
                if recipe.task.test and dist.is_main:
                    _test(run_dir, recipe, classes, dist)
            if done and recipe.task.folds and dist.is_main:
                _cross_validation(run_root, len(splits), recipe.task.metric)
        if dist.is_main and done:
            print(f"done: {run_root} (model: model.safetensors, per-epoch metrics: ledger.json)")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
