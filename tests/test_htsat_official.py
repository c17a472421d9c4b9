"""Official HTS-AT checkpoints: a Lightning-style file with the documented keys loads, every weight lands
where it belongs, and the frozen front-end weights are checked; AudioSet class names."""

import math
import re

import numpy as np
import pytest
import torch

from common.htsat import (
    HEAD_PREFIXES,
    HTSAT,
    HTSATConfig,
    HTSATFrontEnd,
    class_names,
    load_official_checkpoint,
    looks_official,
)
from tests.conftest import real_looking_signals
from tests.test_htsat_frontend import slaney_mel_numpy

DEPTHS, HEADS, DIM, CLASSES, WINDOW, PATCH = (2, 2, 2, 2), (1, 1, 2, 2), 8, 5, 8, 4


def relative_position_index(w: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def official_state(spec_size: int = 256, fmax: float = 14000.0, seed: int = 0,
                   classes: int = CLASSES) -> dict[str, torch.Tensor]:
    """The state dict the official HTSAT_Swin_Transformer writes (``model/htsat.py``), random values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    n, k = torch.arange(1024, dtype=torch.float64), torch.arange(513, dtype=torch.float64)
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / 1024)
    phase = 2 * math.pi * k[:, None] * n[None, :] / 1024
    s = {  # torchlibrosa's frozen extractors: a DFT basis times a periodic Hann window, librosa's mel filters
        "spectrogram_extractor.stft.conv_real.weight": (torch.cos(phase) * window).float()[:, None],
        "spectrogram_extractor.stft.conv_imag.weight": (-torch.sin(phase) * window).float()[:, None],
        "logmel_extractor.melW": torch.from_numpy(slaney_mel_numpy(32000, 1024, 64, 50.0, fmax)).float(),
        "bn0.weight": 1 + rnd(64), "bn0.bias": rnd(64), "bn0.running_mean": -40 + 10 * rnd(64),
        "bn0.running_var": 100 + 50 * rnd(64).abs(), "bn0.num_batches_tracked": torch.tensor(1234),
        "patch_embed.proj.weight": rnd(DIM, 1, PATCH, PATCH), "patch_embed.proj.bias": rnd(DIM),
        "patch_embed.norm.weight": 1 + rnd(DIM), "patch_embed.norm.bias": rnd(DIM),
    }
    grid = spec_size // PATCH
    for i, (depth, heads) in enumerate(zip(DEPTHS, HEADS)):
        dim, res = DIM * 2**i, grid // 2**i
        w = min(res, WINDOW)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            if j % 2 and res > WINDOW:  # shifted blocks keep their window mask ([windows, w^2, w^2], -100 / 0)
                s[p + "attn_mask"] = torch.where(rnd((res // w) ** 2, w * w, w * w) > 0, 0.0, -100.0)
            s.update({p + "norm1.weight": 1 + rnd(dim), p + "norm1.bias": rnd(dim),
                      p + "attn.relative_position_bias_table": rnd((2 * w - 1) ** 2, heads),
                      p + "attn.relative_position_index": relative_position_index(w),
                      p + "attn.qkv.weight": rnd(3 * dim, dim), p + "attn.qkv.bias": rnd(3 * dim),
                      p + "attn.proj.weight": rnd(dim, dim), p + "attn.proj.bias": rnd(dim),
                      p + "norm2.weight": 1 + rnd(dim), p + "norm2.bias": rnd(dim),
                      p + "mlp.fc1.weight": rnd(4 * dim, dim), p + "mlp.fc1.bias": rnd(4 * dim),
                      p + "mlp.fc2.weight": rnd(dim, 4 * dim), p + "mlp.fc2.bias": rnd(dim)})
        if i < len(DEPTHS) - 1:  # the official model merges patches at the end of a stage
            s.update({f"layers.{i}.downsample.reduction.weight": rnd(2 * dim, 4 * dim),
                      f"layers.{i}.downsample.norm.weight": 1 + rnd(4 * dim),
                      f"layers.{i}.downsample.norm.bias": rnd(4 * dim)})
    last = DIM * 2 ** (len(DEPTHS) - 1)
    s.update({"norm.weight": 1 + rnd(last), "norm.bias": rnd(last),
              "tscam_conv.weight": rnd(classes, last, 2, 3), "tscam_conv.bias": rnd(classes),
              "head.weight": rnd(classes, classes), "head.bias": rnd(classes)})
    return s


def save_lightning(state: dict, path, **extra) -> None:
    torch.save({"epoch": 7, "global_step": 7000, "pytorch-lightning_version": "1.5.9",
                "state_dict": {f"sed_model.{k}": v for k, v in state.items()}, **extra}, path)


def our_key(official: str) -> str | None:
    """Where the test expects each official tensor (None: dropped)."""
    if official.startswith(("spectrogram_extractor.", "logmel_extractor.", "head.")) or \
            official.endswith(("attn_mask", "relative_position_index")):
        return None
    m = re.fullmatch(r"layers\.(\d)\.downsample\.(.+)", official)
    if m:
        return f"swin.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    return official if official.startswith(("bn0.", "tscam_conv.")) else f"swin.{official}"


@pytest.mark.parametrize("spec_size", [256, 128])
def test_official_checkpoint_loads_every_weight_where_it_belongs(tmp_path, spec_size):
    state = official_state(spec_size)
    path = tmp_path / "HTSAT_AudioSet_Saved_1.ckpt"
    save_lightning(state, path)
    assert looks_official(torch.load(path, weights_only=True))
    cfg, ours = load_official_checkpoint(path, clip_samples=64000)
    assert cfg == HTSATConfig(clip_samples=64000, spec_size=spec_size, embed_dim=DIM, depths=DEPTHS, num_heads=HEADS,
                              num_classes=CLASSES)
    model = HTSAT(cfg).eval()
    model.load_state_dict(ours)  # strict: no key missing, none left over
    theirs = model.state_dict()
    landed = {our_key(k): k for k in state if our_key(k) is not None}
    assert set(landed) == set(theirs)
    for key, official in landed.items():
        assert torch.equal(theirs[key], state[official]), (key, official)
    assert torch.equal(model.swin.layers[1].downsample.reduction.weight, state["layers.0.downsample.reduction.weight"])
    assert torch.equal(model.bn0.running_var, state["bn0.running_var"])
    headless = {k: v for k, v in ours.items() if not k.startswith(HEAD_PREFIXES)}  # fine-tuning on other classes
    assert HTSAT(cfg.replace(num_classes=50)).load_state_dict(headless, strict=False).missing_keys == \
        ["tscam_conv.weight", "tscam_conv.bias"]
    with torch.no_grad():
        out = model(HTSATFrontEnd(cfg)(real_looking_signals(2, 2.0, 32000)))
    assert out["clipwise_output"].shape == (2, CLASSES) and torch.isfinite(out["clipwise_output"]).all()
    assert out["framewise_output"].shape == (2, cfg.target_frames, CLASSES)


def test_frozen_front_end_weights_are_checked(tmp_path):
    path = tmp_path / "scv2_like.ckpt"
    save_lightning(official_state(fmax=8000.0), path)
    with pytest.raises(ValueError, match=r"scv2_like.ckpt: logmel_extractor.melW .* fmax=14000.0"):
        load_official_checkpoint(path, clip_samples=64000)
    cfg, _ = load_official_checkpoint(path, clip_samples=64000, fmax=8000.0)  # told the right filterbank, it loads
    assert cfg.fmax == 8000.0
    state = official_state()
    state["spectrogram_extractor.stft.conv_real.weight"] *= 1.1
    save_lightning(state, path)
    with pytest.raises(ValueError, match="conv_real.weight is not a periodic-Hann STFT basis"):
        load_official_checkpoint(path, clip_samples=64000)


class NotATensor:
    pass


def test_bad_checkpoints_give_clear_errors(tmp_path):
    path = tmp_path / "x.ckpt"
    save_lightning(official_state(), path)
    with pytest.raises(ValueError, match="embed_dim=16 but the weights say 8"):
        load_official_checkpoint(path, clip_samples=64000, embed_dim=16)
    save_lightning(official_state(), path, hyper_parameters=NotATensor())
    with pytest.raises(ValueError, match=r"x.ckpt: cannot be loaded with torch.load\(weights_only=True\)"):
        load_official_checkpoint(path)
    torch.save({"state_dict": {"encoder.pos_embed": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="not an official HTS-AT checkpoint"):
        load_official_checkpoint(path)


def test_class_names():
    ids, names = class_names(527)
    assert len(ids) == 527 and names[ids[0]] == "Speech" and names[ids[-1]] == "Field recording"
    assert names["/m/05zppz"] == "Male speech, man speaking"
    ids, names = class_names(3)
    assert ids == ["class_0", "class_1", "class_2"] and names["class_1"] == "class_1"
    assert np.unique(class_names(527)[0]).size == 527
