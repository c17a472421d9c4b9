"""ImageNet Swin weights as HTS-AT's start (the official HTS-AT's swin_pretrain_path): randomly initialised timm
Swins saved in timm's layout (.pth, .safetensors) and in Microsoft's (made from them by the documented key map)
load as --init: every backbone weight lands where it belongs, the patch kernel is averaged over RGB, the tables
are fitted to HTS-AT's window, and the loaded backbone computes what the ImageNet network computes."""

import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch

from common.audio.compression import Compression
from common.cli import PLAN_NOT_READY
from common.models.arch import architecture_for
from common.models.htsat import HTSAT, HTSATConfig, resize_bias_table
from common.models.htsat.imagenet import convert_imagenet_swin
from common.models.weights import load_encoder_state
from common.phases.init import expected_init_note, init_kind, task_encoder_config
from finetune.run import main as finetune
from tests.helpers import _synth_root, sets

ROOT = Path(__file__).resolve().parents[2]
# a tiny Swin (HTS-AT's layout: 4 stages, patch 4) whose ImageNet windows (3) differ from the run's (4)
SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
# the run's HTS-AT: the built-in corpus's 16 kHz clips, 32 mel bins, a 64 x 64 image of 2 chunks, window 4
RUN = dict(sample_rate=16000, clip_samples=20320, n_fft=512, hop_length=160, mel_bins=32, fmax=8000.0,
           spec_size=64, window_size=4, drop_path_rate=0.0, num_classes=12)


def timm_swin(window: int = 3, seed: int = 0, **sizes):
    """A randomly initialised timm Swin image classifier (3 channels, 10 classes) with windows ``window``."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    sizes = {**SWIN, **sizes}
    model = SwinTransformer(img_size=window * 4 * 8, patch_size=4, in_chans=3, num_classes=10, window_size=window,
                            **sizes)
    with torch.no_grad():  # timm zero-initialises the tables: make them tell blocks and offsets apart
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_(0, 0.5)
    return model.eval()


def microsoft_layout(state: dict) -> dict:
    """timm's Swin state dict in Microsoft's layout (the official HTS-AT's too): patch merging at the end of
    stages 0..n-2, ``head.*``, and the buffers Microsoft's checkpoints store."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        key = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else key.replace("head.fc.", "head.")
        out[key] = value
        if key.endswith("relative_position_bias_table"):
            w = (int(value.shape[0] ** 0.5) + 1) // 2
            out[key.replace("relative_position_bias_table", "relative_position_index")] = \
                torch.zeros(w * w, w * w, dtype=torch.long)
            if ".blocks.1." in key:
                out[key.replace("attn.relative_position_bias_table", "attn_mask")] = torch.zeros(4, w * w, w * w)
    return out


def save(model, path: Path, layout: str) -> Path:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if layout == "timm.safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif layout == "timm":
        torch.save(state, path)
    else:  # as Microsoft's Swin-Transformer saves them: {"model": ..., "epoch": ...}
        torch.save({"model": microsoft_layout(state), "epoch": 300, "max_accuracy": 81.6}, path)
    return path


def run_arch(init, **overrides):
    """The run's architecture as finetune/run.py makes it: the init's Swin sizes, the run's other settings."""
    return architecture_for(init.config.replace(**{**RUN, **overrides}))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["timm", "timm.safetensors", "microsoft"])
