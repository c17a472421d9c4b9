"""Official HTS-AT checkpoints: a Lightning-style file with the documented keys loads, every weight lands
where it belongs, and the frozen front-end weights are checked; AudioSet class names."""

import re

import numpy as np
import pytest
import torch

from common.models.htsat import (
    HEAD_PREFIXES,
    HTSAT,
    HTSATConfig,
    HTSATFrontEnd,
    class_names,
    load_official_checkpoint,
    looks_official,
)
from tests.helpers import HTSAT_CLASSES as CLASSES
from tests.helpers import HTSAT_DEPTHS as DEPTHS
from tests.helpers import HTSAT_DIM as DIM
from tests.helpers import HTSAT_HEADS as HEADS
from tests.helpers import official_state, real_looking_signals, save_lightning


def our_key(official: str) -> str | None:
    """Where the test expects each official tensor (None: dropped)."""
    if official.startswith(("spectrogram_extractor.", "logmel_extractor.", "head.")) or \
            official.endswith(("attn_mask", "relative_position_index")):
        return None
    m = re.fullmatch(r"layers\.(\d)\.downsample\.(.+)", official)
    if m:
        return f"swin.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    return official if official.startswith(("bn0.", "tscam_conv.")) else f"swin.{official}"


@pytest.mark.slow
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
    with pytest.raises(ValueError, match=r"scv2_like.ckpt: logmel_extractor.melW .* neither official front end"):
        load_official_checkpoint(path, clip_samples=64000)
    with pytest.raises(ValueError, match=r"scv2_like.ckpt: logmel_extractor.melW .* fmax=14000.0"):
        load_official_checkpoint(path, clip_samples=64000, sample_rate=32000)  # a filterbank given is checked
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


def test_an_official_speech_commands_checkpoint_loads_with_its_own_front_end(tmp_path, capsys):
    """The official SCV2 model changes only sample_rate (16000) and hop_size (160) in config.py: its frozen filterbank
    keeps fmax 14000 above the 8 kHz Nyquist frequency (9 empty filters). The file's melW says which front end it is;
    the model rebuilds that filterbank exactly, scores with sigmoids (clip_bce) and hears a 1 s clip repeated to its
    10 s, as SCV2_Dataset fed it."""
    import json

    import soundfile as sf

    from common.models.htsat import mel_filterbank
    from common.models.spec import ModelSpec
    from common.models.weights import load_encoder_state
    from common.phases.init import task_encoder_config
    from finetune.predict import main as predict

    state = official_state(classes=35, sample_rate=16000)
    path = tmp_path / "HTSAT_SCV2_Saved_2.ckpt"
    save_lightning(state, path)
    cfg, _ = load_official_checkpoint(path)
    assert (cfg.sample_rate, cfg.hop_length, cfg.clip_samples, cfg.fmin, cfg.fmax) == (16000, 160, 160000, 50, 14000)
    ours = mel_filterbank(cfg)
    assert (ours - state["logmel_extractor.melW"]).abs().max() < 1e-6 and int((ours.sum(0) == 0).sum()) == 9
    weights = load_encoder_state(path)
    assert weights.meta["loss"] == "bce" and weights.meta["clips"] == {"pad": "repeat"}
    assert task_encoder_config(weights, ModelSpec(arch="htsat"), 128, 1024) == cfg  # a fine-tune keeps its filterbank
    rng = np.random.default_rng(0)
    second = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    sf.write(tmp_path / "one.wav", second, 16000, subtype="FLOAT")
    sf.write(tmp_path / "ten.wav", np.tile(second, 10), 16000, subtype="FLOAT")
    assert predict(["--ckpt", str(path), "--json", str(tmp_path / "one.wav"), str(tmp_path / "ten.wav")]) == 0
    one, ten = (np.array(list(r["scores"].values())) for r in json.loads(capsys.readouterr().out))
    assert one.shape == (35,) and np.allclose(one, ten, atol=1e-5)
    # a model whose weights were not trained with empty filters is refused them, in one line
    scratch = ModelSpec(arch="htsat", htsat={"sample_rate": 16000, "hop_length": 160, "clip_samples": 160000})
    with pytest.raises(ValueError, match=r"^model.htsat.fmax: 14000 Hz lies above the Nyquist frequency of "
                                         r"sample_rate 16000 \(8000 Hz\).*give model.htsat.fmax <= 8000$"):
        task_encoder_config(None, scratch, 128, 1024)


def test_a_filterbank_of_no_official_front_end_is_refused_without_advice_a_command_cannot_take(tmp_path):
    path = tmp_path / "other.ckpt"
    save_lightning(official_state(fmax=8000.0), path)
    with pytest.raises(ValueError) as err:
        load_official_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: logmel_extractor.melW (shape (513, 64)) is the slaney filterbank of neither "
                              f"official front end (AudioSet / ESC-50 (32 kHz), Speech Commands V2 (16 kHz)")
    assert message.endswith("which this package cannot read") and "override" not in message and "\n" not in message
