import pytest
import torch

from common.models.ast.encoder import ASTEncoder
from common.models.exports import read_weights, save_encoder
from common.models.weights import load_encoder, load_encoder_state
from tests.helpers import ssast_pretrained_state


def test_export_round_trip(tmp_path, tiny_cfg):
    enc = ASTEncoder(tiny_cfg).eval()
    path = save_encoder(enc, tmp_path / "enc.safetensors", meta={"frontend": {"frame_shift_ms": 10.0}})
    loaded = load_encoder(path).eval()
    assert loaded.cfg == tiny_cfg
    x = torch.randn(2, 64, 32)
    assert torch.equal(loaded.forward_features(x), enc.forward_features(x))
    _, meta = read_weights(path)
    assert meta["frontend"] == {"frame_shift_ms": 10.0}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file


def test_the_same_export_is_the_same_bytes(tmp_path, tiny_cfg):
    """safetensors' writer orders the metadata as its hash map does, another order each call: two exports of the same
    weights differed in their bytes (a check of a resume by checksum failed every time). The header is rewritten in
    key order: the same export, the same bytes, and read back as written."""
    import hashlib
    import subprocess
    import sys

    from tests.helpers import ROOT

    enc = ASTEncoder(tiny_cfg).eval()
    meta = {"frontend": {"frame_shift_ms": 10.0}, "phase": {"name": "phase2"}, "recipe": {"é": [1, 2]}, "z": "\n"}
    paths = [save_encoder(enc, tmp_path / f"enc{i}.safetensors", meta=meta) for i in range(4)]
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    code = ("import sys, torch; from common.models.ast.encoder import ASTEncoder, EncoderConfig; "
            "from common.models.exports import save_encoder; torch.manual_seed(0); "
            f"save_encoder(ASTEncoder(EncoderConfig(**{tiny_cfg.to_dict()!r})), sys.argv[1], meta={meta!r})")
    torch.manual_seed(0)
    same = save_encoder(ASTEncoder(tiny_cfg), tmp_path / "here.safetensors", meta=meta)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there.safetensors")], check=True, timeout=120,
                   cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert len(digests) == 1 and same.read_bytes() == (tmp_path / "there.safetensors").read_bytes()
    tensors, read = read_weights(paths[0])
    assert read["frontend"] == meta["frontend"] and read["recipe"] == {"é": [1, 2]} and read["z"] == "\n"
    assert all(torch.equal(tensors[k], v) for k, v in enc.state_dict().items() if k in tensors)


def test_run_directory_resolves_to_its_final_export(tmp_path, tiny_cfg):
    (tmp_path / "export").mkdir()
    save_encoder(ASTEncoder(tiny_cfg), tmp_path / "export" / "phase1.safetensors")
    with pytest.raises(FileNotFoundError, match="no final export model.safetensors.*phase1.safetensors"):
        load_encoder(tmp_path)
    save_encoder(ASTEncoder(tiny_cfg), tmp_path / "model.safetensors")
    assert load_encoder(tmp_path).cfg == tiny_cfg
    checkpoint = tmp_path / "checkpoints" / "phase01-step000000002"  # DeepSpeed's files: no model, its exports are
    checkpoint.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"{checkpoint} is a training checkpoint of {tmp_path}, not a model: "
                                                f"name one of the run's exports in {tmp_path / 'export'}"):
        load_encoder(checkpoint)


def test_official_ssast_pretrained_pth(tmp_path):
    sd = ssast_pretrained_state()
    path = tmp_path / "SSAST-Tiny-Patch-400.pth"
    torch.save(sd, path)
    enc = load_encoder(path)
    cfg = enc.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_prefix_tokens) == (64, 2, 1, 2)
    assert (cfg.num_mel_bins, cfg.input_tdim, cfg.fshape, cfg.tshape, cfg.fstride, cfg.tstride) == \
        (128, 256, 16, 16, 16, 16)
    assert torch.equal(enc.prefix_tokens[:, 0], sd["module.v.cls_token"][:, 0])
    assert torch.equal(enc.prefix_tokens[:, 1], sd["module.v.dist_token"][:, 0])
    assert torch.equal(enc.blocks[1].mlp.fc2.weight, sd["module.v.blocks.1.mlp.fc2.weight"])
    assert torch.equal(enc.pos_embed, sd["module.v.pos_embed"])
    assert enc.forward_features(torch.randn(1, 256, 128)).shape == (1, 2 + 128, 64)


def test_official_ssast_frame_model(tmp_path):
    sd = ssast_pretrained_state(fshape=128, tshape=2, tdim=64)
    torch.save(sd, tmp_path / "frame.pth")
    cfg = load_encoder(tmp_path / "frame.pth").cfg
    assert cfg.grid == (1, 32) and (cfg.fstride, cfg.tstride) == (128, 2)


