"""HTS-AT's coarse (Fshift x4) step against its full-resolution step on the CPU: time ratio r and FLOPs ratio.

    OMP_NUM_THREADS=1 python -m bench.htsat_coarse [--repeats 5] [--steps 3] [--profile] [--size official]

A tiny-but-realistic HTS-AT (the official front end and geometry: 10 s at 32 kHz, 64 mel bins, a 256 x 256
image, window 8, four stages; a narrower, shallower Swin so that a CPU step takes a fraction of a second;
``--size official``: HTS-AT's own Swin-T), batch 4, the classifier objective with its SpecAugment and mixup.
A bare step (front end, forward, loss, backward, fused AdamW step; no DeepSpeed) is timed per phase,
``--repeats`` times, medians reported.
``r = coarse step time / full step time`` against ``flops = coarse FLOPs / full FLOPs``: ``r / flops`` is 1 when
the coarse step is as cheap as its FLOPs. ``--profile`` prints the top ops by self CPU time per phase
(``torch.profiler``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CLASSES = [f"c{i}" for i in range(10)]


SIZES = {  # Swin widths and depths: the CPU-sized model, and the official HTS-AT's Swin-T
    "tiny": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    "official": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(4, 8, 16, 32)),
}


def build(tmp: str, size: str = "tiny"):
    """``(objective, [(label, geometry, front end, model), ...])`` for Fshift x4 and full resolution."""
    from common.data.config import DataConfig
    from common.models.htsat import HTSATConfig
    from common.phases.config import PhaseConfig, TransferConfig
    from common.system.distributed import init_distributed
    from common.training.loop import Trainer
    from common.training.optim import OptimConfig
    from common.training.spec import RunSpec, TrainConfig
    from finetune.classifier import AugmentConfig, ClassifierObjective

    base = HTSATConfig(**SIZES[size], drop_path_rate=0.1, num_classes=len(CLASSES))
    objective = ClassifierObjective(CLASSES, "mAP", "bce", AugmentConfig(freqm=16, timem=64, mixup=0.5))
    phases = [PhaseConfig(compression="fshift", factor=4, epochs=1), PhaseConfig(epochs=1)]
    spec = RunSpec(run_dir=tmp, base=base, audio=None, phases=phases, transfer=TransferConfig(),
                   optim=OptimConfig(warmup_steps=0), train=TrainConfig(), data=DataConfig())
    trainer = Trainer(spec, objective, init_distributed())
    trainer.scalars.close()
    out = []
    for index, label in ((0, "fshift x4"), (1, "full")):
        torch.manual_seed(0)
        out.append((label, trainer.cfgs[index], trainer._frontend(index, objective.specaug),
                    objective.build_model(trainer.cfgs[index])))
    return objective, trainer.arch.clip_samples, out


def step_time(objective, samples: int, pipeline, model, batch: int, steps: int) -> float:
    """Seconds per bare training step (median of ``steps`` after one warm-up)."""
    from common.data.clips import Batch
    from tests.conftest import real_looking_signals  # (its import sets 2 threads: main sets them back first)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)
    waves = real_looking_signals(batch, samples / 32000, sr=32000)
    data = Batch(waves, torch.full((batch,), samples), torch.eye(len(CLASSES))[:batch], [str(i) for i in range(batch)])
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss, _ = objective.train_step(model, data, pipeline, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="tiny (embed 32, depths 1-1-2-1) or official (HTS-AT's Swin-T: embed 96, depths 2-2-6-2)")
    args = parser.parse_args(argv)
    import os
    import tempfile

    import tests.conftest  # noqa: F401 - sets torch's threads on import; set them back below

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # tests.conftest sets 2 on import

    with tempfile.TemporaryDirectory() as tmp:
        objective, samples, phases = build(tmp, args.size)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    flops = {label: objective.flops_per_sample(cfg) for label, cfg, _, _ in phases}
    times: dict[str, list[float]] = {label: [] for label, *_ in phases}
    for _ in range(args.repeats):  # interleaved, so that a busy moment of a shared machine hits both phases
        for label, _, pipeline, model in phases:
            times[label].append(step_time(objective, samples, pipeline, model, args.batch, args.steps))
    med = {label: statistics.median(t) for label, t in times.items()}
    r, f = med["fshift x4"] / med["full"], flops["fshift x4"] / flops["full"]
    for label, *_ in phases:
        print(f"{label:10s} step {med[label] * 1e3:8.1f} ms (median of {args.repeats}: "
              f"{', '.join(f'{t * 1e3:.0f}' for t in times[label])})  {flops[label] / 1e9:.3g} GFLOPs/clip")
    print(f"r = coarse / full step time = {r:.3f}; FLOPs ratio = {f:.3f}; r / FLOPs ratio = {r / f:.2f}; "
          f"threads {torch.get_num_threads()}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for label, _, pipeline, model in phases:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step_time(objective, samples, pipeline, model, args.batch, 1)
            print(f"--- {label}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
