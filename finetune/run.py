"""Supervised fine-tuning (or training from scratch) on a downstream task, optionally coarse to fine.

    python finetune/run.py --init runs/pretrain/ssast_fshift4 --task vggsound
    python finetune/run.py --init SSAST-Base-Patch-400.pth --task esc50 --recipe recipes/ft_fshift4.yaml
    python finetune/run.py --init deit_base_distilled_patch16_384.pth --task audioset20k   # AST's ImageNet start
    python finetune/run.py --init none --task my_task.yaml                                 # your own data
    python finetune/run.py --init MODEL --task vggsound --coarse fshift:4                  # the paper's 5 + 15 epochs
    deepspeed --num_gpus 4 finetune/run.py --init ... --task audioset                      # several GPUs

``--init`` takes a pretraining or fine-tuning run directory, an exported model, an official SSAST / AST
``.pth``, timm ImageNet ViT / DeiT weights, an official HTS-AT checkpoint or ImageNet Swin weights (HTS-AT),
a Hugging Face AST directory (``--keep-head`` keeps its classifier when the task's classes are its labels),
or ``none``. The positional embedding and strides adapt to the task's input length. Each epoch is evaluated
on the task's evaluation split; ESC-50 runs its five folds and reports the fold-averaged accuracy; tasks with a
test split (SpeechCommands, VoxCeleb) are evaluated on it at the end with the best epoch's model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from common.cli import add_run_arguments, plan_status, run_dir_check, run_main, training_session
from common.system import jsonfile
from common.system.atomic import atomic_write_text
from common.system.prog import prog

# Imports the command alone needs are inside its functions: --help answers without loading torch.

log = logging.getLogger("finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("finetune/run.py"),
        description="Fine-tune an audio spectrogram transformer on a task, optionally coarse to fine. Re-running "
                    "on an existing run directory resumes it.",
        epilog="example: python finetune/run.py --init runs/pretrain/ssast_fshift4 --task vggsound",
    )
    parser.add_argument("--init", help="where the encoder starts: a run directory, an exported model, an SSAST / "
                                       "AST .pth, timm ImageNet ViT/DeiT weights, an official HTS-AT .ckpt or "
                                       "ImageNet Swin weights (HTS-AT), a Hugging Face AST directory, or 'none' "
                                       "(from scratch)")
    parser.add_argument("--task", help="a task name (see --list-tasks) or a task YAML file")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="recipe overriding the task's defaults, e.g. recipes/ft_fshift4.yaml (coarse to fine)")
    parser.add_argument("--data-root", default=None, help="folder the task's manifests are under (default: data)")
    parser.add_argument("--list-tasks", action="store_true", help="print the registered tasks and exit")
    parser.add_argument("--keep-head", action="store_true",
                        help="with --init a Hugging Face ASTForAudioClassification directory: start from its "
                             "classifier head (the task's classes must equal its labels; head.pool must be prefix, "
                             "auto's choice for such an init)")
    add_run_arguments(parser, "runs/finetune/<task>-<recipe name, or baseline without --recipe>, with "
                              "-<method><C> (e.g. -fshift4) after --coarse", phase_length="epochs")
    return parser


def _stated_batch(task: str, recipe_path: Path | None) -> tuple[int | None, str]:
    """The global batch the task's default recipe and the recipe file state (before ``--set``), and whose."""
    from common.config.recipe import load_yaml, merge
    from common.training.batch import stated_batch
    from finetune.task_file import task_source

    _, defaults = task_source(task)
    data = merge(defaults, load_yaml(recipe_path)) if recipe_path is not None else defaults
    return stated_batch(data), (recipe_path.name if recipe_path is not None and stated_batch(load_yaml(recipe_path))
                                else f"the {Path(task).stem} task's recipe")


PLANNED_CLASSES = 32  # a plan's head where neither the class list nor task.num_classes says (it barely moves a plan)


