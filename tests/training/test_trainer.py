"""The training loop's own rules: step groups, batch-size changes, checkpoint-before-validation, recovery
from damaged checkpoints, per-rank randomness and the per-phase "best"."""

import json
import logging
from pathlib import Path

import pytest
import torch

from common.data.clips import Batch
from common.training.loop import step_groups
from pretrain.run import main
from tests.helpers import RECIPE, _micro_step_trainer, run, tiny, weights


def batch(epoch: int, index: int, size: int = 2) -> Batch:
    return Batch(torch.zeros(size, 4), torch.full((size,), 4), None, [f"c{epoch}-{index}-{i}" for i in range(size)],
                 epoch=epoch, index=index)


def test_step_groups_drop_a_partial_accumulation_group_at_an_epoch_end():
    stream = [batch(0, 0), batch(0, 1), batch(0, 2), batch(1, 0), batch(1, 1, size=0), batch(1, 2), batch(1, 3)]
    groups = list(step_groups(iter(stream), accum=2, epoch_based=True))
    kinds = [("end", g.epoch_end) if g.epoch_end is not None else [b.index for b in g.batches] for g in groups]
    # epoch 0: batches 0+1 make a step, batch 2 is left alone at the epoch end and dropped;
    # epoch 1: the empty batch 1 (no usable clip) keeps its place, so 0+1 and 2+3 make the steps, as on any rank
    assert kinds == [[0, 1], ("end", 0), [0, 1], [2, 3], ("end", 1)]
    assert [g.position for g in groups] == [(0, 2), (1, 0), (1, 2), (1, 4), (2, 0)]


def test_step_groups_announce_the_end_of_an_epoch_resumed_at_its_end():
    """A run stopped after the last step of epoch 0 resumes at (0, all batches): the stream has no batch of
    epoch 0 left, and its end must still be announced (validation, the epoch count)."""
    stream = [batch(1, 0), batch(1, 1)]
    groups = list(step_groups(iter(stream), accum=1, epoch_based=True, start_epoch=0))
    assert [g.epoch_end for g in groups] == [0, None, None, 1]
    assert [g.position for g in groups] == [(1, 0), (1, 1), (1, 2), (2, 0)]
    assert [g.epoch_end for g in step_groups(iter([]), accum=1, epoch_based=True, start_epoch=3)] == [3]


def test_step_groups_of_an_iteration_based_stream_ignore_epochs():
    stream = [batch(0, 0), batch(0, 1), batch(1, 0), batch(1, 1)]
    groups = list(step_groups(iter(stream), accum=3, epoch_based=False))
    assert [[(b.epoch, b.index) for b in g.batches] for g in groups] == [[(0, 0), (0, 1), (1, 0)]]
    assert groups[0].position == (1, 1)


