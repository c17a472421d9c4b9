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

from common.cli import add_run_arguments, plan_status, run_dir_check, run_main, training_session
from common.system.prog import prog

# Imports the command alone needs are inside its functions: --help answers without loading torch.

log = logging.getLogger("pretrain")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("pretrain/run.py"),
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
    add_run_arguments(parser, "runs/pretrain/<recipe name>, with -<method><C> (e.g. -fshift4) after --coarse")
    return parser




def _started_from(run_dir: Path) -> str:
    """Where a resumed run started, as its ledger says."""
    import json

    try:
        init = json.loads((run_dir / "ledger.json").read_text()).get("init")
    except (OSError, ValueError):
        return "as its ledger says"
    return f"it started from {init['source']}" if isinstance(init, dict) else "it started from scratch"


def objective(settings, heads=None):
    """The pretraining objective of a recipe, from its section (``recipe.ssast``: SSAST's masked-patch objective,
    ``pretrain/ssast.py``), with ``heads`` (pretext heads of ``--init``) to start from. The one place that names
    it: the plan, FLOPs, memory estimate, baseline check and the training loop ask it through the ``Objective``
    protocol (``common/training/objective.py``)."""
    from pretrain.ssast import SSASTObjective

    return SSASTObjective(settings, heads)


@functools.lru_cache(maxsize=64)
def _flops_per_sample(settings, cfg) -> int:
    """Training FLOPs per sample (cached: a plan and its baseline share the full-resolution geometry)."""
    return objective(settings).flops_per_sample(cfg)


class _Planned:
    """What the plan asks of the objective (FLOPs cached across a plan and its baseline)."""

    def __init__(self, ssast) -> None:
        self.ssast, self.objective = ssast, objective(ssast)

    def flops_per_sample(self, cfg) -> int:
        return _flops_per_sample(self.ssast, cfg)

    def memory_estimate(self, cfg, batch: int, **setting):
        return self.objective.memory_estimate(cfg, batch, **setting)


def plan(recipe, world_size: int = 1, baseline=None, memory: bool = False, run_dir: Path | None = None,
         checks=()):
    """The :class:`common.training.plan.RunPlan` of a pretraining recipe on ``world_size`` ranks; ``baseline``:
    its ``baseline:`` recipe loaded with this run's geometry and batch (``pretrain.recipe.load_baseline``)."""
    from common.training.plan import build_plan, recipe_baseline

    planned = None if baseline is None else recipe_baseline(recipe.baseline, plan(baseline, world_size))
    return build_plan(recipe, _Planned(recipe.ssast), world_size, baseline=planned, memory=memory,
                      run_dir=run_dir, checks=checks)


def planned_total(recipe, world_size: int) -> float:
    """Planned training FLOPs of a whole recipe (all phases)."""
    return plan(recipe, world_size).cost()


def _baseline_notes(recipe, baseline, overrides: list[str]) -> list[str]:
    """Which ``--set`` overrides the ``baseline:`` recipe shares, and which stay with this run."""
    from pretrain.recipe import shared_with_baseline

    if baseline is None:
        return []
    notes = []
    shared = shared_with_baseline(overrides)
    if shared:
        notes.append(f"(the baseline is planned with the same {', '.join(o.split('=', 1)[0] for o in shared)})")
    phased = [o.split("=", 1)[0].strip() for o in overrides if o.split("=", 1)[0].strip().startswith("phases")]
    if phased:
        notes.append(f"(--set {', '.join(phased)} changes this run's schedule only; the baseline keeps its own "
                     f"{sum(p.steps for p in baseline.phases)} steps)")
    return notes


