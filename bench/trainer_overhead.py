"""Trainer step against the bare step on the CPU, tiny SSAST: clips/s of each and their ratio (target >= 0.90).

    OMP_NUM_THREADS=1 python -m bench.trainer_overhead [--repeats 5] [--steps 10]

Trainer step: ``Trainer._micro_step`` on the trainer's DeepSpeed engine (the batch's copy to the device, the
masks drawn ahead by ``pretrain.mask_draws``, autocast, the non-finite watch, ``engine.backward`` and
``engine.step``). Bare step: the same model, front end and batch, masks drawn once before the clock (the model's
step alone), ``loss.backward()`` and a fused Adam step. Interleaved repeats, medians (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    from pathlib import Path

    from common.data.clips import Batch
    from tests.conftest import real_looking_signals
    from tests.training.test_trainer import _micro_step_trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        trainer, engine, pipeline = _micro_step_trainer(Path(tmp), "ssast", accum=1)
        samples = trainer.arch.clip_samples
        waves = real_looking_signals(args.batch, samples / 16000)
        bare_model = trainer.objective.build_model(trainer.cfgs[0])
        bare_model.load_state_dict(engine.module.state_dict())
        optimizer = torch.optim.Adam(bare_model.parameters(), lr=1e-4, fused=True)
        generator = torch.Generator().manual_seed(0)

        def trainer_steps(start: int) -> float:
            t = time.perf_counter()
            for i in range(args.steps):
                batch = Batch(waves, torch.full((args.batch,), samples), None, [""] * args.batch, index=start + i)
                trainer._micro_step(engine, batch, pipeline, 0)
            return args.steps * args.batch / (time.perf_counter() - t)

        passes = 2 if trainer.objective.cfg.separate_passes else 1
        masks = [bare_model.sample_mask(args.batch, generator, "cpu") for _ in range(passes)]

        def bare_steps() -> float:  # the model's step alone: its masks drawn before the clock
            t = time.perf_counter()
            for _ in range(args.steps):
                loss = bare_model(pipeline(waves, torch.full((args.batch,), samples)), masks=masks)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return args.steps * args.batch / (time.perf_counter() - t)

        trainer_steps(0), bare_steps()  # warm-up
        rates = {"trainer": [], "bare": []}
        for r in range(args.repeats):
            rates["trainer"].append(trainer_steps((r + 1) * args.steps))
            rates["bare"].append(bare_steps())
        trainer.scalars.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rates.items():
        print(f"{k:8s} {med[k]:7.1f} clips/s (median of {args.repeats}: {', '.join(f'{x:.1f}' for x in v)})")
    print(f"trainer / bare = {med['trainer'] / med['bare']:.3f}; threads {torch.get_num_threads()}, batch {args.batch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