@pytest.mark.slow
def test_a_batch_size_change_between_phases_trains_and_resumes_exactly(tmp_path, synth_corpus):
    sizes = ("phases.0.batch_size=4", "phases.1.batch_size=2", "train.save_every=100")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(straight, synth_corpus, *sizes) == 0
    ledger = json.loads((straight / "ledger.json").read_text())
    assert [p["samples"] for p in ledger["phases"]] == [3 * 4, 3 * 2]
    assert run(resumed, synth_corpus, *sizes, stop=4) == 0
    assert run(resumed, synth_corpus, *sizes) == 0
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_checkpoint_is_taken_before_validation_so_a_failing_validation_loses_no_training(
        tmp_path, synth_corpus, monkeypatch):
    from pretrain.ssast import SSASTObjective

    straight = tmp_path / "straight"
    assert run(straight, synth_corpus) == 0
    real = SSASTObjective.evaluate
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # step 2 of phase 1 validates first; the second is phase 1's end (step 3)
            raise RuntimeError("validation broke")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SSASTObjective, "evaluate", failing)
    run_dir = tmp_path / "failing"
    with pytest.raises(RuntimeError, match="validation broke"):
        main(["--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(synth_corpus)])
    state = json.loads((run_dir / "checkpoints" / "phase01-step000000003" / "trainer_state.json").read_text())
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "phase01-step000000003"
    assert state["state"]["phase_done"] and state["state"]["pending_eval"]  # the phase end, saved first
    monkeypatch.setattr(SSASTObjective, "evaluate", real)
    assert run(run_dir, synth_corpus) == 0
    a, b = weights(straight), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (json.loads((d / "ledger.json").read_text()) for d in (straight, run_dir))
    assert [e["metrics"] for e in la["evals"]] == [e["metrics"] for e in lb["evals"]]


@pytest.mark.slow
def test_a_resume_after_a_closed_phase_end_does_not_validate_it_again(tmp_path, synth_corpus, monkeypatch):
    from pretrain.ssast import SSASTObjective

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, synth_corpus) == 0
    assert run(stopped, synth_corpus, stop=3) == 0  # phase 1's three steps, its validation and export
    state = json.loads((stopped / "checkpoints" / "phase01-step000000003" / "trainer_state.json").read_text())
    assert state["state"]["phase_closed"] and not state["state"]["pending_eval"]
    assert len(state["ledger"]["evals"]) == 2 and state["ledger"]["phases"][0]["ended_by"] == "length"
    real, calls = SSASTObjective.evaluate, []

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SSASTObjective, "evaluate", counted)
    assert run(stopped, synth_corpus) == 0
    la, lb = (json.loads((d / "ledger.json").read_text()) for d in (straight, stopped))
    assert len(calls) == len(la["evals"]) - 2  # phase 2's validations only
    assert [e["metrics"] for e in la["evals"]] == [e["metrics"] for e in lb["evals"]]
    a, b = weights(straight), weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_run_resumed_inside_a_log_window_logs_the_same_losses(tmp_path, synth_corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def logged(run_dir: Path) -> dict:
        scalars = {}
        for events_file in sorted((run_dir / "tb").glob("events.*")):  # one file per invocation
            events = EventAccumulator(str(events_file))
            events.Reload()
            for tag in ("train/loss", "train/nce", "train/mse", "train/lr"):
                scalars.update({(tag, e.step): e.value for e in events.Scalars(tag)})
        return scalars

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    sets = ("train.log_every=2", "train.save_every=100", "optim.lr=0.001", "optim.warmup_steps=4")
    assert run(straight, synth_corpus, *sets, steps=(5, 3)) == 0
    assert run(stopped, synth_corpus, *sets, steps=(5, 3), stop=3) == 0  # checkpointed half way through a window
    state = json.loads((stopped / "checkpoints" / "phase01-step000000003" / "trainer_state.json").read_text())
    assert state["state"]["window"]["_n"] == 1  # step 3's micro-batch, saved with the checkpoint
    assert run(stopped, synth_corpus, *sets, steps=(5, 3)) == 0
    a, b = logged(straight), logged(stopped)
    assert ("train/loss", 4) in a and a == b  # the window of steps 3 and 4, resumed between them: bitwise
    # each phase's last, partial window is logged at the phase's end (phase 1's step 5; phase 2's step 3, total 8)
    assert sorted(step for tag, step in a if tag == "train/loss") == [2, 4, 5, 7, 8]
    # the learning rate of each window's last step (not the next step's): the warm-up, again in phase 2
    lrs = [a["train/lr", step] for step in (2, 4, 5, 7, 8)]
    assert lrs == pytest.approx([0.5e-3, 1e-3, 1e-3, 0.5e-3, 0.75e-3])
    log = (straight / "train.log").read_text()
    assert "step 5 (phase1 (fshift x4)): acc=" in log and "step 3 (phase2 (full resolution)): acc=" in log


def _stopped_run(tmp_path: Path, corpus: Path) -> Path:
    run_dir = tmp_path / "run"
    assert run(run_dir, corpus, "train.save_every=1", "train.keep_checkpoints=3", stop=4) == 0
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "phase02-step000000001"
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate_model", "truncate_rng", "truncate_state", "delete_latest"])
def test_a_damaged_newest_checkpoint_falls_back_to_an_intact_one(tmp_path, synth_corpus, damage, caplog):
    straight = tmp_path / "straight"
    assert run(straight, synth_corpus, "train.save_every=1", "train.keep_checkpoints=3") == 0
    run_dir = _stopped_run(tmp_path, synth_corpus)
    newest = run_dir / "checkpoints" / "phase02-step000000001"
    target = {"truncate_model": newest / "mp_rank_00_model_states.pt", "truncate_rng": newest / "rng_rank0.pt",
              "truncate_state": newest / "trainer_state.json"}.get(damage)
    if target is not None:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        (run_dir / "checkpoints" / "LATEST").unlink()
    with caplog.at_level(logging.WARNING):
        assert run(run_dir, synth_corpus, "train.save_every=1", "train.keep_checkpoints=3") == 0
    if target is not None:  # skipped with a warning naming the checkpoint and the file
        assert any("phase02-step000000001" in r.message and target.name in r.message for r in caplog.records)
    else:
        assert any("LATEST is missing" in r.message for r in caplog.records)
    a, b = weights(straight), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_no_intact_checkpoint_refuses_to_start_over_unless_asked(tmp_path, synth_corpus, capsys):
    run_dir = _stopped_run(tmp_path, synth_corpus)
    for folder in (run_dir / "checkpoints").glob("phase*"):
        (folder / "trainer_state.json").write_text("{")
    assert run(run_dir, synth_corpus, "train.save_every=1", "train.keep_checkpoints=3") == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "--restart" in err and "phase01-step000000003" in err
    args = ["--recipe", str(RECIPE), "--run-dir", str(run_dir), "--restart",
            *tiny(synth_corpus, "train.save_every=1", "train.keep_checkpoints=3")]
    assert main(args) == 0
    discarded = list(run_dir.glob("discarded-*"))
    assert len(discarded) == 1 and (discarded[0] / "checkpoints").is_dir()  # nothing deleted
    assert json.loads((run_dir / "ledger.json").read_text())["total"]["steps"] == 6


@pytest.mark.slow
def test_stop_after_steps_counts_every_phase_of_the_call(tmp_path, synth_corpus, caplog):
    with caplog.at_level(logging.INFO):
        assert run(tmp_path / "r", synth_corpus, "train.save_every=100", stop=5) == 0
    assert any("stopped after 5 steps" in r.message for r in caplog.records)


def test_every_rank_draws_its_own_randomness_once_the_model_is_built(tmp_path):
    from types import SimpleNamespace

    from common.system.distributed import Dist
    from common.training.loop import Trainer
    from common.training.spec import TrainConfig

    draws = {}
    for rank in (0, 1, 0):
        trainer = Trainer.__new__(Trainer)  # only what the seeding reads
        trainer.spec = SimpleNamespace(train=TrainConfig(seed=3))
        trainer.dist = Dist(rank, 2, rank, torch.device("cpu"))
        torch.manual_seed(0)  # the model is built identically on every rank ...
        trainer._seed_rank(0)  # ... then each rank gets its own stream
        draws.setdefault(rank, []).append(torch.rand(4))
    assert not torch.equal(draws[0][0], draws[1][0])
    assert torch.equal(draws[0][0], draws[0][1])  # reproducible per rank


def test_every_rank_has_a_trainer_generator_of_its_own(tmp_path):
    """The generator the objective's steps draw from (SSAST's mask seeds, fine-tuning's mixup, SpecAugment and
    noise) is seeded by the run's seed and the rank: with one seed for all, every rank drew the same masks and
    augmentations at each step, N ranks no more diverse than one."""
    from common.audio.pipeline import AudioConfig
    from common.data.config import DataConfig
    from common.models.ast.encoder import EncoderConfig
    from common.phases.config import PhaseConfig, TransferConfig
    from common.system.distributed import Dist
    from common.training.loop import Trainer
    from common.training.optim import OptimConfig
    from common.training.spec import RunSpec, TrainConfig
    from finetune.classifier import AugmentConfig, ClassifierObjective

    base = EncoderConfig(embed_dim=32, depth=1, num_heads=2, num_mel_bins=32, input_tdim=64, fshape=8, tshape=8,
                         fstride=8, tstride=8)
    spec = RunSpec(run_dir=tmp_path, base=base, audio=AudioConfig(num_mel_bins=32, target_frames=64),
                   phases=[PhaseConfig(epochs=1)], transfer=TransferConfig(), optim=OptimConfig(warmup_steps=0),
                   train=TrainConfig(seed=3), data=DataConfig(batch_size=4))
    objective = ClassifierObjective(["a", "b"], "acc", "ce", AugmentConfig())
    seeds, draws = {}, {}
    for rank in (0, 1, 0):
        trainer = Trainer(spec, objective, Dist(rank, 2, rank, torch.device("cpu")))
        trainer.scalars.close()
        seeds.setdefault(rank, []).append(trainer.record.generator.initial_seed())
        draws.setdefault(rank, []).append(torch.rand(4, generator=trainer.record.generator))
    assert seeds[0][0] != seeds[1][0] and not torch.equal(draws[0][0], draws[1][0])
    assert seeds[0] == [seeds[0][0]] * 2 and torch.equal(draws[0][0], draws[0][1])  # reproducible per rank


def test_a_phase_with_an_lr_of_its_own_trains_at_it(tmp_path):
    """``phases.N.lr`` is that phase's peak learning rate; a phase without one takes ``optim.lr``: the engine each
    phase builds schedules from it and starts its optimiser there (no warm-up)."""
    from common.audio.pipeline import AudioConfig
    from common.data.config import DataConfig
    from common.models.ast.encoder import EncoderConfig
    from common.phases.config import PhaseConfig, TransferConfig
    from common.system.distributed import init_distributed
    from common.training.loop import Trainer
    from common.training.optim import OptimConfig
    from common.training.spec import RunSpec, TrainConfig
    from finetune.classifier import AugmentConfig, ClassifierObjective

    base = EncoderConfig(embed_dim=32, depth=1, num_heads=2, num_mel_bins=32, input_tdim=64, fshape=8, tshape=8,
                         fstride=8, tstride=8)
    spec = RunSpec(run_dir=tmp_path, base=base, audio=AudioConfig(num_mel_bins=32, target_frames=64),
                   phases=[PhaseConfig(compression="fshift", factor=2, epochs=1, lr=1e-3), PhaseConfig(epochs=1)],
                   transfer=TransferConfig(), optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"),
                   train=TrainConfig(), data=DataConfig(batch_size=4))
    objective = ClassifierObjective(["a", "b"], "acc", "ce", AugmentConfig())
    trainer = Trainer(spec, objective, init_distributed())
    trainer.scalars.close()
    peaks = []
    for index in (0, 1):
        engine = trainer._engine(objective.build_model(trainer.cfgs[index]), index)
        peaks.append((engine.lr_scheduler.base_lr, engine.optimizer.param_groups[0]["lr"]))
    assert peaks == [(1e-3, pytest.approx(1e-3)), (1e-4, pytest.approx(1e-4))]


@pytest.mark.slow
def test_best_is_the_best_epoch_of_the_final_phase(tmp_path, synth_corpus, monkeypatch, capsys):
    from common.models.exports import read_weights
    from finetune.classifier import ClassifierObjective
    from finetune.run import main as finetune
    from tests.helpers import TINY, _synth_root, sets

    scores = iter([0.9, 0.4, 0.6, 0.5])  # the coarse phase's epoch scores best, but it is not the final phase
    real = ClassifierObjective.evaluate

    def scripted(self, *args, **kwargs):
        return {**real(self, *args, **kwargs), "acc": next(scores)}

    monkeypatch.setattr(ClassifierObjective, "evaluate", scripted)
    run_dir = tmp_path / "ft"
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(_synth_root(tmp_path, synth_corpus)),
                     "--run-dir", str(run_dir),
                     *sets(*TINY, "phases=[{compression: fshift, factor: 4, epochs: 1}, {compression: none, epochs: 3}]")
                     ]) == 0
    _, meta = read_weights(run_dir / "export" / "best.safetensors")
    assert (meta["eval"]["phase"], meta["eval"]["epoch"], meta["eval"]["metrics"]["acc"]) == (1, 2, 0.6)
    test = json.loads((run_dir / "test_metrics.json").read_text())
    assert test["model"].endswith("best.safetensors")
    # the last line names the final phase's best (epoch 2 of phase 2, not the coarse phase's 0.9) and the test score
    assert f"the last epoch's weights; best acc 0.6 at epoch 2: export/best.safetensors; test acc " \
           f"{test['acc']:.4g}: test_metrics.json; per-epoch metrics: ledger.json)" in capsys.readouterr().out


