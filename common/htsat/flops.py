"""HTS-AT training FLOPs per clip, counted (forward + backward) with :mod:`common.flops` on the meta device.

A training step is the model on a log-mel batch and a BCE loss on the clipwise logits. Counted are the
matmuls and convolutions (the Swin, the patch embedding, the token-semantic head); the STFT, the
bicubic stretch and element-wise work are not, as is usual (and as the reference count of 35.9 GFLOPs
per 10 s clip at 256 x 256, 9.0 at 128 x 128, reference/htsat.md 2.6).

``python -m common.htsat.flops`` prints the geometry and training FLOPs of every compression method.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from common.compression import METHODS, Compression
from common.flops import train_step_flops
from common.htsat.config import HTSATConfig
from common.htsat.geometry import Geometry, geometry

__all__ = ["train_flops"]


def train_flops(cfg: HTSATConfig, geom: Geometry | None = None, batch: int = 2) -> int:
    """FLOPs per clip of one training step (forward + backward) of HTS-AT in geometry ``geom``."""
    from common.htsat.model import HTSAT

    geom = geom if geom is not None else geometry(cfg)

    def step(model: HTSAT, n: int) -> torch.Tensor:
        logits = model(torch.randn(n, 1, geom.stft_frames, cfg.mel_bins))["clipwise_output"]
        return F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))

    return train_step_flops(lambda: HTSAT(cfg, geom), step, batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.htsat.flops",
        description="Training FLOPs per clip of the official-size HTS-AT for every compression method.")
    parser.add_argument("--factors", default="2,4", help="comma-separated compression factors (default 2,4)")
    args = parser.parse_args(argv)
    cfg = HTSATConfig()
    full = train_flops(cfg)
    print("HTS-AT training FLOPs per 10 s clip (forward + backward), Swin-T, 64 mel bins")
    print(f"{'method':<16} {'hop':>5} {'frames':>6} {'image':>8} {'patch':>5} {'tokens':>6} {'GFLOPs':>7} {'ratio':>6}")
    for method in METHODS:
        for factor in [1] if method == "none" else [int(f) for f in args.factors.split(",")]:
            comp = Compression(method, factor)
            try:
                geom = geometry(cfg, comp)
            except ValueError as err:
                print(f"{comp.describe():<16} impossible: {err}")
                continue
            flops = train_flops(cfg, geom)
            tokens = (geom.image[0] // geom.patch[0]) * (geom.image[1] // geom.patch[1])
            print(f"{comp.describe():<16} {geom.hop_length:>5} {geom.frames:>6} {geom.image[0]:>4}x{geom.image[1]:<3} "
                  f"{geom.patch[0]}x{geom.patch[1]:<3} {tokens:>6} {flops / 1e9:>7.2f} {flops / full:>6.3f}")


if __name__ == "__main__":
    main()