def test_an_imagenet_swin_loads_every_weight_where_it_belongs(tmp_path, layout):
    swin = timm_swin(window=3)
    suffix = ".safetensors" if layout.endswith("safetensors") else ".pth"
    init = load_encoder_state(save(swin, tmp_path / f"swin{suffix}", layout))
    assert init.arch == "htsat" and init.meta["source"] == "imagenet" and init_kind(init) == "imagenet"
    assert init.meta["swin_layout"] == ("microsoft" if layout == "microsoft" else "timm")
    assert init.meta["swin_windows"] == [3, 3, 3, 3]
    cfg = init.config
    assert (cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.patch_size, cfg.mlp_ratio, cfg.qkv_bias) == \
        (16, (2, 2, 2, 2), (1, 2, 2, 4), 4, 4.0, True)
    theirs = swin.state_dict()
    # every backbone weight under swin.*, at timm's index (Microsoft's downsample moves to the next stage)
    assert set(init.state) == {f"swin.{k}" for k in theirs if not k.startswith("head.")}
    for key, value in theirs.items():
        if key.startswith("head."):
            continue
        if key == "patch_embed.proj.weight":  # HTS-AT is mono: the kernel averaged over RGB, as the official code
            assert torch.allclose(init.state["swin.patch_embed.proj.weight"], value.mean(dim=1, keepdim=True))
        else:
            assert torch.equal(init.state[f"swin.{key}"], value), key

    # into a run's model: a full-resolution 64 x 64 image, window 4 (stage grids 16, 8, 4, 2)
    arch = run_arch(init)
    geometry = arch.geometry(Compression())
    model = arch.build_classifier(geometry, 12, "tscam")
    bn0 = {k: v.clone() for k, v in model.encoder.bn0.state_dict().items()}
    arch.load_weights(model.encoder, init, geometry, "cut", "pi")
    own = model.encoder.state_dict()
    for stage, window in enumerate((4, 4, 4, 2)):  # every table fitted from 3 x 3 to its block's window
        for block in range(2):
            key = f"swin.layers.{stage}.blocks.{block}.attn.relative_position_bias_table"
            assert own[key].shape == ((2 * window - 1) ** 2, SWIN["num_heads"][stage])
            assert torch.allclose(own[key], resize_bias_table(init.state[key], (3, 3), (window, window)))
    assert all(torch.equal(own[k], v) for k, v in init.state.items() if "relative_position_bias_table" not in k)
    assert all(torch.equal(model.encoder.bn0.state_dict()[k], v) for k, v in bn0.items())  # bn0 starts afresh


@pytest.mark.slow
def test_the_loaded_backbone_computes_what_the_imagenet_network_computes(tmp_path):
    """A mono image x through the loaded Swin equals the ImageNet network on x / 3 in each RGB channel (the mean
    kernel), once timm's own set_input_size gives the ImageNet model the run's windows."""
    swin = timm_swin(window=3, seed=1)
    init = load_encoder_state(save(swin, tmp_path / "swin.pth", "microsoft"))
    arch = run_arch(init)
    geometry = arch.geometry(Compression())
    model = HTSAT(geometry.cfg, geometry.geom).eval()
    arch.load_weights(model, init, geometry, "cut", "pi")
    with warnings.catch_warnings():  # timm's table interpolator trips a torch deprecation warning
        warnings.filterwarnings("ignore", message=".*non-tuple sequence.*")
        swin.set_input_size(img_size=geometry.geom.image, window_size=4)
    image = torch.randn(2, 1, *geometry.geom.image)
    with torch.no_grad():
        ours = model.swin.forward_features(image)
        reference = swin.forward_features(image.repeat(1, 3, 1, 1) / 3)
    assert ours.shape == reference.shape == (2, 2, 2, 128)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_a_coarse_first_phase_takes_the_imagenet_start_too(tmp_path):
    """Table 6's runs start coarse: the 128 x 128-style image of Fshift x4 (here 32 x 32, windows 4, 4, 2, 1)."""
    init = load_encoder_state(save(timm_swin(window=4), tmp_path / "swin4.pth", "timm"))
    arch = run_arch(init)
    geometry = arch.geometry(Compression("fshift", 4))
    model = arch.build_classifier(geometry, 12, "tscam")
    arch.load_weights(model.encoder, init, geometry, "cut", "pi")
    own = model.encoder.state_dict()
    key = "swin.layers.0.blocks.0.attn.relative_position_bias_table"
    assert torch.equal(own[key], init.state[key])  # window 4 in the file and in the model: untouched
    assert own["swin.layers.3.blocks.0.attn.relative_position_bias_table"].shape == (1, 4)  # a 1 x 1 window


def test_the_initial_tables_are_fitted_as_the_recipe_says(tmp_path):
    """``transfer.rel_pos_bias`` applies to the init's tables as to a phase change's (it was always timm's)."""
    from common.models.htsat.adapt import resize_bias_table

    init = load_encoder_state(save(timm_swin(window=4), tmp_path / "swin4.pth", "timm"))
    arch = run_arch(init)
    geometry = arch.geometry(Compression("fshift", 4))  # windows 4, 4, 2, 1: stage 2's 7 x 7 tables become 3 x 3
    key = "swin.layers.2.blocks.0.attn.relative_position_bias_table"
    got = {}
    for mode in ("timm", "bicubic"):
        model = arch.build_classifier(geometry, 12, "tscam")
        arch.load_weights(model.encoder, init, geometry, "cut", "pi", mode)
        got[mode] = model.encoder.state_dict()[key]
        assert torch.allclose(got[mode], resize_bias_table(init.state[key], (4, 4), (2, 2), mode)), mode
    assert not torch.allclose(got["timm"], got["bicubic"])


