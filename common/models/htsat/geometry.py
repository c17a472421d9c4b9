"""HTS-AT's phase geometry: how each time compression maps onto the folded image and the Swin windows.

HTS-AT folds its log-mel into an image: ``chunks`` consecutive time chunks are stacked along frequency,
so ``[T, F]`` becomes ``[F * chunks, T / chunks]`` (1024 x 64 -> 256 x 256). A compression by C shrinks
T to ``T / C`` and the fold is chosen again:

- design D1 (square): where ``T / C / F`` is a square number r^2, the image is ``(F r) x (F r)``:
  Fshift x4 is a hop of 1280 (251 frames, stretched to 256), 2 chunks, a 128 x 128 image. This is
  the official code with ``spec_size=128`` and ``hop_size=1280``.
- design D2 (non-square): otherwise ``r = floor(sqrt(T / C / F))`` chunks, a ``(F r) x (T / C r)``
  image: Fshift x2 is 501 frames stretched to 512, 2 chunks, 128 x 256. The windows are clamped per
  axis (timm), so the last stage still attends over its whole grid, as it does at C = 1 and C = 4.
- ``avgpool`` / ``maxpool`` x C: the full-resolution log-mel (1001 frames stretched to 1024) is pooled
  to ``1024 / C`` frames and folded like Fshift x C.
- ``patch`` x C: the image stays full size and the patch becomes ``p x Cp`` (4 x 16 at C = 4).

In every geometry only the attention windows of some stages change size; :func:`stage_layout` says
which, and :mod:`common.models.htsat.adapt` resizes exactly those relative-position tables.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from common.audio.compression import Compression
from common.models.htsat.config import HTSATConfig

__all__ = ["Geometry", "BlockLayout", "geometry", "stage_layout"]


@dataclass(frozen=True)
class Geometry:
    """The input geometry of one training phase.

    Args:
        hop_length: STFT hop (``hop_length * C`` for Fshift).
        stft_frames: frames the front end makes from a padded clip (``1 + clip_samples // hop``).
        stretch_frames: the frames are stretched to this length (bicubic, as the official code).
        pool: ``none``, ``avg`` or ``max``: pooling along time after the stretch.
        pool_factor: the pooling window and stride (1 without pooling).
        chunks: time chunks stacked along frequency in the image.
        image: ``(height, width)`` of the Swin input.
        patch: ``(height, width)`` of the Swin patch.
        full_stft_frames: ``stft_frames`` at full resolution (scales SpecAugment's time stripes).
    """

    hop_length: int
    stft_frames: int
    stretch_frames: int
    pool: str
    pool_factor: int
    chunks: int
    image: tuple[int, int]
    patch: tuple[int, int]
    full_stft_frames: int

    @property
    def frames(self) -> int:
        """Frames the image holds (after stretch and pooling)."""
        return self.stretch_frames // self.pool_factor

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid of the first Swin stage ``(rows, columns)``: 64 x 64 at full resolution."""
        return self.image[0] // self.patch[0], self.image[1] // self.patch[1]

    @property
    def tokens(self) -> int:
        """Tokens of the first Swin stage (4096 at full resolution, 1024 at Fshift x4)."""
        return self.grid[0] * self.grid[1]

    @property
    def time_scale(self) -> float:
        """Share of the full-resolution frame rate the front end runs at (1 / C for Fshift x C)."""
        return self.stft_frames / self.full_stft_frames

    def describe(self) -> str:
        pool = f", {self.pool} pool x{self.pool_factor}" if self.pool != "none" else ""
        return (f"hop {self.hop_length}, {self.stft_frames} frames -> {self.stretch_frames}{pool}, {self.chunks} "
                f"chunk(s), image {self.image[0]}x{self.image[1]}, patch {self.patch[0]}x{self.patch[1]}")


@dataclass(frozen=True)
class BlockLayout:
    """Where one Swin block attends: its stage grid, window and cyclic shift (rows, columns)."""

    stage: int
    block: int
    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]


def _fold(cfg: HTSATConfig, frames: int, patch_w: int, what: str) -> tuple[int, tuple[int, int]]:
    """``(chunks, image)`` for ``frames`` frames: square where possible (D1), else D2."""
    chunks = math.isqrt(frames // cfg.mel_bins) if frames >= cfg.mel_bins else 0
    if chunks < 1:
        raise ValueError(f"{what} leaves {frames} frames, fewer than the {cfg.mel_bins} mel bins of one image row "
                         "block: HTS-AT cannot fold it into an image")
    if frames % chunks:
        raise ValueError(f"{what}: {frames} frames do not split into {chunks} equal time chunks")
    image = (cfg.mel_bins * chunks, frames // chunks)
    reduction_w = patch_w * 2 ** (cfg.num_stages - 1)
    if image[1] % reduction_w:
        raise ValueError(f"{what}: its {frames} frames over {cfg.mel_bins} mel bins fold into {chunks} time chunk(s), "
                         f"a {image[0]}x{image[1]} image, whose width is not a multiple of {reduction_w} (patches "
                         f"{patch_w} wide, then {cfg.num_stages - 1} patch merges that each halve the width)")
    return chunks, image


def geometry(cfg: HTSATConfig, compression: Compression = Compression()) -> Geometry:
    """The geometry of a phase compressed by ``compression``.

    Args:
        cfg: the model (its full-resolution geometry).
        compression: ``none``, ``fshift``, ``avgpool``, ``maxpool`` or ``patch`` with factor C.

    Raises:
        ValueError: naming the method and factor, when HTS-AT cannot be built for them.
    """
    method, factor = compression.method, compression.factor
    what = f"compression {method} x{factor}"
    full_frames = 1 + cfg.clip_samples // cfg.hop_length
    if factor == 1:
        method = "none"
    elif cfg.target_frames % factor:
        raise ValueError(f"{what}: the factor does not divide the {cfg.target_frames} frames of the "
                         "full-resolution image")
    hop, stretch, pool, pool_factor = cfg.hop_length, cfg.target_frames, "none", 1
    patch = (cfg.patch_size, cfg.patch_size)
    if method == "fshift":
        hop, stretch = cfg.hop_length * factor, cfg.target_frames // factor
    elif method in ("avgpool", "maxpool"):
        pool, pool_factor = method[:3], factor
    elif method == "patch":
        patch = (cfg.patch_size, cfg.patch_size * factor)
    elif method != "none":  # a compression method added without HTS-AT's geometry for it: never full resolution
        raise ValueError(f"{what}: HTS-AT has no geometry for the compression method {method!r}")
    stft_frames = 1 + cfg.clip_samples // hop
    if stft_frames > stretch:  # cannot happen for the config's own hop, only through the factor
        raise ValueError(f"{what}: {stft_frames} STFT frames exceed the {stretch} frames of the image")
    if method == "patch":
        chunks, image = cfg.chunks, (cfg.spec_size, cfg.spec_size)
        _fold(cfg, cfg.target_frames, patch[1], what)  # checks the width against the wider patch
    else:
        chunks, image = _fold(cfg, stretch // pool_factor, patch[1], what)
    return Geometry(hop_length=hop, stft_frames=stft_frames, stretch_frames=stretch, pool=pool,
                    pool_factor=pool_factor, chunks=chunks, image=image, patch=patch,
                    full_stft_frames=full_frames)


def stage_layout(cfg: HTSATConfig, geom: Geometry) -> list[BlockLayout]:
    """Grid, window and shift of every block, derived as timm's ``SwinTransformer`` sets them.

    A stage's grid is the patch grid halved once per earlier merge; the window is ``window_size``
    clamped per axis to the grid, and odd blocks shift by half the window along every axis the window
    does not already cover.
    """
    grid = geom.grid
    out = []
    for stage, depth in enumerate(cfg.depths):
        if stage:
            grid = (grid[0] // 2, grid[1] // 2)
        window = tuple(min(g, cfg.window_size) for g in grid)
        for block in range(depth):
            shift = tuple(0 if block % 2 == 0 or g <= cfg.window_size else cfg.window_size // 2 for g in grid)
            out.append(BlockLayout(stage, block, grid, window, shift))
    return out


_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")


def swin_depths(state: dict, source: str) -> tuple[int, ...]:
    """The blocks per stage of a Swin state dict with timm's / the official key names (``layers.S.blocks.B.``).

    Raises:
        ValueError: no stage, or stages that are not ``layers.0..N`` (naming ``source``).
    """
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = _BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(blocks)
    if not stages or stages != list(range(len(stages))):
        raise ValueError(f"{source}: Swin stages must be layers.0..N, found {stages}")
    return tuple(len(blocks[i]) for i in stages)