def _classes(recipe, planning: bool, notes: list[str]) -> tuple[list[str], dict[str, str]]:
    """The task's classes; a plan (``--dry-run``) without the class list counts them from the task (``num_classes``),
    or plans a head of :data:`PLANNED_CLASSES` and says so (a task whose classes are the user's list)."""
    from common.data.corpora.base import read_classes

    path = recipe.task.path(recipe.task.classes)
    if Path(path).is_file() or not planning:
        return read_classes(path)
    count = recipe.task.num_classes
    if count is None:
        count = PLANNED_CLASSES
        notes.append(f"classes: {path} does not exist yet and the task does not say how many it has "
                     f"(task.num_classes); planned with a head of {count} (a run reads the list)")
    return [f"class_{i}" for i in range(count)], {}


def _recipe_line(recipe_path: str | None, recipe) -> list[str]:
    """The plan's line on a ``--recipe`` (the task's line describes the task's own defaults, which it overrides)."""
    if recipe_path is None:
        return []
    about = f": {recipe.description}" if recipe.description else ""
    return [f"recipe {recipe_path}, over the task's defaults{about}"]


def _init_hint(init: str) -> str:
    """Where a missing ``--init`` comes from, when it names a pretraining run of a recipe in ``recipes/``."""
    path = Path(init)
    recipe = Path("recipes") / f"{path.name}.yaml"
    if path.parent.name == "pretrain" and recipe.is_file():
        return f" (the pretraining run `python pretrain/run.py --recipe {recipe.as_posix()}` writes it)"
    return ""


def _model_words(model) -> str:
    if model.arch == "htsat":
        return "HTS-AT"
    return f"{model.size}, patch {model.patch[0]}x{model.patch[1]}"


def _model_cautions(recipe, base, init, args) -> list[str]:
    """The recipe's model size settings an ``--init`` replaces (the encoder is the init's), where the command or
    its recipe file wrote them: each said, with where it was written, instead of dropped without a word."""
    from common.config.recipe import RecipeError, recipe_files, with_source

    if init is None or recipe.model.arch != "ast":
        return []
    def settings(cfg) -> dict:  # the model keys a recipe may write, as an encoder config has them
        return {"size": (cfg.embed_dim, cfg.depth, cfg.num_heads), "embed_dim": cfg.embed_dim, "depth": cfg.depth,
                "num_heads": cfg.num_heads, "patch": (cfg.fshape, cfg.tshape),
                "num_prefix_tokens": cfg.num_prefix_tokens}

    model, got = recipe.model, settings(base)
    try:
        wanted = settings(model.encoder_config(base.num_mel_bins, base.input_tdim))
    except ValueError:  # a model the recipe could not even build (e.g. a width its size's heads do not divide)
        wanted = {key: getattr(model, key) if key != "patch" else tuple(model.patch) for key in got}
    files = recipe_files(args.recipe) if args.recipe is not None else []
    unused = []
    for key in got:
        value = getattr(model, key)
        said = RecipeError(f"model.{key}: {list(value) if isinstance(value, tuple) else value}")
        placed = with_source(said, args.overrides, files)
        if wanted[key] != got[key] and str(placed) != str(said):  # written by the user, and not what is trained
            unused.append(str(placed))
    if not unused:
        return []
    return [f"{'; '.join(unused)}: not used, the encoder is --init's ({base.embed_dim} wide, {base.depth} blocks, "
            f"{base.num_heads} heads, {base.fshape}x{base.tshape} patches); another model starts from scratch "
            f"(--init none)"]


