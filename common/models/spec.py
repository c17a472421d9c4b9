"""A recipe's ``model:`` section: the architecture, and its size and geometry (AST family) or its settings (HTS-AT)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from common.config.recipe import build
from common.models.ast.encoder import EncoderConfig, encoder_config
from common.models.htsat.config import HTSATConfig, HTSATSettings

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """A recipe's ``model:`` section: the architecture, and its size and patch geometry.

    For the AST family (``arch: ast``) a named size (or ``custom``) and the patch geometry; the input
    geometry (mel bins, frames) comes from the audio section, so the grid is derived once. For HTS-AT
    (``arch: htsat``) every setting is under ``htsat`` (:class:`common.models.htsat.HTSATConfig`: its front end,
    Swin size and classes; the official AudioSet model by default).

    Args:
        arch: ``ast`` (AST / SSAST ViTs) or ``htsat``.
        size: ``tiny``, ``small``, ``base`` or ``custom``.
        embed_dim, depth, num_heads: override the size's values (all three needed for ``custom``).
        patch: ``[fshape, tshape]`` at full resolution.
        stride: ``[fstride, tstride]`` (default: the patch, no overlap; AST fine-tuning uses [10, 10]).
        num_prefix_tokens, drop_path_rate: see :class:`EncoderConfig`.
        htsat: HTS-AT's settings the recipe gives (``arch: htsat`` only; the others are the init's or the official model's).
    """
    arch: Literal["ast", "htsat"] = "ast"
    size: Literal["tiny", "small", "base", "custom"] = "base"
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch: tuple[int, int] = (16, 16)
    stride: tuple[int, int] | None = None
    num_prefix_tokens: int = 2
    drop_path_rate: float = 0.0
    htsat: HTSATSettings = dataclasses.field(default_factory=HTSATSettings)

    def __post_init__(self) -> None:
        if isinstance(self.htsat, dict):  # built in code rather than from a recipe
            object.__setattr__(self, "htsat", build(HTSATSettings, self.htsat, "model.htsat"))
        if self.arch == "htsat":
            defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec) if f.name not in ("arch", "htsat")}
            for name, default in defaults.items():
                if getattr(self, name) != default:
                    raise ValueError(f"{name}: an AST-family setting; HTS-AT's settings go under model.htsat")
            self.htsat_config  # validates model.htsat
        elif self.htsat:
            raise ValueError("htsat: settings of model.arch htsat (this model is arch ast)")
        if self.size == "custom" and None in (self.embed_dim, self.depth, self.num_heads):
            raise ValueError("size 'custom' needs embed_dim, depth and num_heads")
        for name in ("embed_dim", "depth", "num_heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("patch", "stride"):
            if getattr(self, name) is not None and min(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {list(getattr(self, name))}")
        if self.num_prefix_tokens not in (0, 1, 2):
            raise ValueError(f"num_prefix_tokens must be 0, 1 or 2, got {self.num_prefix_tokens}")
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def htsat_config(self) -> HTSATConfig:
        """``model.htsat`` as an :class:`~common.models.htsat.config.HTSATConfig` (the official model's values where
        the recipe gives none)."""
        return HTSATConfig.from_dict(self.htsat.given(), prefix="model.htsat")

    def encoder_config(self, num_mel_bins: int, input_tdim: int) -> EncoderConfig:
        if self.arch != "ast":
            raise ValueError(f"model.arch {self.arch!r} has no ViT encoder config")
        dims = {k: v for k, v in (("embed_dim", self.embed_dim), ("depth", self.depth),
                                  ("num_heads", self.num_heads)) if v is not None}
        stride = self.stride or self.patch
        return encoder_config(self.size, **dims, num_mel_bins=num_mel_bins, input_tdim=input_tdim,
                              fshape=self.patch[0], tshape=self.patch[1], fstride=stride[0], tstride=stride[1],
                              num_prefix_tokens=self.num_prefix_tokens, drop_path_rate=self.drop_path_rate)
