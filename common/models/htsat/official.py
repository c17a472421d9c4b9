"""Official HTS-AT checkpoints -> :class:`~common.models.htsat.config.HTSATConfig` + a state dict of our model.

The official code (RetroCirce/HTS-Audio-Transformer) saves PyTorch Lightning checkpoints,
``{"state_dict": {"sed_model.<key>": tensor, ...}, ...}``. The key map to :class:`~common.models.htsat.model.HTSAT`:

- ``patch_embed.*``, ``layers.*``, ``norm.*`` -> ``swin.*``, except that the official model merges
  patches at the end of stages 0-2 and timm at the start of stages 1-3:
  ``layers.{i}.downsample.*`` -> ``swin.layers.{i+1}.downsample.*``;
- ``bn0.*`` and ``tscam_conv.*`` keep their names;
- dropped: ``attn_mask`` and ``relative_position_index`` (buffers, recomputed by timm), ``head.*``
  (a ``Linear(K, K)`` the token-semantic path never calls), and the frozen torchlibrosa extractors
  ``spectrogram_extractor.*`` / ``logmel_extractor.*``, which are not trusted blindly: they are
  compared with our own STFT basis and mel filterbank for the config, and a mismatch is an error.

Sizes are read from the weights (embed dim, patch, depths, heads, window, mel bins, classes, image
side from the shifted-window masks). The front end is the official config whose filterbank the frozen
``logmel_extractor.melW`` is (:data:`OFFICIAL_FRONT_ENDS`): AudioSet's and ESC-50's 32 kHz, hop 320, or Speech
Commands V2's 16 kHz, hop 160, whose config.py keeps AudioSet's fmax 14000 above its Nyquist frequency (9 of its
64 filters are empty); the hop and the clip length go with the sample rate in the official configs. A file without
``melW`` takes AudioSet's, and one whose filterbank is neither is refused. Dropout takes the official values unless
overridden.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from common.models.htsat.config import HTSATConfig
from common.models.htsat.frontend import mel_filterbank
from common.models.htsat.geometry import swin_depths
from common.models.htsat.model import HTSAT

__all__ = ["OFFICIAL_PREFIX", "ESC50_CLASSES", "OFFICIAL_FRONT_ENDS", "looks_official", "unwrap_official",
           "config_from_official", "convert_official", "load_official_checkpoint", "official_clips"]

OFFICIAL_PREFIX = "sed_model."
_EXTRACTORS = ("spectrogram_extractor.", "logmel_extractor.")
_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(.+)")
ESC50_CLASSES = 50  # an official head of this size is ESC-50's (esc_config.py: classes_num = 50)
# the official configs' front ends (config.py: "16000 for scv2", "160 for scv2", clip_samples = sample_rate * 10;
# fmin 50 and fmax 14000 in both): what a checkpoint's frozen mel filterbank tells apart
OFFICIAL_FRONT_ENDS = {
    "AudioSet / ESC-50 (32 kHz)": {"sample_rate": 32000, "hop_length": 320, "clip_samples": 320000},
    "Speech Commands V2 (16 kHz)": {"sample_rate": 16000, "hop_length": 160, "clip_samples": 160000},
}
_FILTERBANK_KEYS = ("sample_rate", "fmin", "fmax")  # given: the filterbank is checked against them, not inferred
_SCV2 = OFFICIAL_FRONT_ENDS["Speech Commands V2 (16 kHz)"]


def official_clips(cfg: HTSATConfig) -> dict:
    """How the official code filled the clips an official checkpoint was trained on, as an export records it
    (``clips``; empty: zero-padded, AudioSet's ``SEDDataset``): ESC-50's head (50 classes) heard each 5 s clip
    twice (``ESC_Dataset`` concatenates it with itself to 10 s), Speech Commands' 16 kHz model each 1 s clip
    repeated to 10 s (``SCV2_Dataset``), so a short clip is repeated (``pad: repeat``)."""
    scv2 = all(getattr(cfg, key) == value for key, value in _SCV2.items())
    return {"pad": "repeat"} if cfg.num_classes == ESC50_CLASSES or scv2 else {}


def unwrap_official(obj: dict) -> dict[str, torch.Tensor]:
    """The model's tensors from a Lightning checkpoint (or a bare state dict), ``sed_model.`` stripped."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict (a mapping of tensors), got {type(state).__name__}")
    if any(k.startswith(OFFICIAL_PREFIX) for k in state):
        state = {k[len(OFFICIAL_PREFIX):]: v for k, v in state.items() if k.startswith(OFFICIAL_PREFIX)}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def looks_official(obj: dict) -> bool:
    """Whether ``obj`` (a checkpoint or state dict) holds an official HTS-AT model."""
    try:
        state = unwrap_official(obj)
    except ValueError:
        return False
    return "tscam_conv.weight" in state and "layers.0.blocks.0.attn.relative_position_bias_table" in state


def _require(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"not an official HTS-AT state dict: no {key!r} (keys start with {sorted(state)[:4]})")
    return state[key]


def _image_side(state: dict[str, torch.Tensor], window: int, patch: int, stages: int) -> int | None:
    """The full-resolution image side, from a stage's grid: a shifted block's mask ``[windows, w^2, w^2]``
    tiles the grid with ``w x w`` windows, and a window smaller than ``window_size`` equals its grid."""
    for stage in range(stages):
        table = state[f"layers.{stage}.blocks.0.attn.relative_position_bias_table"]
        stage_window = (math.isqrt(table.shape[0]) + 1) // 2
        masks = [v for k, v in state.items() if k.startswith(f"layers.{stage}.blocks.") and k.endswith("attn_mask")
                 and v.dim() == 3]
        if masks:
            grid = math.isqrt(masks[0].shape[0]) * stage_window
        elif stage_window < window:
            grid = stage_window
        else:
            continue
        return grid * patch * 2**stage
    return None


def config_from_official(state: dict[str, torch.Tensor], **overrides) -> HTSATConfig:
    """Read the model sizes from official weights (``sed_model.`` already stripped).

    Args:
        state: the official state dict.
        overrides: :class:`HTSATConfig` fields the weights do not determine (``sample_rate``,
            ``hop_length``, ``fmin``, ``fmax``, ``clip_samples``, dropout rates), or ``spec_size`` when the
            checkpoint has no shifted-window mask to read it from.
    """
    if "absolute_pos_embed" in state:
        raise ValueError("this HTS-AT checkpoint uses an absolute position embedding (ape=True), which the "
                         "official recipes never enable and this package does not build")
    if "tscam_conv.weight" not in state:
        raise ValueError("this HTS-AT checkpoint has no token-semantic head (tscam_conv): only the official "
                         "enable_tscam=True model is supported")
    embed = _require(state, "patch_embed.proj.weight")  # [D, 1, p, p]
    if embed.shape[1] != 1 or embed.shape[2] != embed.shape[3]:
        raise ValueError(f"patch_embed.proj.weight has shape {tuple(embed.shape)}; expected [D, 1, p, p]")
    depths = swin_depths(state, "official HTS-AT")
    stages = range(len(depths))
    heads = tuple(int(_require(state, f"layers.{i}.blocks.0.attn.relative_position_bias_table").shape[1])
                  for i in stages)
    rows = _require(state, "layers.0.blocks.0.attn.relative_position_bias_table").shape[0]
    window = (math.isqrt(rows) + 1) // 2
    embed_dim, patch = int(embed.shape[0]), int(embed.shape[2])
    fc1 = _require(state, "layers.0.blocks.0.mlp.fc1.weight")
    found = dict(embed_dim=embed_dim, patch_size=patch, depths=depths, num_heads=heads, window_size=window,
                 mlp_ratio=fc1.shape[0] / embed_dim, qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state,
                 mel_bins=int(_require(state, "bn0.weight").shape[0]),
                 num_classes=int(state["tscam_conv.weight"].shape[0]))
    side = _image_side(state, window, patch, len(stages))
    if side is not None:
        found["spec_size"] = side
    if "spectrogram_extractor.stft.conv_real.weight" in state:
        found["n_fft"] = int(state["spectrogram_extractor.stft.conv_real.weight"].shape[-1])
    clash = {k: (v, overrides[k]) for k, v in found.items() if k in overrides and overrides[k] != v}
    if clash:
        raise ValueError("overrides contradict the checkpoint's weights: "
                         + ", ".join(f"{k}={o!r} but the weights say {v!r}" for k, (v, o) in clash.items()))
    if "logmel_extractor.melW" in state and not any(k in overrides for k in _FILTERBANK_KEYS):
        found.update(_front_end(state["logmel_extractor.melW"], found, overrides))
    return HTSATConfig.from_dict({**found, **overrides}, prefix="official checkpoint")


def _front_end(mel: torch.Tensor, found: dict, overrides: dict) -> dict:
    """The official front end (:data:`OFFICIAL_FRONT_ENDS`) whose slaney filterbank ``mel`` is, exactly."""
    for settings in OFFICIAL_FRONT_ENDS.values():
        try:
            cfg = HTSATConfig.from_dict({**found, **settings, **overrides}, prefix="official checkpoint")
        except ValueError:  # sizes this front end cannot take (an image too small for its clip)
            continue
        ours = mel_filterbank(cfg).double()
        if mel.shape == ours.shape and (mel.double() - ours).abs().max().item() <= 1e-5:
            return settings
    base = HTSATConfig()
    raise ValueError(f"logmel_extractor.melW (shape {tuple(mel.shape)}) is the slaney filterbank of neither official "
                     f"front end ({', '.join(OFFICIAL_FRONT_ENDS)}; fmin {base.fmin:g}, fmax {base.fmax:g}): the "
                     f"checkpoint was trained with another front end, which this package cannot read")


def _check_extractors(state: dict[str, torch.Tensor], cfg: HTSATConfig) -> None:
    """Compare the frozen torchlibrosa STFT basis and mel filterbank with ours for ``cfg``."""
    real = state.get("spectrogram_extractor.stft.conv_real.weight")
    if real is not None:
        n = torch.arange(cfg.n_fft, dtype=torch.float64)
        k = torch.arange(cfg.n_fft // 2 + 1, dtype=torch.float64)
        window = torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float64)
        basis = torch.cos(2 * math.pi * k[:, None] * n[None, :] / cfg.n_fft) * window  # [freqs, n_fft]
        err = (real.double().reshape(basis.shape) - basis).abs().max().item() if real.numel() == basis.numel() \
            else math.inf
        if err > 1e-4:
            raise ValueError(f"spectrogram_extractor.stft.conv_real.weight is not a periodic-Hann STFT basis of "
                             f"n_fft={cfg.n_fft} (max deviation {err:.3g})")
    mel = state.get("logmel_extractor.melW")
    if mel is not None:
        ours = mel_filterbank(cfg).double()
        err = (mel.double() - ours).abs().max().item() if mel.shape == ours.shape else math.inf
        if err > 1e-5:
            raise ValueError(
                f"logmel_extractor.melW (shape {tuple(mel.shape)}) differs from the slaney filterbank for "
                f"sample_rate={cfg.sample_rate}, n_fft={cfg.n_fft}, mel_bins={cfg.mel_bins}, fmin={cfg.fmin}, "
                f"fmax={cfg.fmax} (max deviation {err:.3g}): the checkpoint was trained with another front end")


def convert_official(state: dict[str, torch.Tensor], cfg: HTSATConfig) -> dict[str, torch.Tensor]:
    """Map official keys (``sed_model.`` stripped) onto :class:`~common.models.htsat.model.HTSAT`'s, checking the
    frozen front-end weights against ``cfg``. Tensors are passed through unchanged."""
    _check_extractors(state, cfg)
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(_EXTRACTORS) or key.startswith("head.") or key.endswith(
                ("attn_mask", "relative_position_index")):
            continue
        m = _DOWNSAMPLE.match(key)
        if m:
            out[f"swin.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = value
        elif key.startswith(("patch_embed.", "layers.", "norm.")):
            out[f"swin.{key}"] = value
        elif key.startswith(("bn0.", "tscam_conv.")):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in the official HTS-AT state dict: {unknown[:8]}")
    _check_against_model(out, cfg)
    return out


def _check_against_model(state: dict[str, torch.Tensor], cfg: HTSATConfig) -> None:
    """Every key and shape of the model built for ``cfg`` (on the meta device: no memory, no time)."""

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in HTSAT(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        raise ValueError(f"official HTS-AT weights do not fit the model for {cfg}: missing {missing[:6]}, "
                         f"unexpected {extra[:6]}, wrong shapes {wrong[:6]}")


def load_official_checkpoint(path: str | Path, **overrides) -> tuple[HTSATConfig, dict[str, torch.Tensor]]:
    """Load an official HTS-AT checkpoint (Lightning ``.ckpt`` or bare state dict) with ``weights_only``.

    Args:
        path: the checkpoint file.
        overrides: config fields the weights do not determine (see :func:`config_from_official`).

    Returns:
        ``(config, state dict)`` ready for ``HTSAT(config).load_state_dict(state)`` (full resolution).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HTS-AT checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in several types; name the file either way
        raise ValueError(f"{path}: cannot be loaded with torch.load(weights_only=True): {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    state = unwrap_official(obj)
    if not looks_official(state):
        raise ValueError(f"{path}: not an official HTS-AT checkpoint (no sed_model.tscam_conv / layers.* keys)")
    try:
        cfg = config_from_official(state, **overrides)
        return cfg, convert_official(state, cfg)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