def check_baseline(recipe, run_dir: Path, restart: bool, world_size: int) -> None:
    """``train.stop_when_surpassing``: the baseline run is there, finished and comparable
    (``common.phases.baseline``), on ``world_size`` ranks (the launcher's, or a --dry-run's --world-size)."""
    from common.phases.baseline import evaluation_settings, precheck
    from common.training.batch import phase_splits

    split = phase_splits(recipe.phases, recipe.data, recipe.optim, world_size)[-1]  # the final phase's
    scored = objective(recipe.ssast)
    evaluation = evaluation_settings(recipe.train, recipe.data, split.per_rank, split.world_size,
                                     scored.score_settings(recipe.encoder_configs()[-1]))
    precheck(recipe.train.stop_when_surpassing, scored.score_name, run_dir, recipe.data.valid, evaluation,
             recipe.train.accept_baseline_differences, restart)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from common.cli import world_size_of
        from common.config.recipe import RecipeError, load_yaml
        from common.data.preflight import check_norm, data_checks, norm_mismatch, problems
        from common.phases.coarse import coarse_tag
        from common.system.paths import is_plain_name
        from common.training.batch import phase_splits, stated_batch
        from common.training.plan import format_plan
        from common.training.run_dir import has_trained
        from pretrain.recipe import load_baseline, load_recipe

        recipe = load_recipe(args.recipe, args.overrides, args.coarse)
        world_size = world_size_of(args)
        name = args.recipe.stem + (f"-{coarse_tag(recipe.coarse)}" if args.coarse else "")
        if args.run_dir is None and not is_plain_name(name):  # a recipe file named ..yaml or ...yaml
            raise RecipeError(f"--recipe {args.recipe}: the run directory runs/pretrain/{name} would not be a folder "
                              f"of its own in runs/pretrain; rename the file or give --run-dir")
        run_dir = args.run_dir or Path("runs/pretrain") / name
        resumes = None if args.restart or not has_trained(run_dir) else run_dir  # its global batch is the run's
        phase_splits(recipe.phases, recipe.data, recipe.optim, world_size, resumes)  # refuse an impossible split now
        baseline = load_baseline(recipe, args.overrides)
        checks = [*data_checks(recipe.data), lambda: check_norm(recipe.audio.norm, "audio.norm")]
        if args.dry_run:  # a run checks (and makes) its run directory itself, before any compute
            checks.append(run_dir_check(run_dir))
        caution = norm_mismatch(recipe.audio.norm, recipe.audio.target_frames, recipe.audio.num_mel_bins, "audio.norm")
        # before any compute: the baseline must be there, comparable
        check_baseline(recipe, run_dir, args.restart, world_size)
        start, init_lines, missing_init = None, [], []
        from common.training.run_dir import CHECKPOINTS, FINISHED, LOST, lost_run_message, run_state

        held = None if args.restart else run_state(run_dir, len(recipe.phases))
        # why --init is not read: the run resumes, or is finished (a new run, --restart, a lost run: it is read)
        unread = None if args.init is None else {CHECKPOINTS: "resumes from its checkpoints",
                                                 FINISHED: "is finished (nothing left to train)"}.get(held)
        if held == LOST and not args.dry_run:  # refused before --init or any data is read
            from common.training.checkpoint_files import NoUsableCheckpoint

            raise NoUsableCheckpoint(lost_run_message(run_dir))
        if unread is not None:
            if args.dry_run:
                init_lines = [f"init: --init {args.init} is not read: {run_dir} {unread}"]
        elif args.init is not None:
            from pretrain.init import load_start, missing_line

            try:  # a file that is not a usable start: refused before any compute
                start = load_start(args.init, recipe)
                init_lines = list(start.lines)
            except FileNotFoundError as err:
                if not args.dry_run:
                    raise
                missing_init = [missing_line(args.init, err)]
        if not args.dry_run:
            for check in checks:  # every file the run reads, before a model or the run directory exists
                check()
        run = plan(recipe, world_size, baseline, memory=args.dry_run, run_dir=run_dir, checks=checks)
        unvalidated = None if recipe.data.valid else recipe.optim.unvalidated_caution()
        cautions = [*([caution] if caution else []), *run.schedule_cautions(),
                    *run.warmup_cautions(recipe.optim.warmup_steps),
                    *([unvalidated] if unvalidated else [])]
        if args.dry_run:
            from common.cli import resume_check
            from pretrain.clips import clip_lines

            refused, resumes = resume_check(run_dir, recipe, args.restart)
            missing = [*missing_init, *problems(run.checks)]
            print(format_plan(run, stated_batch(load_yaml(args.recipe)), args.recipe.name,
                              notes=[*_baseline_notes(recipe, baseline, args.overrides), *clip_lines(recipe),
                                     *init_lines, *resumes],
                              cautions=cautions, missing=missing, refused=refused))
            return plan_status(refused, missing)
        from common.training.loop import Trainer
        from common.training.spec import RunSpec

        with training_session(run.run_dir, recipe, restart=args.restart,
                              accept_changed_data=args.accept_changed_data) as session:
            dist = session.dist
            spec = RunSpec(run_dir=run.run_dir, base=recipe.base, audio=recipe.audio, phases=recipe.phases,
                           transfer=recipe.transfer, optim=recipe.optim, train=recipe.train, data=recipe.data,
                           run_recipe=session.run_recipe, meta={"recipe": args.recipe.name},
                           **({} if start is None else dict(init=start.weights, init_pos_embed=start.pos_mode,
                                                            init_record=start.record)))
            if start is not None:
                spec.meta["init"] = args.init
            log.info("pretraining %s into %s on %d rank(s) (%s)", args.recipe, run.run_dir, dist.world_size,
                     dist.device)
            for line in start.lines if start is not None else ():
                log.info("%s", line)
            if unread is not None:
                log.info("--init %s is not read: the run %s (%s)", args.init, unread, _started_from(run_dir))
            for warning in cautions if dist.is_main else ():  # the same plan on every rank: said once
                log.warning("%s", warning)
            if run.baseline is not None:
                log.info("FLOPs saving is measured against %s planned with this run's geometry and batch: %.4g",
                         run.baseline.name, run.baseline.ledger_fields()["train_flops"])
            built = objective(recipe.ssast, None if start is None else start.heads)
            done = Trainer(spec, built, dist, run).run(stop_after=args.stop_after_steps)
        if dist.is_main and done:
            from common.training.ledger import Ledger, skipped_note

            bad = skipped_note(Ledger.read(run.run_dir).bad_clips(), str(run.run_dir / "bad_audio.tsv"))
            print(f"done: {run.run_dir / 'model.safetensors'} (ledger: {run.run_dir / 'ledger.json'}){bad}")
        return 0

    return run_main(body, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