def _cautions(recipe, audio, world_size: int, args) -> list[str]:
    """What may be intended but is probably not: statistics computed for another clip length; mixup that cannot
    mix (a micro-batch of one clip); HTS-AT trained with a registered task's own recipe, which is the AST family's."""
    from common.data.preflight import norm_mismatch
    from common.models.arch import family
    from common.training.batch import phase_splits
    from finetune.task_file import is_task_file

    cautions = []
    keys = [item.split("=", 1)[0].strip() for item in args.overrides]
    if recipe.model.arch == "htsat" and not is_task_file(args.task) and args.recipe is None and \
            "defaults" not in keys and any(key in ("model", "model.arch") for key in keys):
        o = recipe.optim
        cautions.append(f"model.arch: htsat trains with task {recipe.task.name}'s own recipe, the AST family's "
                        f"({o.optimizer}, lr {o.lr:g}, {o.schedule} schedule, SpecAugment {recipe.augment.freqm} / "
                        f"{recipe.augment.timem}); HTS-AT's published settings: --set defaults=auto with an HTS-AT "
                        f"init, or --recipe recipes/htsat_*.yaml")
    if not family(recipe.model.arch).normalises_input:  # the task's statistics normalise the input
        caution = norm_mismatch(recipe.task.norm, audio.target_frames, audio.num_mel_bins, "task.norm")
        cautions += [caution] if caution else []
    if recipe.augment.mixup > 0:
        splits = phase_splits(recipe.phases, recipe.data, recipe.optim, world_size)
        alone = [phase.label(i) for i, (phase, split) in enumerate(zip(recipe.phases, splits)) if split.per_rank < 2]
        if alone:
            cautions.append(f"augment.mixup: {', '.join(alone)} {'has' if len(alone) == 1 else 'have'} one clip "
                            f"per micro-batch on {world_size} rank(s), and mixup takes each clip's partner from its "
                            f"own micro-batch: no clip is mixed there; give each rank 2 or more clips per "
                            f"micro-batch (fewer ranks, a larger data.max_batch_per_rank, a smaller optim.grad_accum)")
    return cautions


def _surpass_targets(recipe, run_dirs: list[Path], restart: bool, world_size: int) -> list[str | None]:
    """``train.stop_when_surpassing`` per run (ESC-50's folds compare with the baseline's same fold), checked
    before any compute (``common.phases.baseline.precheck``): each baseline must be there, finished and comparable
    on ``world_size`` ranks, unless its run resumes with the target it recorded."""
    from common.phases.baseline import evaluation_settings, precheck
    from common.training.batch import phase_splits

    target = recipe.train.stop_when_surpassing
    if not target:
        return [None] * len(run_dirs)
    targets = [str(Path(target) / d.name) if recipe.task.folds else target for d in run_dirs]
    split = phase_splits(recipe.phases, recipe.data, recipe.optim, world_size)[-1]  # the final phase's
    evaluation = evaluation_settings(recipe.train, recipe.data, split.per_rank, split.world_size)
    for path, run_dir, (_, valid) in zip(targets, run_dirs, recipe.task.fold_splits()):
        precheck(path, recipe.task.metric, run_dir, valid, evaluation,
                 recipe.train.accept_baseline_differences, restart)
    return targets


def _test(run_dir: Path, recipe, classes, dist, tracker) -> None:
    """Evaluate the best epoch's model (the weight average if there is one) on the task's test split: every rank
    scores its share of the clips (a rank does not wait for rank 0 to score them all), rank 0 writes the result
    with the clips scored and skipped as bad audio (``evaluate_export``'s ``clips`` and ``bad_clips``); more bad
    clips than ``data.max_bad_fraction`` stop the run as in validation (``tracker``: the run's, its test split)."""
    from common.training.batch import phase_splits
    from finetune.evaluate import evaluate_export

    averaged = run_dir / "export" / "weight_averaged.safetensors"
    chosen = averaged if averaged.is_file() else run_dir / "export" / "best.safetensors"  # rank 0 wrote them
    model = Path(dist.broadcast_object(str(chosen) if dist.is_main else None))  # one model, whatever a rank sees
    manifests = [str(recipe.task.path(p)) for p in recipe.task.test]
    if dist.broadcast_object(_tested(run_dir, model, manifests) if dist.is_main else None):
        log.info("test split: %s was scored on it before (test_metrics.json; delete it to score it again)",
                 model.name)
        return
    metrics = evaluate_export(model, manifests, classes,
                              recipe.data.eval_batch_size or
                              phase_splits(recipe.phases, recipe.data, recipe.optim, dist.world_size)[-1].per_rank,
                              recipe.data.num_workers, dist.device, tracker, dist=dist)
    if not dist.is_main:
        return
    atomic_write_text(run_dir / "test_metrics.json", jsonfile.dumps({"model": str(model), **metrics,
                                                                     "manifests": manifests}, indent=1))
    log.info("test split (%s): %s", model.name, ", ".join(f"{k}={int(v)}" if k in ("clips", "bad_clips")
                                                          else f"{k}={v:.4f}" for k, v in metrics.items()))