def test_the_official_start_fits_the_official_model_exactly():
    """Swin-T/C24 (swin_tiny_c24_patch4_window8_256.pth: 256 x 256, window 8, heads 4-8-16-32) in Microsoft's
    layout gives the official HTS-AT config and every backbone key and shape of the default model, no table
    resized; the standard Swin-T (timm's swin_tiny_patch4_window7_224) gives its own heads and 13 x 13 tables.
    Built on the meta device: no memory, no time."""
    from timm.models.swin_transformer import SwinTransformer

    with torch.device("meta"):
        c24 = SwinTransformer(img_size=256, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(4, 8, 16, 32),
                              window_size=8, num_classes=1000).state_dict()
        tiny = SwinTransformer(img_size=224, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                               window_size=7, num_classes=1000).state_dict()
        expected = {k: v.shape for k, v in HTSAT(HTSATConfig()).state_dict().items()}
    cfg, state, info = convert_imagenet_swin(microsoft_layout(c24), "swin_tiny_c24_patch4_window8_256.pth")
    assert cfg == HTSATConfig() and info["layout"] == "microsoft" and info["windows"] == [8, 8, 8, 8]
    backbone = {k: v for k, v in expected.items() if k.startswith("swin.")}
    assert {k: v.shape for k, v in state.items()} == backbone  # bn0 and tscam_conv are all it lacks
    assert set(expected) - set(backbone) == {"bn0.weight", "bn0.bias", "bn0.running_mean", "bn0.running_var",
                                             "bn0.num_batches_tracked", "tscam_conv.weight", "tscam_conv.bias"}
    cfg, state, info = convert_imagenet_swin(tiny, "swin_tiny_patch4_window7_224.safetensors")
    assert cfg.num_heads == (3, 6, 12, 24) and info == {**info, "layout": "timm", "windows": [7, 7, 7, 7]}
    assert state["swin.layers.3.blocks.1.attn.relative_position_bias_table"].shape == (169, 24)


def test_a_swin_that_is_not_the_official_start_is_said(caplog):
    from common.models.spec import ModelSpec
    from common.models.weights import EncoderWeights

    spec = ModelSpec(arch="htsat")
    c24 = EncoderWeights(HTSATConfig(), {}, {"source": "imagenet", "arch": "htsat", "file": "c24.pth",
                                              "swin_windows": [8, 8, 8, 8]})
    with caplog.at_level(logging.WARNING):
        assert task_encoder_config(c24, spec, 128, 1024) == HTSATConfig()
    assert not caplog.records
    standard = c24._replace(config=HTSATConfig(num_heads=(3, 6, 12, 24)),
                            meta={**c24.meta, "file": "swin_tiny_patch4_window7_224.pth", "swin_windows": [7] * 4})
    with caplog.at_level(logging.WARNING):
        cfg = task_encoder_config(standard, spec, 128, 1024)
    assert cfg.num_heads == (3, 6, 12, 24) and cfg.window_size == 8
    assert "heads [3, 6, 12, 24] and window 7" in caplog.text and "swin_tiny_c24_patch4_window8_256.pth" in caplog.text
    assert "The model keeps the file's sizes (heads [3, 6, 12, 24]) and takes the run's window 8" in caplog.text
    # a recipe's model.htsat that changes the file's sizes is refused here, in one line naming the keys, as the
    # weights' load refuses it later (a dry-run planned the recipe's model, and the warning said the file's heads)
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as err:
        task_encoder_config(standard, ModelSpec(arch="htsat", htsat={"num_heads": [1, 2, 4, 8],
                                                                     "depths": [1, 1, 1, 1]}), 128, 1024)
    assert str(err.value) == ("model.htsat: --init swin_tiny_patch4_window7_224.pth holds an ImageNet Swin, whose "
                              "sizes the model keeps; the recipe changes depths [2, 2, 6, 2] -> [1, 1, 1, 1], "
                              "num_heads [3, 6, 12, 24] -> [1, 2, 4, 8]: leave these keys out, or start from scratch "
                              "(--init none)")
    assert not caplog.records
    # what the file does not fix is the run's (the window, the front end)
    assert task_encoder_config(c24, ModelSpec(arch="htsat", htsat={"window_size": 4}), 128, 1024).window_size == 4


