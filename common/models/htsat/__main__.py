"""``python -m common.models.htsat``: the geometry and training FLOPs per clip of every compression method."""

from __future__ import annotations

import argparse

from common.audio.compression import METHODS, Compression
from common.models.htsat.config import HTSATConfig
from common.models.htsat.flops import train_flops
from common.models.htsat.geometry import geometry
from common.system.prog import whole_numbers

# --help loads torch: `python -m common.models.htsat` imports the package first, whose __init__ imports the model.


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.models.htsat",
        description="Training FLOPs per clip of the official-size HTS-AT for every compression method.")
    factors = whole_numbers(2, ">= 2 (1, full resolution, is the 'none' row)")
    parser.add_argument("--factors", type=factors, default="2,4",
                        help="comma-separated compression factors (default 2,4)")
    args = parser.parse_args(argv)
    cfg = HTSATConfig()
    full = train_flops(cfg)
    print("HTS-AT training FLOPs per 10 s clip (forward + backward), Swin-T, 64 mel bins")
    print(f"{'method':<16} {'hop':>5} {'frames':>6} {'image':>8} {'patch':>5} {'tokens':>6} {'GFLOPs':>7} {'ratio':>6}")
    for method in METHODS:
        for factor in [1] if method == "none" else args.factors:
            comp = Compression(method, factor)
            try:
                geom = geometry(cfg, comp)
            except ValueError as err:
                print(f"{comp.describe():<16} impossible: {err}")
                continue
            flops = train_flops(cfg, geom)
            print(f"{comp.describe():<16} {geom.hop_length:>5} {geom.frames:>6} {geom.image[0]:>4}x{geom.image[1]:<3} "
                  f"{geom.patch[0]}x{geom.patch[1]:<3} {geom.tokens:>6} {flops / 1e9:>7.2f} {flops / full:>6.3f}")


if __name__ == "__main__":
    main()