def test_official_ast_finetuned_pth(tmp_path):
    # AST / fine-tuned SSAST layout: no p_input_*, pos_embed for the 12 x 101 grid, an mlp_head
    sd = ssast_pretrained_state(tdim=256)
    for k in [k for k in sd if "pred" in k or "p_input" in k or "mask_embed" in k]:
        del sd[k]
    sd["module.v.pos_embed"] = torch.randn(1, 12 * 101 + 2, 64)
    sd["module.mlp_head.0.weight"], sd["module.mlp_head.1.weight"] = torch.ones(64), torch.randn(527, 64)
    torch.save(sd, tmp_path / "audioset_10_10.pth")
    enc = load_encoder(tmp_path / "audioset_10_10.pth")
    cfg = enc.cfg
    assert (cfg.fstride, cfg.tstride, cfg.input_tdim, cfg.grid) == (10, 10, 1016, (12, 101))
    assert enc.forward_features(torch.randn(1, 1024, 128)).shape == (1, 1214, 64)  # AST's 1024 frames
    assert load_encoder(tmp_path / "audioset_10_10.pth", input_tdim=1024).cfg.input_tdim == 1024
    with pytest.raises(ValueError, match="gives 1308"):
        load_encoder(tmp_path / "audioset_10_10.pth", input_tdim=1104)
    with pytest.raises(ValueError, match="not a multiple of the 13 frequency rows"):
        load_encoder(tmp_path / "audioset_10_10.pth", fstride=9)


def test_neither_format_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="neither an export of this package.*: not a PyTorch checkpoint \\(5 bytes"):
        load_encoder(bad)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="HTS-AT .pth, a Hugging Face AST directory\\): the file is empty$"):
        load_encoder(tmp_path / "empty.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"not an SSAST/AST checkpoint: missing \['v.pos_embed'"):
        load_encoder(tmp_path / "other.pth")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="neither an export of this package nor timm ViT weights"):
        load_encoder(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(tmp_path / "missing.pth")


def test_weights_only_load_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="neither an export"):
        load_encoder_state(tmp_path / "evil.pth")


def _restamp(path, **raw):
    """``path`` written again with metadata values replaced by ``raw`` (strings, as stored)."""
    from safetensors.torch import load_file, safe_open, save_file

    with safe_open(str(path), framework="pt") as handle:
        stored = dict(handle.metadata())
    save_file(load_file(str(path)), str(path), metadata={**stored, **raw})
    return path


BAD_META = {  # a metadata value -> what the one-line error says after the file's name
    "depth": ({"encoder_config": "ENC:depth=four"}, "metadata encoder_config.depth: expected an integer, got 'four'"),
    "embed_dim": ({"encoder_config": "ENC:embed_dim=null"},
                  "metadata encoder_config.embed_dim: expected an integer, got None"),
    "config": ({"encoder_config": "[1]"}, "metadata encoder_config must be a mapping, got [1]"),
    "audio": ({"audio": "[1]"}, "metadata audio must be a mapping, got [1]"),
    "audio_rate": ({"audio": '{"sample_rate": "fast"}'}, "metadata audio.sample_rate: expected an integer, got 'fast'"),
    "phase": ({"phase": "[1]"}, "metadata phase must be a mapping, got [1]"),
    "phase_factor": ({"phase": '{"compression": "fshift", "factor": "2"}'},
                     "metadata phase.factor: a compression factor must be a positive integer, got '2'"),
    "classifier": ({"classifier": "null"}, "metadata classifier must be a mapping, got None"),
    "classes": ({"classifier": '{"pool": "prefix"}'},
                "metadata classifier.classes must be a non-empty list of class names, got None"),
    "pool": ({"classifier": '{"classes": ["a"], "pool": 3}'}, "metadata classifier.pool must be a string, got 3"),
    "not_json": ({"loss": "{bce"}, "metadata 'loss' is not JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_export_metadata_of_the_wrong_type_is_one_error_naming_file_and_key(tmp_path, tiny_cfg, capsys, case):
    """A model file whose metadata has a value of the wrong type (or one that is not JSON) is refused by the
    reader every command goes through, naming the file and the key: not a TypeError, AttributeError or KeyError
    traceback from predict, evaluate, embed, --init or c2f-hf export."""
    import json

    from finetune.classifier import Classifier, save_classifier
    from finetune.embed import main as embed
    from finetune.predict import main as predict
    from tests.helpers import AUDIO, FULL, _write, one_error

    path = save_classifier(Classifier(ASTEncoder(tiny_cfg), 2), tmp_path / "m.safetensors", ["a", "b"],
                           {"audio": AUDIO, "phase": FULL, "loss": "ce"})
    raw, says = BAD_META[case]
    key, value = next(iter(raw.items()))
    if value.startswith("ENC:"):  # one field of the encoder's config changed
        field, given = value[4:].split("=")
        value = json.dumps({**tiny_cfg.to_dict(), field: json.loads(given if given == "null" else f'"{given}"')})
    _restamp(path, **{key: value})
    with pytest.raises(ValueError) as err:
        read_weights(path)
    assert str(err.value).startswith(f"{path}: {says}")
    clip = _write(tmp_path / "a.wav", 0.5)
    for command, args in ((predict, ["--ckpt", str(path), str(clip)]),
                          (embed, ["--init", str(path), "--inputs", str(clip), "--out", str(tmp_path / "o")])):
        assert command(args) == 2
        assert one_error(capsys.readouterr().err).startswith(f"error: {path}: {says}")