@pytest.mark.slow
def test_swin_files_it_cannot_use_are_refused_with_the_reason(tmp_path):
    state = timm_swin().state_dict()
    v2 = {**state, "layers.0.blocks.0.attn.logit_scale": torch.zeros(1, 1, 1)}
    torch.save(v2, tmp_path / "v2.pth")
    with pytest.raises(ValueError, match=r"v2.pth: a Swin Transformer V2"):
        load_encoder_state(tmp_path / "v2.pth")
    torch.save({**state, "absolute_pos_embed": torch.zeros(1, 64, 16)}, tmp_path / "ape.pth")
    with pytest.raises(ValueError, match=r"ape.pth: this Swin uses an absolute position embedding"):
        load_encoder_state(tmp_path / "ape.pth")
    torch.save({**state, "fc_norm.weight": torch.zeros(16)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd.pth: keys an ImageNet Swin Transformer does not have: \['fc_norm"):
        load_encoder_state(tmp_path / "odd.pth")
    # the Swin's sizes are the weights': a recipe asking for others is told which
    init = load_encoder_state(save(timm_swin(), tmp_path / "swin.pth", "timm"))
    arch = run_arch(init, embed_dim=32)
    geometry = arch.geometry(Compression())
    with pytest.raises(ValueError, match=r"another model config \(embed_dim 16 -> 32\)"):
        arch.load_weights(HTSAT(geometry.cfg, geometry.geom), init, geometry, "cut", "pi")


@pytest.mark.slow
def test_expected_init_says_when_a_run_does_not_start_as_the_paper(tmp_path, capsys):
    assert expected_init_note("any", None, "none") is None
    assert expected_init_note("none", None, "none") is None
    note = expected_init_note("imagenet", None, "none")
    assert note.startswith("expected_init: this recipe starts from ImageNet weights") and "--init none" in note
    # the Table 6 recipes expect the ImageNet start and print it in the plan when --init is another
    assert finetune(["--init", "none", "--task", "vggsound", "--recipe",
                     str(ROOT / "recipes" / "ft_htsat_vggsound_fshift4.yaml"), "--dry-run"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "warning: expected_init: this recipe starts from ImageNet weights" in out
    swin = save(timm_swin(window=3), tmp_path / "swin.pth", "microsoft")
    assert finetune(["--init", str(swin), "--task", "audioset", "--recipe",
                     str(ROOT / "recipes" / "htsat_audioset.yaml"), "--dry-run"]) == PLAN_NOT_READY
    assert "expected_init" not in capsys.readouterr().out
    from finetune.recipe import load_recipe

    assert load_recipe("esc50", ROOT / "recipes" / "htsat_esc50.yaml").expected_init == "audio"
    for name, task in (("htsat_audioset", "audioset"), ("ft_htsat_audioset_fshift4", "audioset"),
                       ("htsat_vggsound", "vggsound"), ("ft_htsat_vggsound_fshift4", "vggsound")):
        assert load_recipe(task, ROOT / "recipes" / f"{name}.yaml").expected_init == "imagenet", name


@pytest.mark.slow
def test_a_coarse_to_fine_fine_tune_starts_from_an_imagenet_swin(tmp_path, synth_corpus):
    data = _synth_root(tmp_path, synth_corpus)
    swin = save(timm_swin(window=3, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)), tmp_path / "swin.pth", "microsoft")
    run_dir = tmp_path / "run"
    front_end = ", ".join(f"{k}: {v}" for k, v in RUN.items() if k != "num_classes")
    argv = ["--init", str(swin), "--task", "synth", "--data-root", str(data), "--run-dir", str(run_dir),
            "--recipe", str(ROOT / "recipes" / "htsat_audioset.yaml"),
            *sets("model.arch=htsat", f"model.htsat={{{front_end}}}", "data.batch_size=4", "data.num_workers=0",
                  "train.log_every=1", "train.weight_average_from=null", "train.weight_average_top=null",
                  "phases=[{compression: fshift, factor: 4, epochs: 1}, {compression: none, epochs: 1}]")]
    assert finetune(argv) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [p["tokens_per_sample"] for p in ledger["phases"]] == [64, 256]
    log = (run_dir / "train.log").read_text()
    assert "ImageNet Swin backbone loaded" in log and "expected_init" not in log
    assert "relative-position table(s) resized, windows 3x3 -> 4x4" in log