def test_cross_validation_picks_its_epoch_in_the_final_phase():
    from common.reports.folds import cross_validation_summary

    def evals(coarse, fine):
        return [{"phase": 0, "epoch": e + 1, "metrics": {"acc": v}} for e, v in enumerate(coarse)] + \
            [{"phase": 1, "epoch": e + 1, "metrics": {"acc": v}} for e, v in enumerate(fine)]

    summary = cross_validation_summary([evals([0.9], [0.5, 0.7]), evals([0.8], [0.6, 0.6])], "acc")
    assert (summary["best"]["phase"], summary["best"]["epoch"]) == (1, 2)
    assert [r["phase"] for r in summary["per_epoch"]] == [1, 1]


@pytest.mark.parametrize("kind", ["ast", "ssast", "htsat"])
def test_a_micro_batch_without_a_usable_clip_steps_with_a_zero_gradient(tmp_path, kind):
    """All of a micro-batch's clips were bad audio: it still takes its micro-step (so every rank enters the same
    all-reduces), reaching every parameter with a zero gradient; the other micro-batches' gradients are left
    exactly as they are, BatchNorm statistics (HTS-AT's bn0) do not move, and nothing is logged for it."""
    from tests.helpers import real_looking_signals

    trainer, engine, pipeline = _micro_step_trainer(tmp_path, kind, accum=4)
    samples = trainer.arch.clip_samples
    targets = None if kind == "ssast" else torch.eye(3)[[0, 2]]
    good = Batch(real_looking_signals(2, samples / 16000), torch.full((2,), samples), targets, ["g0", "g1"])
    empty = Batch(torch.zeros(0, samples), torch.zeros(0, dtype=torch.long),
                  None if kind == "ssast" else torch.zeros(0, 3), [], bad=[("gone.wav", "missing (no such file)")])
    params = [p for p in engine.module.parameters() if p.requires_grad]
    buffers = {k: v.clone() for k, v in engine.module.named_buffers()}

    logs = trainer._micro_step(engine, empty, pipeline, 0)  # the first of 4 micro-batches: no optimiser step
    assert float(logs["loss"]) == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in params)  # every parameter, all zero
    assert all(torch.equal(v, buffers[k]) for k, v in engine.module.named_buffers())
    trainer._micro_step(engine, good, pipeline, 0)
    grads = [p.grad.clone() for p in params]
    assert any(g.any() for g in grads)
    trainer._micro_step(engine, empty, pipeline, 0)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # nothing added
    assert engine.global_steps == 0
    trainer._micro_step(engine, empty, pipeline, 0)  # the 4th: the optimiser step, on the good clips' gradient
    assert engine.global_steps == 1
    trainer.scalars.close()


