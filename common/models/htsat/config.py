"""The HTS-AT model configuration: front end, Swin backbone and token-semantic head in one frozen record.

Defaults are the official HTS-AT AudioSet model (RetroCirce/HTS-Audio-Transformer
``config.py`` and ``model/htsat.py``): 32 kHz, STFT 1024 / hop 320, 64 slaney mel bins 50-14000 Hz, a
256 x 256 image of 4 time chunks, a Swin-T (patch 4, dims 96-768, depths 2-2-6-2, heads 4-8-16-32,
window 8, no absolute position embedding) and the TS-CAM head over 527 classes.

Every size is a field, so tests build tiny Swins the same way the full model is built; everything
else (chunks, the time length of the image, the head's kernel) is derived from the fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.config.recipe import build

__all__ = ["HTSATConfig", "HTSATSettings"]


@dataclass(frozen=True)
class HTSATConfig:
    """Everything needed to rebuild an HTS-AT model (stored with every checkpoint and export).

    Args:
        sample_rate: the rate clips are resampled to (32 kHz; the official SCV2 model uses 16 kHz).
        clip_samples: samples per clip; shorter clips are zero-padded to it (10 s at 32 kHz).
        n_fft: STFT size and Hann window length.
        hop_length: STFT hop at full resolution (320 = 10 ms).
        mel_bins, fmin, fmax: the slaney mel filterbank. ``fmax`` may lie above ``sample_rate / 2``, as in the
            official Speech Commands model (16 kHz with AudioSet's fmax 14000: its top filters are empty, as
            librosa builds them); a run refuses it for weights that were not trained so
            (``common.phases.init.task_encoder_config``).
        spec_size: side of the square full-resolution image; ``spec_size // mel_bins`` time chunks of
            ``spec_size`` frames each are stacked along frequency (256 // 64 = 4 chunks, 1024 frames).
        patch_size: Swin patch (and stride) on the image.
        embed_dim: channels of the first stage (doubled by each patch merging).
        depths, num_heads: blocks and attention heads per stage.
        window_size: attention window (clamped per axis to the stage grid, as timm does).
        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate: the Swin block settings
            (stochastic depth rises linearly over all blocks to ``drop_path_rate``).
        num_classes: outputs of the token-semantic head.
    """

    sample_rate: int = 32000
    clip_samples: int = 320000
    n_fft: int = 1024
    hop_length: int = 320
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 14000.0
    spec_size: int = 256
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    num_classes: int = 527

    def __post_init__(self) -> None:
        # lists (YAML, JSON metadata) become tuples so that the record stays hashable and comparable
        for name in ("depths", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name in ("sample_rate", "clip_samples", "n_fft", "hop_length", "mel_bins", "spec_size",
                     "patch_size", "embed_dim", "window_size", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (0 <= self.fmin < self.fmax and self.fmin < self.sample_rate / 2):
            raise ValueError(f"fmin, fmax must satisfy 0 <= fmin < fmax and fmin < sample_rate / 2 = "
                             f"{self.sample_rate / 2:g}, got fmin={self.fmin}, fmax={self.fmax}")
        if not self.depths or any(d <= 0 for d in self.depths):
            raise ValueError(f"depths must be a non-empty list of positive integers, got {list(self.depths)}")
        if len(self.num_heads) != len(self.depths):
            raise ValueError(f"num_heads has {len(self.num_heads)} entries but depths has {len(self.depths)} "
                             "(one per stage)")
        for i, heads in enumerate(self.num_heads):
            dim = self.stage_dims[i]
            if heads <= 0 or dim % heads:
                raise ValueError(f"num_heads[{i}] = {heads} does not divide the stage-{i} width {dim} "
                                 f"(embed_dim {self.embed_dim} x 2^{i})")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.n_fft // 2 + 1 < self.mel_bins:
            raise ValueError(f"n_fft {self.n_fft} has fewer frequency bins than mel_bins {self.mel_bins}")
        if self.spec_size % self.mel_bins:
            raise ValueError(f"spec_size {self.spec_size} must be a multiple of mel_bins {self.mel_bins} "
                             "(the image stacks spec_size // mel_bins time chunks)")
        if self.mel_bins % self.reduction:
            raise ValueError(
                f"mel_bins {self.mel_bins} must be a multiple of patch_size x 2^(stages - 1) = {self.reduction}, "
                "so that every time chunk fills whole rows of the last stage's grid")
        frames = 1 + self.clip_samples // self.hop_length
        if frames > self.target_frames:
            raise ValueError(
                f"clip_samples {self.clip_samples} gives {frames} STFT frames at hop_length {self.hop_length}, "
                f"more than the {self.target_frames} frames the {self.spec_size} x {self.spec_size} image holds")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels per stage: ``embed_dim * 2^i``."""
        return tuple(self.embed_dim * 2**i for i in range(self.num_stages))

    @property
    def num_features(self) -> int:
        """Width of the last stage (768 for Swin-T): the latent size."""
        return self.stage_dims[-1]

    @property
    def reduction(self) -> int:
        """Image pixels per last-stage token along each axis (4 x 2^3 = 32) at full resolution."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    @property
    def chunks(self) -> int:
        """Time chunks stacked into the full-resolution image (official ``freq_ratio``)."""
        return self.spec_size // self.mel_bins

    @property
    def target_frames(self) -> int:
        """Frames of the full-resolution image: the STFT frames are stretched to this (1024)."""
        return self.spec_size * self.chunks

    @property
    def empty_filters(self) -> bool:
        """Whether ``fmax`` lies above the Nyquist frequency (the official Speech Commands front end): the filters
        above it are empty."""
        return self.fmax > self.sample_rate / 2

    @property
    def clip_seconds(self) -> float:
        return self.clip_samples / self.sample_rate

    def replace(self, **changes) -> "HTSATConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain data (tuples as lists), e.g. for safetensors metadata or a resolved recipe."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict, prefix: str = "model") -> "HTSATConfig":
        """Build and validate a config from plain data; an unknown or ill-typed key is an error naming it.

        Args:
            data: field values (missing ones take the official defaults).
            prefix: key path put in front of error messages (``model.depths: ...``).
        """
        return build(cls, dict(data), prefix)


def _given(settings) -> dict:
    """The settings given (not None), as :class:`HTSATConfig` fields."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
            if getattr(settings, f.name) is not None}


# A recipe's ``model.htsat``: every HTSATConfig field, typed as there, None where the recipe gives none (those take
# the init's value, or the official model's: ``ModelSpec.htsat_config``). Derived from HTSATConfig, so that the two
# never disagree; a recipe writes back only what it gave (``RECIPE_SPARSE``).
HTSATSettings = dataclasses.make_dataclass(
    "HTSATSettings",
    [(f.name, f"{f.type} | None", dataclasses.field(default=None)) for f in dataclasses.fields(HTSATConfig)],
    frozen=True,
    namespace={"__doc__": "HTS-AT's settings a recipe gives (``model.htsat``); None: not given (the init's, or the "
                          "official model's value).\n" + (HTSATConfig.__doc__ or "").split("\n", 1)[-1],
               "RECIPE_SPARSE": True, "given": _given, "__bool__": lambda self: bool(_given(self))})
HTSATSettings.__module__ = __name__