def _tested(run_dir: Path, model: Path, manifests: list[str]) -> bool:
    """Whether ``test_metrics.json`` holds the test split's scores of ``model`` as it is (written after it) on
    these ``manifests`` (where it records them): a finished run run again does not score it again, under another
    version's metrics perhaps, and says so."""
    recorded = _test_metrics(run_dir)
    try:
        return (bool(recorded) and recorded.get("model") == str(model)
                and recorded.get("manifests", manifests) == manifests
                and (run_dir / "test_metrics.json").stat().st_mtime >= model.stat().st_mtime)
    except OSError:  # gone meanwhile: scored again
        return False


def _test_metrics(run_dir: Path) -> dict:
    """``test_metrics.json`` of a run: the test split's scores, ``{}`` where there is none or it is not the JSON
    object this writes (scored again where that matters)."""
    try:
        recorded = json.loads((run_dir / "test_metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _final_model(run_dir: Path) -> str:
    """What ``model.safetensors`` of a finished run is, and where the best final-phase validation was (the number a
    report or a paper table gives; from the run's ledger), e.g. ``the last epoch's weights; best acc 0.8125 at
    epoch 3: export/best.safetensors``; and the test split's score where the run has one."""
    from common.phases.baseline import averaged_score, reference
    from common.training.ledger import Ledger

    ledger = Ledger.read(run_dir)
    final = [ev for ev in ledger.evals if ev.get("phase") == len(ledger.phases) - 1]
    averaged = averaged_score(final, ledger.score)
    text = "the weight average" if averaged is not None else "the last epoch's weights"
    best = reference(final, ledger.score)
    if best is not None:
        where = f"epoch {best.epoch}" if best.epoch is not None else f"step {best.step}"
        text += f"; best {ledger.score} {best.score:.4g} at {where}: export/best.safetensors"
    if averaged is not None:
        text += f"; weight average {ledger.score} {averaged:.4g}"
    score = _test_metrics(run_dir).get(ledger.score)
    if isinstance(score, (int, float)):
        text += f"; test {ledger.score} {score:.4g}: test_metrics.json"
    return text


def _bad_clips(run_dir: Path) -> int:
    """The clips a finished run (one fold) skipped as bad audio, every time met: its ledger's splits and its test
    split's (``test_metrics.json``)."""
    from common.training.ledger import Ledger

    tested = _test_metrics(run_dir).get("bad_clips", 0)
    return Ledger.read(run_dir).bad_clips() + (tested if isinstance(tested, int) else 0)


def _run_root(args, recipe) -> Path:
    """The run directory: ``--run-dir``, or one named after the task, the recipe and ``--coarse``."""
    from common.phases.coarse import coarse_tag

    if args.run_dir:
        return Path(args.run_dir)
    name = f"{recipe.task.name}-{args.recipe.stem if args.recipe else 'baseline'}"
    return Path("runs/finetune") / (f"{name}-{coarse_tag(recipe.coarse)}" if args.coarse else name)


def _recorded_init(run_root: Path, init: str, restart: bool):
    """What a run that resumes in ``run_root`` recorded of ``--init init`` (``common.phases.init.recorded_init``),
    when the file is gone; None for a run that starts (or restarts) or has no such record."""
    from common.phases.init import recorded_init
    from common.training.run_dir import has_trained

    if restart or not has_trained(run_root):
        return None
    weights = recorded_init(run_root, init)
    if weights is not None:
        log.warning("--init %s does not exist: %s resumes from its checkpoints with what it recorded of it (%s)",
                    init, run_root, weights.meta["recorded"])
    return weights


def _checked_init(run_root: Path, recipe, init, restart: bool):
    """``(init, digest)``: the weights read from ``--init`` and their digest (``common.phases.init.init_digest``),
    once per command; for a run that resumes in ``run_root``, checked against the weights it recorded
    (``check_init_digest``: refused where a fold not started yet would start from others). The digest is None
    where no model of this command starts from the file (no file, or the record is used)."""
    from common.phases.init import check_init_digest, init_digest
    from common.training.run_dir import NEW, has_trained, run_state

    if init is None or "recorded" in init.meta:  # from scratch, or the record of a file that has gone
        return init, None
    digest = init_digest(recipe.init)
    if restart or not has_trained(run_root):
        return init, digest
    folds = len(recipe.task.folds)
    runs = [run_root / f"fold{k + 1}" for k in range(folds)] if folds else [run_root]
    checked = check_init_digest(run_root, recipe.init, init, digest,
                                [p for p in runs if run_state(p, len(recipe.phases)) == NEW],
                                say=os.environ.get("RANK", "0") == "0")  # before the group: the launcher's rank
    return checked, (digest if checked is init else None)


def _cross_validation(run_root: Path, folds: int, metric: str) -> dict:
    from common.reports.folds import cross_validation_summary
    from common.training.ledger import Ledger

    summary = cross_validation_summary([Ledger.read(run_root / f"fold{k + 1}").evals for k in range(folds)], metric)
    atomic_write_text(run_root / "cv_summary.json", jsonfile.dumps(summary, indent=1))
    best = summary["best"]
    log.info("%d-fold cross-validation: best mean %s %.4f (phase %d, epoch %d; folds %s)", folds, metric,
             best["mean"], best["phase"] + 1, best["epoch"], ", ".join(f"{v:.4f}" for v in best["folds"]))
    if "left_out" in summary:
        log.warning("%d-fold cross-validation: epoch(s) %s not scored by every fold (a fold stopped early) are left "
                    "out of the mean; cv_summary.json lists them (left_out)", folds,
                    ", ".join(str(r["epoch"]) for r in summary["left_out"]))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.list_tasks and (args.init is None or args.task is None):
        parser.error("--init and --task are required (or --list-tasks)")
    if args.list_tasks:
        from finetune.tasks import TASKS

        def listing() -> int:
            for name, (fields, _) in TASKS.items():
                print(f"{name:<16} {fields.get('description', '')}")
            return 0

        return run_main(listing)

    def body() -> int:
        from common.cli import world_size_of
        from common.config.recipe import RecipeError
        from common.phases.init import (
            expected_init_note,
            init_pos_mode,
            load_init,
            record_init,
            resolve_pool,
            task_encoder_config,
        )
        from common.training.batch import phase_splits
        from common.training.plan import build_plan, format_plan
        from common.training.run_dir import has_trained
        from finetune.recipe import check_batch_fits, check_files, file_checks, load_recipe
        from finetune.task_file import defaults_follow_init

        notes: list[str] = []

        def recipe_with(init_weights, planning=args.dry_run, notes=notes):
            return load_recipe(args.task, args.recipe, args.overrides, init=args.init, data_root=args.data_root,
                               notes=notes, coarse=args.coarse, init_weights=init_weights, planning=planning)

        early, have_early = None, False  # a task file's defaults (or a registered task's --set defaults=) follow
        if defaults_follow_init(args.task, args.recipe, args.overrides):  # the init's family: read it first
            try:
                early, have_early = load_init(args.init), True
            except FileNotFoundError:  # a resumed run's record of it, found in the run directory's place
                early = _recorded_init(_run_root(args, recipe_with(None, planning=True, notes=[])), args.init,
                                       args.restart)
                have_early = early is not None
                if not have_early and not args.dry_run:
                    raise  # a plan goes on (planned as from scratch) and lists the missing init below
        recipe = recipe_with(early)
        world_size = world_size_of(args)
        run_root = _run_root(args, recipe)
        resumes = None if args.restart or not has_trained(run_root) else run_root
        phase_splits(recipe.phases, recipe.data, recipe.optim, world_size, resumes)  # refuse an impossible split now
        left_out = check_batch_fits(recipe, world_size)  # a step's clips against the training set's
        missing: list[str] = []
        if args.dry_run:  # a plan needs no data: say what a run would not find
            from common.data.preflight import problems

            missing = problems([*file_checks(recipe), run_dir_check(run_root)])
        else:
            check_files(recipe)  # class list, manifests, statistics: before any compute or run directory
        classes, names = _classes(recipe, planning=args.dry_run, notes=notes)
        try:
            try:
                init = early if have_early and recipe.init == args.init else load_init(recipe.init)
            except FileNotFoundError:
                init = _recorded_init(run_root, recipe.init, args.restart)
                if init is None:
                    raise
            mismatch = expected_init_note(recipe.expected_init, init, recipe.init)
        except FileNotFoundError as err:
            if not args.dry_run:
                raise
            init, mismatch = None, None  # plan before the pretraining run (or the download) exists; a run needs it
            missing.insert(0, f"--init: {err}{_init_hint(recipe.init)}")
            notes.append(f"--init {recipe.init} does not exist yet: planned with the recipe's model "
                         f"({_model_words(recipe.model)}) and the pooling of a model trained from scratch; a run "
                         f"takes both from the init")
        init, digest = (init, None) if args.dry_run else _checked_init(run_root, recipe, init,
                                                                        args.restart)
        head_init = None
        if args.keep_head and str(args.init).lower() == "none":
            raise RecipeError("--keep-head keeps the classifier of --init a Hugging Face AST directory; --init none "
                              "starts from random weights, with no classifier to keep")
        try:
            base = task_encoder_config(init, recipe.model, recipe.num_mel_bins, recipe.task.target_frames)
            audio = recipe.audio(getattr(base, "num_mel_bins", None))  # the AST family's front end
            head = replace(recipe.head, pool=resolve_pool(recipe.head.pool, init, base))
            if args.keep_head and init is not None and "recorded" not in init.meta:  # (resumed: the checkpoint's)
                from common.models.hf import kept_head

                head_init = kept_head(recipe.init, classes, names, head.pool)
        except ValueError as err:
            derived = f"--coarse {args.coarse}: the derived schedule is invalid: " if args.coarse else ""
            raise RecipeError(f"{derived}{err}") from None
        from finetune.classifier import ClassifierObjective

        objective = ClassifierObjective(classes, recipe.task.metric, recipe.task.loss, recipe.augment, head, names,
                                        head_init)
        try:
            run = build_plan(recipe, objective, world_size, base=base, audio=audio, memory=args.dry_run,
                             run_dir=run_root, checks=file_checks(recipe))
        except ValueError as err:
            derived = f"--coarse {args.coarse}: the derived schedule is invalid: " if args.coarse else ""
            raise RecipeError(f"{derived}{err}") from None
        compressed = not recipe.phases[0].as_compression().is_full_resolution  # how an --init is fitted to it
        splits = recipe.task.fold_splits()
        run_dirs = [run_root / f"fold{k + 1}" if recipe.task.folds else run_root for k in range(len(splits))]
        try:
            targets = _surpass_targets(recipe, run_dirs, args.restart, world_size)
        except FileNotFoundError as err:
            if not args.dry_run:
                raise
            missing.append(str(err))
            targets = [None] * len(run_dirs)
        cautions = ([mismatch] if mismatch else []) + _model_cautions(recipe, base, init, args) + \
            _cautions(recipe, audio, world_size, args) + run.schedule_cautions() + left_out
        if args.dry_run:
            from common.cli import resume_check

            o, about = recipe.optim, f": {recipe.task.description}" if recipe.task.description else ""
            refused, resumes = resume_check(run_root, recipe, args.restart)
            print(format_plan(run, *_stated_batch(args.task, args.recipe),
                              header=[f"task {recipe.task.name}{about}", *_recipe_line(args.recipe, recipe),
                                      f"pooling: {objective.head.pool}"],
                              notes=[f"optimiser {o.optimizer}, lr {o.lr:g}, warm-up {o.warmup_steps} steps, "
                                     f"{o.schedule} schedule", *notes, *resumes], cautions=cautions,
                              missing=missing, refused=refused))
            return plan_status(refused, missing)
        from common.data.config import ManifestSpec
        from common.training.loop import Trainer
        from common.training.spec import RunSpec

        done = True
        with training_session(run_root, recipe, restart=args.restart,
                              accept_changed_data=args.accept_changed_data) as session:
            dist = session.dist
            if dist.is_main:  # so that a resume goes on when the init's file has gone since
                record_init(run_root, recipe.init, init, digest)
            for note in notes:
                log.info("%s", note)
            for caution in cautions if dist.is_main else ():  # the same plan on every rank: said once
                log.warning("%s", caution)
            log.info("classifier pooling: %s (head.pool: %s)", head.pool, recipe.head.pool)
            used = 0  # --stop-after-steps counts the steps of the whole command, every fold's
            for k, (train, valid) in enumerate(splits):
                run_dir = run_dirs[k]
                budget = None if args.stop_after_steps is None else args.stop_after_steps - used
                if budget is not None and budget <= 0:
                    log.info("stopped after %d steps as asked; run the same command again to resume", used)
                    done = False
                    break
                data = replace(recipe.data, train=[ManifestSpec(p) for p in train], valid=valid,
                               balanced=recipe.task.balanced)
                spec = RunSpec(run_dir=run_dir, base=base, audio=audio,
                               phases=recipe.phases, transfer=recipe.transfer, optim=recipe.optim,
                               train=replace(recipe.train, stop_when_surpassing=targets[k]),
                               data=data, init=init,
                               init_pos_embed=init_pos_mode(init, recipe.transfer.pos_embed,
                                                            recipe.transfer.init_pos_embed, compressed),
                               run_recipe=session.run_recipe,
                               init_record=None if digest is None else {"source": recipe.init, **digest},
                               meta={"task": recipe.task.name, "init": recipe.init,
                                     **({"kept_head": True} if args.keep_head and init is not None else {})})
                log.info("fine-tuning on %s%s into %s (init: %s)", recipe.task.name,
                         f" fold {k + 1}/{len(splits)}" if recipe.task.folds else "", run_dir, recipe.init)
                trainer = Trainer(spec, objective, dist, run)
                done = trainer.run(stop_after=budget)
                used += trainer.steps_taken
                if not done:
                    if len(splits) > 1 and used > trainer.steps_taken:  # the trainer counted this fold's steps
                        log.info("--stop-after-steps %d: this command took %d steps over folds 1-%d (%d in fold %d)",
                                 args.stop_after_steps, used, k + 1, trainer.steps_taken, k + 1)
                    break
                if recipe.task.test:  # the run's accounting of audio and its limit, over every rank
                    _test(run_dir, recipe, classes, dist, trainer.tracker.for_split(
                        "test", [recipe.task.path(p) for p in recipe.task.test], dist=dist))
            if done and recipe.task.folds and dist.is_main:
                _cross_validation(run_root, len(splits), recipe.task.metric)
        if dist.is_main and done:
            from common.training.ledger import skipped_note

            bad = skipped_note(sum(_bad_clips(d) for d in run_dirs),
                               str(run_root / ("fold*" if recipe.task.folds else "") / "bad_audio.tsv"))
            if recipe.task.folds:
                print(f"done: {run_root} (cross-validation: cv_summary.json; each fold in fold1..fold{len(splits)}: "
                      f"model.safetensors, per-epoch metrics ledger.json){bad}")
            else:
                print(f"done: {run_root} (model: model.safetensors, {_final_model(run_root)}; per-epoch metrics: "
                      f"ledger.json){bad}")
        return 0

    return run_main(body, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
