"""ONNX export: onnxruntime's scores equal predict.py's, a dynamic batch axis, the torch-free example, refusals."""

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from common.audio.compression import Compression
from common.audio.pipeline import AudioConfig
from common.models.arch import architecture_for
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from finetune.classifier import save_classifier

pytestmark = pytest.mark.slow  # end-to-end: every test here trains, launches or exports

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "onnx_classify.py"
CLASSES = ["a", "b", "c", "d"]
NAMES = {"a": "Alpha", "c": "Gamma"}
AUDIO = AudioConfig(num_mel_bins=64, target_frames=100, norm="esc50")  # 1.015 s clips at 16 kHz
# a tiny HTS-AT for the built-in corpus's 16 kHz clips (as tests/finetune/test_htsat_training.py's, with two stages:
# the export's time grows with the graph)
HTSAT = dict(sample_rate=16000, clip_samples=20320, n_fft=512, hop_length=160, mel_bins=32, fmax=8000, spec_size=64,
             embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, drop_path_rate=0.0)
# (architecture, pooling, loss, phase): AST's prefix pooling at full resolution, an SSAST-style mean-pooled
# classifier of a compressed phase (frame shift x2: the front end's framing changes), HTS-AT
MODELS = {"ast": ("prefix", "ce", "none", 1), "ssast_fshift2": ("mean", "bce", "fshift", 2),
          "htsat": ("tscam", "bce", "none", 1)}


def _classifier(path: Path, kind: str) -> Path:
    """A tiny classifier export as fine-tuning writes it, its head spread so that scores differ by class."""
    pool, loss, method, factor = MODELS[kind]
    if kind == "htsat":
        from common.models.htsat import HTSATConfig

        arch = architecture_for(HTSATConfig(**HTSAT, num_classes=len(CLASSES)))
    else:
        arch = architecture_for(EncoderConfig(embed_dim=32, depth=1, num_heads=2, num_mel_bins=64, input_tdim=100,
                                              fshape=16, tshape=16, fstride=10, tstride=12), AUDIO)
    geometry = arch.geometry(Compression(method, factor))
    torch.manual_seed(1)
    model = arch.build_classifier(geometry, len(CLASSES), pool)
    for name, param in model.named_parameters():
        if name.startswith(("head.1.weight", "encoder.tscam_conv.weight")):
            torch.nn.init.normal_(param, std=0.3)  # neither flat nor saturated: equal by chance proves nothing
    return save_classifier(model, path, CLASSES, {**arch.export_meta(geometry), "loss": loss, "class_names": NAMES,
                                                  "phase": {"compression": method, "factor": factor}})


@pytest.fixture(scope="module")
def clips(tmp_path_factory, synth_corpus):
    """Audio at 16 kHz: two clips of the built-in corpus (1.27 s: two AST windows), a generated long one (3 s:
    several windows), a short one (zero-padded) and one ending in silence, as float WAV (no quantisation)."""
    import soundfile as sf

    from tests.helpers import real_looking_signals

    folder = tmp_path_factory.mktemp("clips")
    corpus = sorted((synth_corpus / "synth_audio").rglob("*.flac"))[:2]
    sig = real_looking_signals(3, seconds=3.0, seed=3).numpy()
    sig[2, 9000:] = 0.0
    paths = list(corpus)
    for name, wave in (("long", sig[0]), ("short", sig[1][:7000]), ("silent_end", sig[2][:16240])):
        paths.append(folder / f"{name}.wav")
        sf.write(paths[-1], wave, 16000, subtype="FLOAT")
    return paths


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    """``(kind, export, onnx file, CLI output)`` per model kind, exported once through the command line."""
    from finetune.onnx_export import main as onnx_main

    folder = tmp_path_factory.mktemp(request.param)
    src = _classifier(folder / "model.safetensors", request.param)
    out = folder / "model.onnx"
    for name in (".model.onnx.c2f-0badf00d.tmp", ".other.onnx.c2f-0badf00d.tmp"):  # killed exports' (see below)
        (folder / name).write_bytes(b"half a model")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert onnx_main([str(src), "--out", str(out)]) == 0
    return request.param, src, out, buffer.getvalue()


def test_the_export_points_at_an_example_that_exists(exported):
    """It printed `python examples/onnx_classify.py`, a file of a clone only (an installed wheel carries it beside
    its recipes now); the path it prints is one that exists."""
    import shlex

    line = next(line for line in exported[3].splitlines() if line.startswith("use: python "))
    assert Path(shlex.split(line)[2]).is_absolute() and Path(shlex.split(line)[2]).is_file()  # from any folder


