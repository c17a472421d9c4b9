"""finetune/predict.py: windows of long files, their aggregation, JSON output, and files that cannot be read."""

import json

import numpy as np
import pytest

from finetune.predict import main as predict
from tests.helpers import PREDICT_AUDIO, _write, one_error

AUDIO = PREDICT_AUDIO
CLIP = 0.025 + 63 * 0.010  # seconds in one window of 64 frames


@pytest.mark.slow
def test_long_file_windows_and_aggregation_rules(tmp_path, model_file, capsys):
    bce, ce = model_file("bce"), model_file("ce")
    long = _write(tmp_path / "long.wav", 3.5)
    assert predict(["--ckpt", str(bce), str(long), "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)[0]
    wins = entry["windows"]
    assert entry["duration"] == pytest.approx(3.5) and entry["aggregate"] == "max"
    assert wins[0]["start"] == 0 and wins[-1]["end"] == pytest.approx(3.5)  # the last window ends with the file
    assert all(w["end"] - w["start"] == pytest.approx(CLIP) for w in wins)
    assert [w["start"] for w in wins[:3]] == pytest.approx([0, CLIP / 2, CLIP])  # default hop: half a clip
    table = np.array([[w["scores"][c] for c in "abc"] for w in wins])
    scores = np.array([entry["scores"][c] for c in "abc"])
    assert np.array_equal(scores, table.max(0)) and (scores > table.mean(0)).any()  # BCE: max over windows
    assert [x["label"] for x in entry["labels"]] == list(np.array(list("abc"))[np.argsort(-scores)][:5])
    # --aggregate overrides; softmax models average by default (scores stay a distribution)
    assert predict(["--ckpt", str(bce), str(long), "--json", "--aggregate", "mean", "--hop", "1.0"]) == 0
    entry = json.loads(capsys.readouterr().out)[0]
    table = np.array([[w["scores"][c] for c in "abc"] for w in entry["windows"]])
    assert [w["start"] for w in entry["windows"]] == pytest.approx([0, 1, 2, 3.5 - CLIP])
    # windows a hop longer than a clip apart leave gaps: the last one, placed to end with the file, is all new audio
    assert np.allclose([entry["scores"][c] for c in "abc"], table.mean(0), atol=1e-6)
    # at the default hop (half a clip) it counts for the share of a hop it moves on: 3600 samples of 5240
    assert predict(["--ckpt", str(bce), str(long), "--json", "--aggregate", "mean"]) == 0
    entry = json.loads(capsys.readouterr().out)[0]
    table = np.array([[w["scores"][c] for c in "abc"] for w in entry["windows"]])
    assert [round(w["start"] * 16000) for w in entry["windows"][-2:]] == [8 * 5240, 56000 - 10480]
    weights = np.array([1] * 9 + [3600 / 5240])
    assert np.allclose([entry["scores"][c] for c in "abc"], (table * weights[:, None]).sum(0) / weights.sum(),
                       atol=1e-6)
    assert not np.allclose([entry["scores"][c] for c in "abc"], table.mean(0), atol=1e-6)
    assert predict(["--ckpt", str(ce), str(long), "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)[0]
    assert entry["aggregate"] == "mean" and sum(entry["scores"].values()) == pytest.approx(1, abs=1e-5)
    # the table lists every window with its times
    assert predict(["--ckpt", str(ce), str(long), "--windows", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "(3.50 s, 10 windows, mean over windows)" in out
    lines = out.splitlines()
    assert lines[3].strip().startswith("0.00-0.66 s  ") and lines[-1].strip().startswith("2.85-3.50 s  ")
    assert len([line for line in out.splitlines() if line.strip().endswith(("Alpha", "b", "c"))]) == 2 + 10


def test_a_folder_stands_for_every_format_the_readers_read(tmp_path, model_file, capsys):
    """AIFF, CAF, W64 and RF64 files are read a window at a time as WAV and FLAC are: a folder of them is tagged,
    not refused as holding no audio."""
    folder = tmp_path / "mac"
    folder.mkdir()
    files = [_write(folder / name, 0.5, seed=i) for i, name in enumerate(["a.aiff", "b.caf", "c.rf64", "d.w64"])]
    assert predict(["--ckpt", str(model_file("ce")), "--json", str(folder)]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["file"] for e in entries] == list(map(str, files)) and all("scores" in e for e in entries)


def test_an_unreadable_file_is_reported_and_the_others_are_tagged(tmp_path, model_file, capsys):
    model = model_file("ce")
    good = _write(tmp_path / "good.wav", 0.5)
    other = _write(tmp_path / "other.flac", 1.0, rate=44100, seed=1)  # another rate: resampled
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file" * 10)
    (tmp_path / "empty").mkdir()
    files = [good, tmp_path / "deleted.wav", garbage, tmp_path / "empty", other]
    assert predict(["--ckpt", str(model), "--json", *map(str, files)]) == 1
    captured = capsys.readouterr()
    entries = json.loads(captured.out)
    assert [e["file"] for e in entries] == list(map(str, files))
    assert entries[1] == {"file": str(tmp_path / "deleted.wav"), "error": "no such file"}
    assert "Format not recognised" in entries[2]["error"] and "Details" not in entries[2]["error"]
    assert entries[3]["error"] == ("a folder holding no audio files (.wav, .flac, .aiff, .aif, .w64, .rf64, .caf, "
                                   ".ogg, .mp3, .opus)")
    assert {"labels", "scores", "windows"} <= set(entries[0]) and {"labels", "scores"} <= set(entries[4])
    assert "error: 2 of 4 files could not be read" in captured.err  # an empty folder is named, not counted a file
    assert predict(["--ckpt", str(model), str(tmp_path / "empty")]) == 1  # alone: one error line, naming it
    assert one_error(capsys.readouterr().err) == f"error: {tmp_path / 'empty'}: {entries[3]['error']}"
    # a folder stands for its audio files, at any depth, in sorted order
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    inner = [_write(folder / "b.wav", 0.5, seed=2), _write(folder / "sub" / "a.flac", 0.5, seed=3)]
    (folder / "notes.txt").write_text("not audio")
    assert predict(["--ckpt", str(model), "--json", str(folder), str(good)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["file"] for e in listed] == [str(folder / "b.wav"), str(folder / "sub" / "a.flac"), str(good)]
    assert predict(["--ckpt", str(model), "--json", *map(str, inner)]) == 0
    assert json.loads(capsys.readouterr().out) == listed[:2]
    assert f"error: {tmp_path / 'deleted.wav'}: no such file" in captured.err
    # a WAV that lost its end (an interrupted copy) is no shorter clip: named as truncated, as the loader names it
    cut = tmp_path / "cut.wav"
    whole = _write(tmp_path / "whole.wav", 1.0).read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    assert predict(["--ckpt", str(model), "--json", str(cut)]) == 1
    assert json.loads(capsys.readouterr().out)[0]["error"].startswith("truncated (header: 16000 samples, file holds ")
    # the table says the same, in place
    assert predict(["--ckpt", str(model), str(good), str(garbage)]) == 1
    out = capsys.readouterr().out
    assert "good.wav  (0.50 s, 1 window)" in out and "garbage.wav\n  error: cannot decode it: " in out


@pytest.mark.slow
def test_an_export_keeps_its_normalisation_statistics_by_value(tmp_path, capsys):
    """A task normalised with its own stats file: the exports record the statistics themselves, so the model
    predicts the same after the file changed or went (another machine), and the predictions still use them."""
    from common.data.corpora import get_corpus
    from common.models.exports import read_weights
    from finetune.run import main as finetune
    from tests.helpers import TINY, sets
    from tests.layouts import write_clip

    for label in ("kick", "snare"):
        for i in range(3):
            write_clip(tmp_path / "drums" / label / f"{label}{i}.wav", seconds=0.6, seed=hash(label) % 100 + i)
    get_corpus("custom").prepare(tmp_path / "drums", tmp_path / "manifests", name="drums", valid_fraction=0.5)
    stats = tmp_path / "manifests" / "drums.stats.json"
    stats.write_text(json.dumps({"mean": -9.0, "std": 2.0}))
    (tmp_path / "drums.yaml").write_text(
        "name: drums\ntrain: [manifests/drums_train.jsonl.gz]\nvalid: [manifests/drums_valid.jsonl.gz]\n"
        f"classes: manifests/drums_classes.json\ntarget_frames: 64\nnorm: {stats}\nmetric: acc\nloss: ce\n"
        "epochs: 1\n")
    run_dir = tmp_path / "run"
    assert finetune(["--init", "none", "--task", str(tmp_path / "drums.yaml"), "--run-dir", str(run_dir),
                     *sets(*TINY, "data.batch_size=2")]) == 0
    _, meta = read_weights(run_dir / "model.safetensors")
    assert meta["norm_stats"] == {"mean": -9.0, "std": 2.0}
    assert meta["clips"] == {"pad": "zeros", "crop": "start", "channels": "first"}  # how validation read its clips
    clip = next((tmp_path / "drums").rglob("*.wav"))

    def scores():
        capsys.readouterr()
        assert predict(["--ckpt", str(run_dir), "--json", str(clip)]) == 0
        return json.loads(capsys.readouterr().out)[0]["scores"]

    before = scores()
    stats.write_text(json.dumps({"mean": 0.0, "std": 9.0}))  # recomputed after adding data
    assert scores() == before
    stats.unlink()  # the model copied to another machine
    assert scores() == before


def test_a_model_validated_on_repeated_clips_is_evaluated_and_predicts_on_them(tmp_path, capsys, monkeypatch):
    """``data.pad: repeat`` (HTS-AT's ESC-50 recipe) and ``data.eval_crop`` travel with the export: a file shorter
    than the clip is repeated to it by predict.py, and the test split / evaluate_export read clips as the
    run's validation did."""
    import soundfile as sf
    import torch

    from common.models.exports import read_weights, save_weights
    from finetune import evaluate, inference
    from finetune.classifier import load_classifier
    from tests.helpers import tiny_classifier_file

    zeros = tiny_classifier_file(tmp_path, "ce")
    tensors, meta = read_weights(zeros)
    repeat = save_weights(tmp_path / "repeat.safetensors", tensors,
                          {**meta, "clips": {"pad": "repeat", "crop": "center"}})
    short = _write(tmp_path / "short.wav", 0.3)
    scores = {}
    for name, path in (("zeros", zeros), ("repeat", repeat)):
        assert predict(["--ckpt", str(path), str(short), "--json"]) == 0
        entry = json.loads(capsys.readouterr().out)[0]
        assert entry["duration"] == pytest.approx(0.3) and entry["windows"][0]["end"] == pytest.approx(0.3)
        scores[name] = np.array([entry["scores"][c] for c in "abc"])
    model, meta = load_classifier(repeat)
    rate, clip = inference.clip_for_export(meta)
    wave = sf.read(short, dtype="float32")[0]
    tiled = torch.from_numpy(np.tile(wave, -(-clip // wave.size))[:clip])[None]
    expected = inference.predict_scores(model, meta, tiled, torch.tensor([clip]))[0].numpy()
    assert np.allclose(scores["repeat"], expected, atol=1e-6) and not np.allclose(scores["zeros"], expected)

    seen = {}

    def loader(*args, **kwargs):
        seen.update(crop=kwargs.get("crop"), pad=kwargs.get("pad"))
        raise RuntimeError("enough")

    monkeypatch.setattr("common.data.loader.eval_loader", loader)
    for path, expect in ((zeros, {"crop": "start", "pad": "zeros"}), (repeat, {"crop": "center", "pad": "repeat"})):
        with pytest.raises(RuntimeError, match="enough"):
            evaluate.evaluate_export(path, ["unused.jsonl.gz"], ["a", "b", "c"])
        assert seen == expect


def test_hop_samples_take_seconds_or_the_default_and_refuse_what_counts_no_samples():
    from common.data.audio_file import hop_samples

    assert hop_samples(None, 16000, 512) == 512 and hop_samples(0.5, 16000, 512) == 8000
    assert hop_samples(1e-9, 16000, 512) == 1  # at least one sample
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="--hop must be a finite number of seconds above 0"):
            hop_samples(bad, 16000, 512)


def _rewrite(path, tensors=None, **meta):
    """Write ``path`` again with its tensors changed by ``tensors(dict)`` and metadata values replaced (raw
    strings, as stored)."""
    import torch  # noqa: F401 - the callers' tensors
    from safetensors.torch import load_file, safe_open, save_file

    with safe_open(str(path), framework="pt") as handle:
        stored = dict(handle.metadata())
    state = load_file(str(path))
    if tensors is not None:
        tensors(state)
    save_file(state, str(path), metadata={**stored, **meta})
    return path


def test_a_classifier_whose_weights_do_not_fit_its_config_is_one_error_naming_file_and_keys(tmp_path, model_file,
                                                                                           capsys):
    """predict, evaluate and the ONNX export load classifiers through load_classifier: a wrong shape, a missing or
    an extra tensor is one line naming the file and the keys, not load_state_dict's traceback."""
    import torch

    from tests.helpers import one_error

    clip = _write(tmp_path / "a.wav", 0.5)
    for change, says in (
            (lambda s: s.__setitem__("head.1.weight", torch.zeros(2, 32)),
             "wrong shapes head.1.weight (2, 32) (the model's (3, 32))"),
            (lambda s: s.pop("head.1.bias"), "missing keys ['head.1.bias']"),
            (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "unexpected keys ['extra.weight']")):
        model = _rewrite(model_file("ce"), change)
        assert predict(["--ckpt", str(model), str(clip)]) == 2
        assert one_error(capsys.readouterr().err) == (
            f"error: {model}: the weights do not fit the model its config describes: {says}")


def test_weights_that_are_not_finite_floats_are_refused_naming_file_and_key(tmp_path, model_file, capsys):
    """A NaN or infinite weight, or integers where the model has floating-point weights, would be cast and
    loaded without a word (every score NaN, or a model that says nothing): predict (and --init, embed) refuse
    it, naming the file and the tensor."""
    import torch

    from tests.helpers import one_error

    clip = _write(tmp_path / "a.wav", 0.5)
    nan = torch.zeros(3)
    nan[1] = float("nan")
    for change, says in (
            (lambda s: s.__setitem__("head.1.bias", nan), "tensor head.1.bias holds NaN or infinite values"),
            (lambda s: s.__setitem__("encoder.pos_embed", s["encoder.pos_embed"] * float("inf")),
             "tensor encoder.pos_embed holds NaN or infinite values"),
            (lambda s: s.__setitem__("head.1.weight", s["head.1.weight"].to(torch.int32)),
             "tensor head.1.weight holds int32 values; the model's weights are floating point")):
        model = _rewrite(model_file("ce"), change)
        assert predict(["--ckpt", str(model), str(clip)]) == 2
        assert one_error(capsys.readouterr().err) == f"error: {model}: {says}"
