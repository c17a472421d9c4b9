"""One rank of tests/training/test_engine_defaults.py: builds the trainer's engine for each case, takes one training
step on gloo, and records the ZeRO settings the engine actually got.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/engine_job.py JOB.json

``JOB.json``: ``{"out": folder, "cases": {name: {"train": {TrainConfig keys}}}}``. Writes ``out/rank{r}.json``:
per case, the engine's ZeRO stage, ``overlap_comm``, bucket sizes and a checksum of the weights after the step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(job_file: str) -> int:
    import torch

    from common.data.loader import Batch, DataConfig
    from common.system.distributed import init_distributed
    from common.audio.pipeline import AudioConfig
    from common.models.ast.encoder import EncoderConfig
    from common.training.optim import OptimConfig
    from common.phases.config import PhaseConfig, TransferConfig
    from common.training.spec import RunSpec, TrainConfig
    from common.training.loop import Trainer
    from pretrain.ssast import SSASTConfig, SSASTObjective

    job = json.loads(Path(job_file).read_text())
    dist = init_distributed()
    base = EncoderConfig(embed_dim=32, depth=2, num_heads=2, num_mel_bins=32, input_tdim=64, fshape=8, tshape=8,
                         fstride=8, tstride=8)
    report = {}
    for name, case in job["cases"].items():
        objective = SSASTObjective(SSASTConfig())
        spec = RunSpec(run_dir=Path(job["out"]) / name, base=base, audio=AudioConfig(num_mel_bins=32, target_frames=64),
                       phases=[PhaseConfig(steps=1)], transfer=TransferConfig(), optim=OptimConfig(warmup_steps=0),
                       train=TrainConfig(**case["train"]), data=DataConfig(batch_size=2 * dist.world_size))
        trainer = Trainer(spec, objective, dist)
        torch.manual_seed(0)
        engine = trainer._engine(objective.build_model(trainer.cfgs[0]), 0)
        torch.manual_seed(dist.rank)  # each rank its own clips: the step's gradient is their average
        samples = trainer.arch.clip_samples
        batch = Batch(torch.randn(2, samples), torch.full((2,), samples), None, ["a", "b"])
        loss, _ = objective.train_step(engine, batch, trainer._frontend(0, objective.specaug),
                                       torch.Generator().manual_seed(dist.rank))
        engine.backward(loss)
        engine.step()
        zero = engine._config.zero_config
        report[name] = {"stage": engine.zero_optimization_stage(), "overlap_comm": engine.zero_overlap_comm(),
                        "reduce_bucket_size": int(zero.reduce_bucket_size),
                        "allgather_bucket_size": int(zero.allgather_bucket_size),
                        "optimizer_overlaps": bool(getattr(engine.optimizer, "overlap_comm", False)),
                        "checksum": float(sum(p.double().sum() for p in engine.module.parameters())),
                        "trainer_stage": trainer.zero_stage}
        trainer.scalars.close()
    (Path(job["out"]) / f"rank{dist.rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
