"""One rank of tests/training/test_engine_defaults.py: builds the trainer's engine for each case, takes one training
step on gloo, and records the ZeRO settings the engine actually got.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/engine_job.py JOB.json

``JOB.json``: ``{"out": folder, "cases": {name: {"train": {TrainConfig keys}}}}``. Writes ``out/rank{r}.json``:
per case, the engine's ZeRO stage, ``overlap_comm``, bucket sizes, a checksum of the weights after the step and
the places where the backward pass and the optimiser step read a tensor on the host (a wait for a GPU).
A case may carry ``"optim"`` (OptimConfig keys); one with ``grad_clip`` also records, from the step itself, whether
the gradient the backward all-reduced is the mean of the ranks' gradients and whether the optimiser stepped with
that mean scaled by ``min(1, grad_clip / (norm + 1e-6))`` (``common.training.optim.step_engine``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(job_file: str) -> int:
    import torch

    from common.audio.pipeline import AudioConfig
    from common.data.clips import Batch
    from common.data.config import DataConfig
    from common.models.ast.encoder import EncoderConfig
    from common.phases.config import PhaseConfig, TransferConfig
    from common.system.distributed import init_distributed
    from common.training.loop import Trainer
    from common.training.optim import OptimConfig, step_engine
    from common.training.spec import RunSpec, TrainConfig
    from pretrain.ssast import SSASTConfig, SSASTObjective
    from tests.helpers import MASK_DRAWER, host_reads

    job = json.loads(Path(job_file).read_text())
    dist = init_distributed()
    base = EncoderConfig(embed_dim=32, depth=2, num_heads=2, num_mel_bins=32, input_tdim=64, fshape=8, tshape=8,
                         fstride=8, tstride=8)
    report = {}
    for name, case in job["cases"].items():
        objective = SSASTObjective(SSASTConfig())
        spec = RunSpec(run_dir=Path(job["out"]) / name, base=base, audio=AudioConfig(num_mel_bins=32, target_frames=64),
                       phases=[PhaseConfig(steps=1)], transfer=TransferConfig(), optim=OptimConfig(warmup_steps=0, **case.get("optim", {})),
                       train=TrainConfig(**case["train"]), data=DataConfig(batch_size=2 * dist.world_size))
        trainer = Trainer(spec, objective, dist)
        torch.manual_seed(0)
        engine = trainer._engine(objective.build_model(trainer.cfgs[0]), 0)
        torch.manual_seed(dist.rank)  # each rank its own clips: the step's gradient is their average
        samples = trainer.arch.clip_samples
        batch = Batch(torch.randn(2, samples), torch.full((2,), samples), None, ["a", "b"])
        loss, _ = objective.train_step(engine, batch, trainer._frontend(0, objective.specaug),
                                       torch.Generator().manual_seed(dist.rank))
        probe = _probe(engine) if spec.optim.grad_clip and engine.zero_optimization_stage() == 0 else {}
        with host_reads(lambda path: path != MASK_DRAWER) as reads:  # the drawer's CPU reads: host work, in a thread
            engine.backward(loss)
            step_engine(engine)
        zero = engine._config.zero_config
        report[name] = {"stage": engine.zero_optimization_stage(), "overlap_comm": engine.zero_overlap_comm(),
                        "reduce_bucket_size": int(zero.reduce_bucket_size),
                        "allgather_bucket_size": int(zero.allgather_bucket_size),
                        "optimizer_overlaps": bool(getattr(engine.optimizer, "overlap_comm", False)),
                        "checksum": float(sum(p.double().sum() for p in engine.module.parameters())),
                        "trainer_stage": trainer.zero_stage, "host_reads": sorted(reads),
                        **_clip_report(probe, spec.optim.grad_clip)}
        trainer.scalars.close()
    (Path(job["out"]) / f"rank{dist.rank}.json").write_text(json.dumps(report))
    return 0


def _flat(params):
    import torch

    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params]).clone()


def _probe(engine) -> dict:
    """Record the gradients around the engine's all-reduce and when the optimiser steps (observes only)."""
    params, probe = list(engine.module.parameters()), {}
    reduce, step = engine.allreduce_gradients, engine.optimizer.step

    def allreduce_gradients(*args, **kwargs):
        probe["local"] = _flat(params)
        reduce(*args, **kwargs)
        probe["reduced"] = _flat(params)

    def optimizer_step(*args, **kwargs):
        probe["stepped"] = _flat(params)
        return step(*args, **kwargs)

    engine.allreduce_gradients, engine.optimizer.step = allreduce_gradients, optimizer_step
    return probe


def _clip_report(probe: dict, clip: float) -> dict:
    """Whether the reduced gradient is the ranks' mean and the stepped one that mean clipped (the same on every
    rank: only rank-independent values)."""
    if not clip or not probe:
        return {}
    import torch
    import torch.distributed as dist

    mean = probe["local"].clone()
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    reduced, stepped = probe["reduced"], probe["stepped"]
    norm = float(reduced.norm())
    expected = reduced * min(1.0, clip / (norm + 1e-6))
    return {"reduced_is_mean": bool(torch.allclose(reduced, mean, rtol=1e-5, atol=1e-8)),
            "reduced_over_clip": norm > clip,
            "stepped_is_clipped": bool(torch.allclose(stepped, expected, rtol=1e-5, atol=1e-9)),
            "stepped_norm": round(float(stepped.norm()) / clip, 4)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