def test_an_export_removes_what_a_killed_export_of_its_file_left(exported):
    """A killed export left its temporary, a whole model's size, which nothing ever removed; the next export of the
    same file removes it, and leaves a killed export's of another file of the folder (a folder of the user's)."""
    out = exported[2]
    assert not (out.parent / ".model.onnx.c2f-0badf00d.tmp").exists()
    assert (out.parent / ".other.onnx.c2f-0badf00d.tmp").exists()


def predict_json(ckpt, files, capsys) -> list[dict]:
    from finetune.predict import main as predict

    capsys.readouterr()
    assert predict(["--ckpt", str(ckpt), "--json", *map(str, files)]) == 0
    return json.loads(capsys.readouterr().out)


def run_example(*args, cwd: Path, block=("torch",)) -> subprocess.CompletedProcess:
    """The example in a fresh interpreter where ``block``'s modules cannot be imported (nor this package:
    no PYTHONPATH, run outside the checkout)."""
    script = ("import runpy, sys\n"
              f"for name in {list(block)!r}:\n"
              "    sys.modules[name] = None  # `import name` raises ImportError\n"
              f"sys.argv = [{str(EXAMPLE)!r}, *{list(map(str, args))!r}]\n"
              f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=cwd)


def test_onnxruntime_scores_equal_predict_and_the_torch_free_example_agrees(exported, clips, capsys, tmp_path):
    kind, src, out, printed = exported
    assert f"classifier with {len(CLASSES)} classes to {out}" in printed and "front end in the graph" in printed
    ours = predict_json(src, clips, capsys)
    done = run_example(out, "--json", *clips, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout)
    assert [e["file"] for e in theirs] == [str(c) for c in clips]
    windows = 0
    for mine, onnx in zip(ours, theirs):
        assert mine["aggregate"] == onnx["aggregate"] == ("max" if MODELS[kind][1] == "bce" else "mean")
        assert len(mine["windows"]) == len(onnx["windows"])
        for a, b in zip(mine["windows"], onnx["windows"]):
            assert (a["start"], a["end"]) == pytest.approx((b["start"], b["end"]))
            assert max(abs(a["scores"][c] - b["scores"][c]) for c in CLASSES) < 1e-4, (a, b)
        scores = np.array([mine["scores"][c] for c in CLASSES])
        assert np.abs(scores - [onnx["scores"][c] for c in CLASSES]).max() < 1e-4
        assert scores.max() - scores.min() > 0.05  # not a flat, trivially equal output
        assert onnx["labels"][0]["label"] == mine["labels"][0]["label"]
        assert onnx["labels"][0]["name"] == mine["labels"][0]["name"]
        windows += len(mine["windows"])
    assert windows > len(clips)  # long files were cut into windows and aggregated by both
    # the plain output names the top label as predict does
    done = run_example(out, "--top-k", "1", str(clips[0]), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[-1] == ours[0]["labels"][0]["name"]


def test_one_graph_takes_a_batch_of_one_and_of_three(exported, clips):
    from common.data.audio_file import load_audio
    from finetune.classifier import load_classifier
    from finetune.inference import predict_scores
    from finetune.onnx_export import read_onnx_metadata

    kind, src, out, _ = exported
    info = read_onnx_metadata(out)
    rate, clip = info["sample_rate"], info["clip_samples"]
    assert info["classes"] == CLASSES and info["class_names"] == NAMES and rate == 16000
    assert info["front_end"]["in_graph"] and info["front_end"]["phase"]["factor"] == MODELS[kind][3]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (waves_in, lengths_in), (scores_out,) = session.get_inputs(), session.get_outputs()
    assert (waves_in.name, lengths_in.name, scores_out.name) == ("waveforms", "lengths", "scores")
    assert isinstance(waves_in.shape[0], str) and waves_in.shape[1] == clip  # a named, dynamic batch axis
    assert isinstance(scores_out.shape[0], str) and scores_out.shape[1] == len(CLASSES)
    # three rows: a full window, a short clip (padded) and a window ending in silence
    rows = [load_audio(clips[2], rate)[:clip], load_audio(clips[3], rate), load_audio(clips[4], rate)[:clip]]
    waves = np.zeros((3, clip), dtype=np.float32)
    for i, row in enumerate(rows):
        waves[i, : row.size] = row
    lengths = np.array([row.size for row in rows], dtype=np.int64)
    assert lengths[1] < clip
    three = session.run(None, {"waveforms": waves, "lengths": lengths})[0]
    ones = np.concatenate([session.run(None, {"waveforms": waves[i : i + 1], "lengths": lengths[i : i + 1]})[0]
                           for i in range(3)])
    assert three.shape == (3, len(CLASSES)) and np.abs(three - ones).max() < 1e-5
    model, meta = load_classifier(src)
    ref = predict_scores(model, meta, torch.from_numpy(waves), torch.from_numpy(lengths)).numpy()
    assert np.abs(three - ref).max() < 1e-4


@pytest.mark.parametrize("exported", ["ast"], indirect=True)  # one model is enough for the reader
def test_the_example_reads_pcm_wav_without_soundfile_and_refuses_other_rates(exported, tmp_path):
    import soundfile as sf

    from tests.helpers import real_looking_signals

    out = exported[2]
    wave = real_looking_signals(1, seconds=1.5, seed=5).numpy()[0]
    sf.write(tmp_path / "pcm.wav", wave, 16000, subtype="PCM_16")
    sf.write(tmp_path / "cd.wav", wave, 44100, subtype="PCM_16")
    with_sf = run_example(out, "--json", tmp_path / "pcm.wav", cwd=tmp_path)
    without = run_example(out, "--json", tmp_path / "pcm.wav", block=("torch", "soundfile"), cwd=tmp_path)
    assert with_sf.returncode == without.returncode == 0, with_sf.stderr + without.stderr
    a, b = json.loads(with_sf.stdout)[0], json.loads(without.stdout)[0]
    assert max(abs(a["scores"][c] - b["scores"][c]) for c in CLASSES) < 1e-6
    sf.write(tmp_path / "blip.wav", wave[:800], 16000, subtype="PCM_16")  # 0.05 s: mostly padding, as predict says
    done = run_example(out, tmp_path / "cd.wav", tmp_path / "pcm.wav", tmp_path / "blip.wav", cwd=tmp_path)
    assert done.returncode == 1 and "pcm.wav" in done.stdout  # the other files are still classified
    assert f"error: {tmp_path / 'cd.wav'}: 44100 Hz audio; the model takes 16000 Hz" in done.stderr
    assert f"warning: {tmp_path / 'blip.wav'}: 0.05 s of audio, shorter than a tenth" in done.stderr
    done = run_example(tmp_path / "nosuch.onnx", tmp_path / "pcm.wav", cwd=tmp_path)  # a model file that is not there
    assert done.returncode == 2 and done.stderr.startswith(f"error: {tmp_path / 'nosuch.onnx'}: cannot be loaded as "
                                                           f"an ONNX model") and "Traceback" not in done.stderr


def test_the_example_refuses_a_top_k_that_is_not_a_count_as_the_commands_do(tmp_path):
    """--top-k 0 printed no label for any file, -1 every label but one; now refused as predict refuses it."""
    for value in ("0", "-1", "x", "1.5"):
        done = run_example(tmp_path / "m.onnx", tmp_path / "a.wav", "--top-k", value, cwd=tmp_path)
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        assert done.returncode == 2 and len(errors) == 1, done.stderr
        assert errors[0].endswith(f": error: argument --top-k: a whole number of labels >= 1, got {value!r}")


def test_what_cannot_be_exported_is_refused_in_one_line(tmp_path, capsys):
    from common.models.exports import save_encoder
    from finetune.onnx_export import OnnxExportError, export_onnx
    from finetune.onnx_export import main as onnx_main

    # a pretraining export: an encoder without a classification head
    encoder = save_encoder(ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, num_mel_bins=64,
                                                    input_tdim=100)),
                           tmp_path / "ssast.safetensors", {"objective": "ssast", "audio": asdict(AUDIO)})
    out = tmp_path / "m.onnx"
    with pytest.raises(OnnxExportError, match="encoder without a classification head") as info:
        export_onnx(encoder, out)
    assert str(info.value).startswith(f"cannot export {encoder} to ONNX: ") and "\n" not in str(info.value)
    assert onnx_main([str(encoder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export") and err.count("\n") == 1 and "fine-tune it first" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [encoder]  # nothing written, no temporary file
    # a folder as --out, and a run directory that does not exist
    assert onnx_main([str(encoder), "--out", str(tmp_path)]) == 2
    assert "is a directory; name the .onnx file" in capsys.readouterr().err
    assert onnx_main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # an opset the exporter cannot write (it warned, wrote opset 18 and said it had exported): the command refuses
    # it when it parses its options (tests/test_silent_inputs.py), the function says so too
    with pytest.raises(OnnxExportError, match="^--opset 5: the exporter writes these graphs at opset 18 or higher$"):
        export_onnx(encoder, out, opset=5)
    assert not out.exists()
