"""Training FLOPs per sample, counted with ``torch.utils.flop_counter`` (forward + backward).

Models are built on the ``meta`` device, so counting the FLOPs of an SSAST-base step takes well under a
second and no memory: the counter sees every matmul and convolution, attention included (on ``meta``
scaled-dot-product attention decomposes into the batched matmuls it performs). Element-wise work
(norms, activations, the fbank) is not counted, as is usual for transformer FLOPs.

``python -m common.models.flops`` prints the token grid and training FLOPs of every compression method.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.system.prog import whole_numbers

# Imports the command alone needs are inside its functions, but --help loads torch: this module is a library first
# (the FLOPs counter every run's ledger uses), whose top imports torch.

__all__ = ["count_flops", "train_step_flops", "encoder_train_flops"]


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of everything ``fn`` runs (including a backward it calls)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def train_step_flops(build: Callable[[], nn.Module], step: Callable[[nn.Module, int], torch.Tensor],
                     batch: int = 2) -> int:
    """FLOPs per sample of one training step (forward + backward), counted on the meta device.

    Args:
        build: makes the model (called under ``torch.device("meta")``).
        step: ``step(model, batch) -> loss`` builds its own meta inputs and returns the scalar loss.
        batch: batch size the step is counted at; the result is divided by it.
    """
    with torch.device("meta"):
        model = build()

        def run() -> None:
            step(model, batch).backward()

        total = count_flops(run)
    return total // batch


def encoder_train_flops(cfg: EncoderConfig, batch: int = 2) -> int:
    """FLOPs per sample of a forward + backward pass of the bare encoder (a scalar loss on its tokens)."""

    def step(model: nn.Module, n: int) -> torch.Tensor:
        x = torch.randn(n, cfg.input_tdim, cfg.num_mel_bins)
        return model.forward_features(x).mean()

    return train_step_flops(lambda: ASTEncoder(cfg), step, batch)


def _table(size: str, factors: list[int]) -> list[dict]:
    from common.audio.compression import METHODS, Compression
    from common.models.ast.encoder import encoder_config

    base = encoder_config(size, input_tdim=1024, fshape=16, tshape=16, fstride=16, tstride=16)
    full = encoder_train_flops(base)
    rows = []
    for method in METHODS:
        for factor in ([1] if method == "none" else factors):
            comp = Compression(method, factor)
            name = comp.describe() if method != "none" else "none"
            try:
                cfg = comp.encoder_config(base)
            except ValueError as err:  # a factor the clip cannot take (its grid would be empty)
                rows.append(dict(method=name, impossible=str(err)))
                continue
            flops = encoder_train_flops(cfg)
            rows.append(dict(method=name, frames=cfg.input_tdim,
                             patch=f"{cfg.fshape}x{cfg.tshape}", grid=f"{cfg.grid[0]}x{cfg.grid[1]}",
                             tokens=cfg.num_patches, gflops=flops / 1e9, saving=1 - flops / full))
    return rows


def print_table(size: str = "base", factors: tuple[int, ...] = (2, 4)) -> None:
    rows = _table(size, list(factors))
    print(f"Training FLOPs per 10.24 s clip, ASTEncoder-{size}, 128 mel bins, patch 16x16 (forward + backward)")
    print(f"{'method':<20} {'frames':>6} {'patch':>6} {'grid':>6} {'tokens':>6} {'GFLOPs':>9} {'saving':>7}")
    for r in rows:
        if "impossible" in r:
            print(f"{r['method']:<20} impossible: {r['impossible']}")
            continue
        print(f"{r['method']:<20} {r['frames']:>6} {r['patch']:>6} {r['grid']:>6} {r['tokens']:>6} "
              f"{r['gflops']:>9.1f} {r['saving']:>7.1%}")


def run_pipeline_on_a_clip(factors: tuple[int, ...]) -> None:
    """Push one generated 10 s clip through fbank -> compression -> a tiny encoder for every method."""
    import math

    from common.audio.compression import METHODS, Compression
    from common.audio.pipeline import AudioConfig, FeaturePipeline
    from common.models.ast.encoder import ASTEncoder, encoder_config

    audio = AudioConfig()
    t = torch.arange(audio.clip_samples) / audio.sample_rate
    clip = (0.3 * torch.sin(2 * math.pi * (200 + 300 * t) * t) * (torch.sin(2 * math.pi * 2 * t) > 0)).float()
    base = encoder_config("tiny", depth=2)
    print(f"\nOne generated {audio.clip_seconds:.2f} s clip through the real pipeline (tiny encoder, 2 blocks):")
    for method in METHODS:
        for factor in ([1] if method == "none" else factors):
            comp = Compression(method, factor)
            try:
                cfg = comp.encoder_config(base)
            except ValueError as err:
                print(f"  {comp.describe():<20} impossible: {err}")
                continue
            feats = FeaturePipeline(audio, comp)(clip[None])
            with torch.no_grad():
                tokens = ASTEncoder(cfg).forward_features(feats)
            print(f"  {comp.describe():<20} fbank {tuple(feats.shape)} -> tokens {tuple(tokens.shape)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.models.flops",
        description="Print the token grid and training FLOPs per clip of every compression method.")
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base"], help="encoder size")
    factors = whole_numbers(2, ">= 2 (1, full resolution, is the 'none' row)")
    parser.add_argument("--factors", type=factors, default="2,4",
                        help="comma-separated compression factors (default 2,4)")
    parser.add_argument("--pipeline", action="store_true",
                        help="also run a generated clip through fbank -> compression -> encoder")
    args = parser.parse_args(argv)
    print_table(args.size, args.factors)
    if args.pipeline:
        run_pipeline_on_a_clip(args.factors)


if __name__ == "__main__":
    main()