def test_deterministic_training_of_htsat_on_cuda_warns_at_its_bicubic_resize_instead_of_stopping():
    """PyTorch has no deterministic CUDA backward for bicubic interpolation, which HTS-AT's front end runs behind its
    learnable bn0: with train.deterministic every HTS-AT run on a GPU stopped at its first backward pass. There the
    loop asks for deterministic kernels with warn_only (and says what is not); AST's step and the CPU stay strict."""
    from common.models.ast.arch import ASTArch
    from common.models.htsat.arch import HTSATArch
    from common.training.loop import deterministic_mode

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert "upsample_bicubic2d" in deterministic_mode(True, cuda, HTSATArch)
    assert deterministic_mode(False, cuda, HTSATArch) == deterministic_mode(True, cpu, HTSATArch) == ""
    assert deterministic_mode(True, cuda, ASTArch) == ""
    # the reason is true: on the CPU the op is deterministic (torch raises nothing), on CUDA torch lists it
    import inspect
    assert "bicubic" in inspect.getdoc(torch.use_deterministic_algorithms)


def test_auto_precision_is_one_for_the_whole_job(monkeypatch, caplog):
    """train.precision auto on GPUs: bf16 only where every rank's GPU computes it (a job over an A100 node and a V100
    node trained some ranks in bf16, the others in fp32, without a word); the main rank names the GPUs that keep the
    job in fp32. bf16 and fp32 set in the recipe, and the CPU, ask no rank."""
    import common.training.machinery as machinery
    from common.training.machinery import agreed_bf16

    class Ranks:
        """Two ranks' answers as gather_objects gives them on each."""
        def __init__(self, rank, answers):
            self.rank, self.answers, self.world_size, self.gathered = rank, answers, len(answers), 0

        @property
        def is_main(self):
            return self.rank == 0

        def gather_objects(self, obj):
            self.gathered += 1
            assert obj == self.answers[self.rank]
            return self.answers

    answers = [("NVIDIA A100-SXM4-80GB", True), ("Tesla V100-SXM2-32GB", False)]
    cuda = torch.device("cuda", 0)
    for rank in (0, 1):
        monkeypatch.setattr(machinery, "autocast_bf16", lambda precision, is_cuda, r=rank: answers[r][1])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, r=rank: answers[r][0])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="common.training.machinery"):
            assert agreed_bf16("auto", cuda, Ranks(rank, answers)) is False
        assert [r.getMessage() for r in caplog.records] == (
            ["train.precision auto: fp32 on every rank, as Tesla V100-SXM2-32GB computes bf16 only by emulation "
             "(several times slower)"] if rank == 0 else [])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(machinery, "autocast_bf16", lambda precision, is_cuda: True)
    both = [("NVIDIA A100-SXM4-80GB", True)] * 2
    assert agreed_bf16("auto", cuda, Ranks(1, both)) is True
    for precision, device in (("bf16", cuda), ("fp32", cuda), ("auto", torch.device("cpu"))):
        ranks = Ranks(0, both)
        agreed_bf16(precision, device, ranks)
        assert ranks.gathered == 0, (precision, device)
