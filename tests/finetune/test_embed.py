"""finetune/embed.py and finetune/embedder.py: embeddings of every --init kind, windows and frame times, resuming,
unreadable files, both formats, and the linear probe's features being the embed command's."""

import json

import numpy as np
import pytest
import torch

from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.exports import RUN_EXPORT, save_encoder
from finetune.embed import embed_files, main
from finetune.embed_inputs import list_clips
from finetune.embed_store import read_clips, read_index, read_shard
from finetune.embedder import load_embedder
from tests.helpers import _write, one_error

pytestmark = pytest.mark.slow  # end-to-end: every test here trains, launches or exports

AUDIO = {"sample_rate": 16000, "num_mel_bins": 128, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
         "target_frames": 64, "norm": "audioset"}
FULL = {"compression": "none", "factor": 1}
CLIP = 0.025 + 63 * 0.010  # seconds in a window of 64 frames (10480 samples)


def _export(path, phase=FULL, input_tdim=64, depth=2):
    torch.manual_seed(0)
    cfg = EncoderConfig(embed_dim=32, depth=depth, num_heads=2, input_tdim=input_tdim)
    if phase["compression"] == "fshift":
        cfg = cfg.replace(input_tdim=round(input_tdim / phase["factor"]))  # an export holds its phase's geometry
    return save_encoder(ASTEncoder(cfg), path, {"audio": {**AUDIO, "target_frames": input_tdim}, "phase": phase})


def make_init(kind: str, tmp_path):
    """``(init path, embedding width, time steps per window, auto pooling)`` of a tiny model of each kind."""
    from tests.helpers import ssast_pretrained_state

    if kind == "export":
        return _export(tmp_path / "e.safetensors"), 32, 4, "prefix"
    if kind == "coarse_export":  # a Fshift x2 phase's export embeds as that phase computed: 32 frames, 2 steps
        return _export(tmp_path / "c.safetensors", {"compression": "fshift", "factor": 2}), 32, 2, "prefix"
    if kind == "run_dir":  # a fine-tuning run: its final export is a classifier that pooled the patch tokens
        from finetune.classifier import Classifier, save_classifier

        run = tmp_path / "run"
        run.mkdir()
        model = Classifier(ASTEncoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2, input_tdim=64)), 3, "mean")
        save_classifier(model, run / RUN_EXPORT, "abc", {"audio": AUDIO, "phase": FULL, "loss": "ce"})
        return run, 32, 4, "mean"
    if kind == "ssast_pth":  # SSAST pretraining: 128 bins x 256 frames, patch 16, stride = patch
        torch.save(ssast_pretrained_state(dim=32, depth=1), tmp_path / "SSAST-Patch.pth")
        return tmp_path / "SSAST-Patch.pth", 32, 16, "mean"
    if kind == "ast_pth":  # a fine-tuned AST file: no input size stored, AST's stride 10 -> 12 x 8 grid
        state = {k: v for k, v in ssast_pretrained_state(dim=32, depth=1, fdim=192, tdim=128).items()
                 if not k.split(".")[1].startswith(("p_input", "mask_embed", "cpred", "gpred"))}
        state.update({"module.mlp_head.0.weight": torch.ones(32), "module.mlp_head.1.weight": torch.zeros(527, 32)})
        torch.save(state, tmp_path / "audioset_10_10.pth")
        return tmp_path / "audioset_10_10.pth", 32, 8, "prefix"
    if kind == "hf_dir":
        from common.models.hf_export import export_hf

        return export_hf(_export(tmp_path / "h.safetensors"), tmp_path / "hf"), 32, 4, "prefix"
    if kind == "htsat_official":  # 10 s at 32 kHz, a 256 x 256 image, 32 steps of its last stage
        from tests.helpers import official_state, save_lightning

        save_lightning(official_state(256), tmp_path / "HTSAT.ckpt")
        return tmp_path / "HTSAT.ckpt", 64, 32, "mean"
    if kind == "htsat_export":
        from common.models.htsat import HTSAT, HTSATConfig
        from common.models.htsat.arch import HTSATClassifier
        from finetune.classifier import save_classifier

        cfg = HTSATConfig(clip_samples=64000, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2),
                          num_classes=3)
        path = save_classifier(HTSATClassifier(HTSAT(cfg)), tmp_path / "ht.safetensors", "abc",
                               {"arch": "htsat", "phase": FULL, "loss": "ce"})
        return path, 64, HTSAT(cfg).geom.frames // HTSAT(cfg).frames_per_step, "mean"
    raise AssertionError(kind)


KINDS = ["export", "coarse_export", "run_dir", "ssast_pth", "ast_pth", "hf_dir", "htsat_official", "htsat_export"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_init_kind_writes_embeddings_of_the_right_shapes(tmp_path, kind):
    if kind == "hf_dir":
        pytest.importorskip("transformers")
    init, dim, steps, auto_pool = make_init(kind, tmp_path)
    embedder = load_embedder(init, frames=True)
    assert embedder.pool == auto_pool and embedder.dim == dim and embedder.steps == steps
    window = embedder.clip_seconds
    files = [_write(tmp_path / "short.wav", 0.3), _write(tmp_path / "long.wav", 2.5 * window, seed=1)]
    out = tmp_path / "emb"
    summary = embed_files(init, files, out, pool="mean", frames=True, batch_size=2, workers=0)
    rows = read_index(out)
    assert summary.clips == 2 and summary.windows == len(rows) == 1 + 3  # the long file: 3 windows of one clip
    assert [r["window"] for r in rows] == [0, 0, 1, 2] and rows[0]["end"] == pytest.approx(0.3)
    assert rows[-1]["end"] == pytest.approx(2.5 * window, abs=1e-5)  # the last window ends with the file
    clips = read_clips(out)
    assert clips.shape == (4, dim) and clips.dtype == np.float32 and np.isfinite(clips).all()
    shard = read_shard(out / "shards" / rows[0]["shard"])
    assert shard["frames"].shape == (4, steps, dim) and shard["frame_times"].shape == (4, steps, 2)
    # the clip's mean of every patch token is the mean over its time steps of the frames' frequency means
    assert np.allclose(shard["frames"].mean(1), clips, atol=1e-5)
    assert not np.allclose(clips[0], clips[1])
    info = json.loads((out / "embeddings.json").read_text())
    assert info["pool"] == "mean" and info["layer"] == "final" and info["dim"] == dim and info["steps"] == steps
    assert info["window_seconds"] == pytest.approx(window) and len(info["step_offsets"]) == steps


def test_frame_times_of_a_long_file_in_windows(tmp_path):
    full = _export(tmp_path / "full.safetensors")
    coarse = _export(tmp_path / "coarse.safetensors", {"compression": "fshift", "factor": 2})
    wave_file = _write(tmp_path / "long.wav", 2.0)
    out = tmp_path / "emb"
    embed_files(full, [wave_file], out, frames=True, hop_seconds=0.5, workers=0)
    rows = read_index(out)
    starts = [0.0, 0.5, 1.0, 2.0 - CLIP]  # hop 0.5 s, the last window ending with the file
    assert [r["start"] for r in rows] == pytest.approx(starts)
    assert [r["end"] for r in rows] == pytest.approx([s + CLIP for s in starts])
    shard = read_shard(out / "shards" / rows[0]["shard"])
    # a column of 16x16 patches covers fbank frames 16k .. 16k + 15: 10 ms shift, 25 ms window
    k = np.arange(4)
    expected = np.stack([k * 0.16, k * 0.16 + 15 * 0.010 + 0.025], axis=1)
    assert np.allclose(shard["frame_times"], np.array(starts)[:, None, None] + expected[None])
    # each window is what the model computes on that piece of the file
    from common.data.audio_file import load_audio

    wave = load_audio(wave_file, 16000)
    embedder = load_embedder(full, frames=True)
    for row, start in enumerate(starts):
        piece = torch.from_numpy(wave[int(round(start * 16000)):][:embedder.clip_samples])[None]
        direct = embedder.embed(piece)
        assert np.allclose(shard["clip"][row], direct.clip[0], atol=1e-5)
        assert np.allclose(shard["frames"][row], direct.frames[0], atol=1e-5)
    # a frame is its time column's tokens averaged over the frequency rows (tokens are frequency-major)
    with torch.no_grad():
        tokens = embedder.encoder.forward_features(embedder.pipeline(piece))[0, 2:]  # [8 x 4 patches, 32]
    assert np.allclose(direct.frames[0], tokens.reshape(8, 4, 32).mean(0).numpy(), atol=1e-5)
    assert not np.allclose(direct.frames[0], tokens.reshape(4, 8, 32).mean(1).numpy(), atol=1e-3)
    # a Fshift x2 phase's export: 20 ms frames, 32 of them, two columns of 16
    embed_files(coarse, [wave_file], tmp_path / "coarse", frames=True, workers=0)
    rows = read_index(tmp_path / "coarse")
    assert [r["start"] for r in rows] == pytest.approx([0, CLIP, 2 * CLIP, 2.0 - CLIP])  # default hop: one clip
    times = read_shard(tmp_path / "coarse" / "shards" / rows[0]["shard"])["frame_times"]
    assert np.allclose(times[0], [[0.0, 15 * 0.020 + 0.025], [0.32, 0.32 + 15 * 0.020 + 0.025]])
    assert np.allclose(times[3], times[0] + 2.0 - CLIP)


def test_hts_at_steps_share_its_clip_and_its_latent_is_the_clip_embedding(tmp_path):
    init, dim, steps, _ = make_init("htsat_official", tmp_path)
    embedder = load_embedder(init, frames=True)
    starts, ends = embedder.step_times()
    assert np.allclose(starts, np.arange(32) * 10.0 / 32) and np.allclose(ends, starts + 10.0 / 32)
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 96000)).astype(np.float32) * 0.1)
    out = embedder.embed(wave)
    with torch.no_grad():
        latent = embedder.encoder(embedder.pipeline(wave))["latent_output"]
    assert np.allclose(out.clip, latent.numpy(), atol=1e-5) and out.frames.shape == (2, steps, dim)


def test_a_rerun_skips_what_was_written_and_computes_nothing(tmp_path, monkeypatch):
    init = _export(tmp_path / "e.safetensors")
    files = [_write(tmp_path / f"c{i}.wav", 0.3 + 0.1 * i, seed=i) for i in range(3)]  # one window each
    out = tmp_path / "emb"
    first = embed_files(init, files, out, pool="mean", frames=True, shard_size=1, workers=0)
    assert (first.clips, first.skipped) == (3, 0)
    written = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    index = (out / "index.tsv").read_text()
    embedder = load_embedder(init, pool="mean", frames=True)
    calls = []
    real = embedder.embed
    monkeypatch.setattr(embedder, "embed", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    again = embed_files(embedder, files, out, shard_size=1, workers=0)
    assert (again.clips, again.skipped, again.batches, calls) == (0, 3, 0, [])
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")  # nothing rewritten (the lock names its holder)
            if p.is_file() and p.name != "run.lock"} == written
    assert (out / "index.tsv").read_text() == index
    # one more file: only it is computed
    files.append(_write(tmp_path / "c3.wav", 0.5, seed=3))
    more = embed_files(embedder, files, out, shard_size=1, workers=0)
    assert (more.clips, more.skipped, len(calls)) == (1, 3, 1)
    # a run killed after a shard's tensors but before its rows: that clip is embedded again, once
    last = sorted((out / "shards").glob("*.tsv"))[-1]
    last.unlink()
    resumed = embed_files(embedder, files, out, shard_size=1, workers=0)
    assert (resumed.clips, resumed.skipped) == (1, 3)
    rows = read_index(out)
    assert [r["clip_id"] for r in rows] == [str(f) for f in files] and read_clips(out).shape == (4, 32)
    from common.data.audio_file import load_audio

    for i, f in enumerate(files):  # the rows read back in order are the clips' own embeddings
        assert np.allclose(read_clips(out)[i], real(torch.from_numpy(load_audio(f, 16000))[None]).clip[0], atol=1e-5)
    good = read_clips(out).copy()
    # a damaged shard (cut short, an object array, rows that are not its index's) is embedded again, and a
    # clips.npy of another length is written again: a rerun took them as finished (an audit)
    shards = sorted((out / "shards").glob("*.npz"))
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    np.savez(shards[2].open("wb"), clip=np.array([object()], dtype=object))
    np.savez(shards[3].open("wb"), clip=np.zeros((3, 32), np.float32), frames=np.zeros((3, 2, 32), np.float32))
    resumed = embed_files(embedder, files, out, shard_size=1, workers=0)
    assert (resumed.clips, resumed.skipped) == (3, 1)
    assert np.allclose(read_clips(out)[np.argsort([r["clip_id"] for r in read_index(out)])],
                       good[np.argsort([str(f) for f in files])], atol=1e-6)
    np.save(out / "clips.npy", np.zeros((2, 32), np.float32))
    assert embed_files(embedder, files, out, shard_size=1, workers=0).skipped == 4
    assert read_clips(out).shape == (4, 32)
    settings = (out / "embeddings.json").read_text()
    (out / "embeddings.json").write_text("[1]")
    with pytest.raises(ValueError, match="embeddings.json is a JSON list, not the settings embed writes"):
        embed_files(embedder, files, out, shard_size=1, workers=0)
    (out / "embeddings.json").write_text(settings)
    # other settings in the same folder are refused, naming what changed
    with pytest.raises(ValueError, match=r"other settings \(pool 'mean' -> 'prefix'\)"):
        embed_files(init, files, out, frames=True, pool="prefix", workers=0)
    with pytest.raises(ValueError, match="format 'npy' -> 'safetensors'"):
        embed_files(init, files, out, pool="mean", frames=True, fmt="safetensors", workers=0)
    embedder.channels = "mean"  # another mixdown of the same model (an official HTS-AT checkpoint's, now)
    with pytest.raises(ValueError, match="other settings \\(channels None -> 'mean'\\)"):
        embed_files(embedder, files, out, shard_size=1, workers=0)


def test_a_folder_stands_for_every_format_the_readers_read(tmp_path):
    """``--inputs DIR`` lists AIFF, CAF, W64 and RF64 files as it lists WAV and FLAC (all read a window at a time),
    and a missing ``.aiff`` is a file that cannot be read, not a folder that is not there."""
    folder = tmp_path / "mac"
    folder.mkdir()
    files = [_write(folder / name, 0.5, seed=i) for i, name in enumerate(["a.aiff", "b.caf", "c.rf64", "d.w64"])]
    clips, total = list_clips([str(folder), str(tmp_path / "gone.aiff")])
    clips = list(clips)
    assert total == 5 and [c.clip_id for c in clips] == [*map(str, files), str(tmp_path / "gone.aiff")]
    with clips[1].open(16000) as audio:
        assert audio.num_samples == 8000


def test_unreadable_files_are_named_listed_and_skipped(tmp_path, capsys):
    import soundfile as sf

    init = _export(tmp_path / "e.safetensors")
    folder = tmp_path / "audio"
    folder.mkdir()
    good = _write(folder / "good.wav", 0.5)
    (folder / "text.wav").write_text("not audio")
    sf.write(folder / "empty.flac", np.zeros(0, dtype=np.float32), 16000)
    out = tmp_path / "emb"
    code = main(["--init", str(init), "--inputs", str(folder), str(tmp_path / "missing.wav"), "--out", str(out),
                 "--device", "cpu", "--workers", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "3 files could not be read and were skipped" in err and str(out / "bad_audio.tsv") in err
    assert f"{tmp_path / 'missing.wav'}: no such file" in err and "text.wav: cannot decode it" in err
    listed = (out / "bad_audio.tsv").read_text().splitlines()
    assert listed[0] == "source\treason" and len(listed) == 4
    assert {line.split("\t")[0] for line in listed[1:]} == {str(folder / "text.wav"), str(folder / "empty.flac"),
                                                           str(tmp_path / "missing.wav")}
    assert [r["clip_id"] for r in read_index(out)] == [str(good)] and read_clips(out).shape == (1, 32)
    # the file fixed, the next run embeds it, skips the good one, and lists nothing
    (folder / "text.wav").unlink()
    (folder / "empty.flac").unlink()
    assert main(["--init", str(init), "--inputs", str(folder), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["clips"], summary["skipped"], summary["bad"]) == (0, 1, [])
    assert not (out / "bad_audio.tsv").exists()


def test_a_bad_file_named_with_a_newline_is_one_row_and_one_log_line(tmp_path, caplog):
    """A source with a newline or tab (from a manifest, or a file name) is escaped in the warning and in
    ``bad_audio.tsv``: one row per file, not a forged second line."""
    init = _export(tmp_path / "e.safetensors")
    out = tmp_path / "emb"
    bad = str(tmp_path / "gone\ntouch /tmp/pwned #\t.wav")
    with caplog.at_level("WARNING"):
        assert main(["--init", str(init), "--inputs", bad, "--out", str(out), "--device", "cpu"]) == 1
    said = [r.getMessage() for r in caplog.records if "gone" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and "gone\\ntouch /tmp/pwned #\\t.wav: " in said[0], said
    listed = (out / "bad_audio.tsv").read_text().split("\n")
    assert len(listed) == 3 and listed[1].startswith(f"{tmp_path}/gone\\ntouch /tmp/pwned #\\t.wav\t"), listed


def test_embedding_into_a_folder_removes_only_its_own_leftovers(tmp_path):
    """``--out`` may be a folder with other things in it: the clean-up of a killed write looks in ``--out`` and its
    ``shards/`` for this package's marked names only, not through the folder's tree."""
    init = _export(tmp_path / "e.safetensors")
    good = _write(tmp_path / "good.wav", 0.5)
    out = tmp_path / "emb"
    ours = [out / ".index.tsv.c2f-0a1b2c3d.tmp", out / "shards" / ".00000.npy.c2f-1a2b3c4d.tmp"]
    kept = [out / "notes" / ".draft.c2f-abcdef12.tmp", out / ".other.abcdefgh.tmp"]
    for path in (*ours, *kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert main(["--init", str(init), "--inputs", str(good), "--out", str(out), "--device", "cpu"]) == 0
    assert not any(p.exists() for p in ours) and all(p.exists() for p in kept)


def test_a_long_file_is_embedded_window_by_window_and_one_failing_midway_leaves_no_row(tmp_path, monkeypatch):
    """Files longer than WHOLE_SECONDS are read a window at a time: the same embeddings as decoded whole; one whose
    audio turns non-finite after some windows were embedded is listed as bad and none of its rows is kept, while
    the clips before and after it in the same shard are."""
    import soundfile as sf

    import common.data.audio_file as audio_file
    import finetune.embed_inputs as embed_inputs

    init = _export(tmp_path / "e.safetensors")
    before = _write(tmp_path / "before.wav", 1.5, seed=1)
    wave = (0.1 * np.random.default_rng(2).standard_normal(48000 * 3)).astype(np.float32)
    sf.write(tmp_path / "long.flac", wave, 48000)  # resampled to 16 kHz block by block
    wave[48000 * 2 + 3] = np.nan
    sf.write(tmp_path / "nan.wav", wave, 48000, subtype="FLOAT")
    after = _write(tmp_path / "after.wav", 1.2, seed=3)
    files = [before, tmp_path / "long.flac", tmp_path / "nan.wav", after]
    whole = embed_files(init, files, tmp_path / "whole", batch_size=2, shard_size=1000, workers=1)
    monkeypatch.setattr(embed_inputs, "WHOLE_SECONDS", 0.5)
    monkeypatch.setattr(audio_file, "BLOCK_SECONDS", 0.7)  # the NaN is read after two batches were embedded
    streamed = embed_files(init, files, tmp_path / "streamed", batch_size=2, shard_size=1000, workers=1)
    for summary in (whole, streamed):
        assert summary.clips == 3 and [s for s, _ in summary.bad] == [str(tmp_path / "nan.wav")]
        assert "non-finite" in summary.bad[0][1]
    rows = read_index(tmp_path / "streamed")
    assert rows == read_index(tmp_path / "whole") and len({r["shard"] for r in rows}) == 1
    assert [r["clip_id"] for r in rows if r["window"] == 0] == [str(before), str(tmp_path / "long.flac"), str(after)]
    assert np.allclose(read_clips(tmp_path / "streamed"), read_clips(tmp_path / "whole"), atol=1e-5)


def test_a_file_is_one_clip_whatever_folder_the_command_runs_from_and_however_it_is_spelled(tmp_path, monkeypatch):
    """An audio file is known by its absolute path: continued from another folder, or named ``./a.wav`` or
    ``../audio/a.wav``, the files embedded already are skipped, and a file given twice in one run is embedded once;
    a folder written before sources were absolute (source = the id as given) is continued from its folder. Cuts of
    one file are separate clips."""
    init = _export(tmp_path / "e.safetensors")
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        _write(audio / f"{name}.wav", 0.4, seed=i)
    out = tmp_path / "emb"
    monkeypatch.chdir(tmp_path)
    first = embed_files(init, ["audio/a.wav", "./audio/b.wav", "audio/../audio/b.wav"], out, workers=0)
    assert (first.clips, first.duplicates) == (2, 1)
    rows = read_index(out)
    assert [(r["clip_id"], r["source"]) for r in rows] == [("audio/a.wav", str(audio / "a.wav")),
                                                          ("audio/b.wav", str(audio / "b.wav"))]
    monkeypatch.chdir(audio)
    again = embed_files(init, ["a.wav", "./b.wav", "../audio/c.wav", str(audio / "a.wav")], out, workers=0)
    assert (again.clips, again.skipped, again.duplicates) == (1, 2, 1)
    assert [r["clip_id"] for r in read_index(out)] == ["audio/a.wav", "audio/b.wav", "../audio/c.wav"]
    # a folder of the earlier layout: every source the id as given, relative to the folder it ran from
    for tsv in (out / "shards").glob("*.tsv"):
        lines = tsv.read_text().splitlines()
        tsv.write_text("\n".join([lines[0]] + ["\t".join([c[0], c[0], *c[2:]]) for c in
                                               (line.split("\t") for line in lines[1:])]) + "\n")
    monkeypatch.chdir(tmp_path)
    old = embed_files(init, ["audio/a.wav", "audio/b.wav"], out, workers=0)
    assert (old.clips, old.skipped) == (0, 2)
    # two cuts of one file and the file itself: three clips
    from lhotse import CutSet, Recording

    recording = Recording.from_file(audio / "a.wav")
    cuts = CutSet.from_cuts([recording.to_cut().truncate(offset=o, duration=0.2).with_id(f"a-{o}")
                             for o in (0.0, 0.2)])
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    mixed = embed_files(init, ["cuts.jsonl.gz", "audio/a.wav"], tmp_path / "mixed", workers=0)
    assert mixed.clips == 3 and [r["clip_id"] for r in read_index(tmp_path / "mixed")] == ["a-0.0", "a-0.2",
                                                                                           "audio/a.wav"]
    rerun = embed_files(init, ["cuts.jsonl.gz", str(audio / "a.wav")], tmp_path / "mixed", workers=0)
    assert (rerun.clips, rerun.skipped) == (0, 3)


def test_npy_and_safetensors_hold_the_same_embeddings(tmp_path):
    from safetensors.numpy import load_file

    init = _export(tmp_path / "e.safetensors")
    files = [_write(tmp_path / "a.wav", 1.5), _write(tmp_path / "b.wav", 0.4, seed=2)]
    for fmt in ("npy", "safetensors"):
        embed_files(init, files, tmp_path / fmt, frames=True, fmt=fmt, workers=0)
    npz = np.load(tmp_path / "npy" / "shards" / "00000.npz", allow_pickle=False)
    st = load_file(str(tmp_path / "safetensors" / "shards" / "00000.safetensors"))
    assert set(npz.files) == set(st) == {"clip", "frames", "frame_times"}
    for key in st:
        assert np.array_equal(npz[key], st[key]), key
    assert np.array_equal(np.load(tmp_path / "npy" / "clips.npy"), load_file(str(tmp_path / "safetensors" /
                                                                                 "clips.safetensors"))["clip"])
    assert read_index(tmp_path / "npy") == [{**r, "shard": r["shard"].replace(".safetensors", ".npz")}
                                            for r in read_index(tmp_path / "safetensors")]
    # frames only
    embed_files(init, files, tmp_path / "frames", pool="none", frames=True, workers=0)
    assert not (tmp_path / "frames" / "clips.npy").exists()
    assert set(read_shard(tmp_path / "frames" / "shards" / "00000.npz")) == {"frames", "frame_times"}


def test_bad_settings_end_in_one_line_naming_them(tmp_path, capsys):
    init = _export(tmp_path / "e.safetensors")
    clip = _write(tmp_path / "a.wav", 0.5)
    base = ["--init", str(init), "--inputs", str(clip), "--out", str(tmp_path / "o")]
    for extra, message in ((["--pool", "none"], "--pool none writes no clip embedding"),
                           (["--layer", "0"], "--layer: block numbers are 1-based"),
                           (["--layer", "3"], "--layer 3: this encoder has 2 blocks")):
        assert main([*base, *extra]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
    for setting, message in (({"batch_size": 0}, "--batch-size must be at least 1, got 0"),  # the command's options
                             ({"workers": -1}, "--workers must be at least 0, got -1")):  # refuse these when parsed
        with pytest.raises(ValueError, match=message):
            embed_files(init, [str(clip)], tmp_path / "o", **setting)
    for missing in (f"{tmp_path}/nothing", f"{tmp_path}/nothing/"):  # a folder that is not there: no output made
        assert main(["--init", str(init), "--inputs", missing, "--out", str(tmp_path / "o")]) == 2
        assert one_error(capsys.readouterr().err) == f"error: --inputs {missing}: no such file or folder"
        assert not (tmp_path / "o").exists()
    (tmp_path / "nothing").mkdir()
    assert main(["--init", str(init), "--inputs", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no audio files" in capsys.readouterr().err
    (tmp_path / "list.jsonl").write_text("a.wav\n")
    assert main(["--init", str(init), "--inputs", str(tmp_path / "list.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "list.jsonl: line 1 is not JSON" in capsys.readouterr().err
    assert main([*base, "--device", "cuda:0"]) == (0 if torch.cuda.is_available() else 2)


@pytest.mark.parametrize("layer", [None, 1])
def test_the_linear_probe_features_are_the_embed_commands(tmp_path, synth_corpus, monkeypatch, layer):
    """Same init, layer and pooling: the probe's features are the clip embeddings embed.py writes."""
    from finetune import linear_probe

    data = tmp_path / "data"
    (data / "synth").mkdir(parents=True)
    for f in synth_corpus.glob("synth_*.json*"):
        (data / "synth" / f.name).symlink_to(f)
    init = _export(tmp_path / "e.safetensors", input_tdim=128)  # the synth task's 128 frames, AudioSet's norm
    seen = []
    real = linear_probe.fit_and_score
    monkeypatch.setattr(linear_probe, "fit_and_score", lambda x_tr, y_tr, x_te, *rest, **kw:
                        seen.append((x_tr, x_te)) or real(x_tr, y_tr, x_te, *rest, **kw))
    recipe = linear_probe.ProbeRecipe(tasks=["synth"], layer=layer, pool="mean", data_root=str(data), num_workers=0,
                                      cache_dir=str(tmp_path / "cache"))
    result = linear_probe.probe_task(str(init), "synth", recipe, torch.device("cpu"))
    assert result["pool"] == "mean"
    (x_train, x_test), = seen
    manifests = [data / "synth" / "synth_train.jsonl.gz", data / "synth" / "synth_test.jsonl.gz"]
    out = tmp_path / "emb"
    embed_files(init, manifests, out, layer=layer, pool="mean", workers=0)
    rows = read_index(out)
    firsts = read_clips(out)[[i for i, r in enumerate(rows) if r["window"] == 0]]  # the probe reads each clip's start
    assert firsts.shape == (len(x_train) + len(x_test), 32)
    assert np.allclose(firsts, np.concatenate([x_train, x_test]), atol=1e-5)
    from lhotse import CutSet

    assert [r["clip_id"] for r in rows if r["window"] == 0] == [c.id for m in manifests for c in
                                                               CutSet.from_file(m)]


def test_the_bar_counts_clips_against_their_total_skipped_ones_included(tmp_path, monkeypatch):
    from tests.helpers import _bars, fake_terminal

    init = _export(tmp_path / "e.safetensors")
    folder = tmp_path / "audio"
    folder.mkdir()
    for i in range(3):
        _write(folder / f"c{i}.wav", 0.3, seed=i)
    terminal = fake_terminal(monkeypatch)
    embed_files(init, [folder], tmp_path / "emb", workers=0)
    assert any("3/3" in s for s in _bars(terminal.getvalue(), f"embedding into {tmp_path / 'emb'}: 100%"))
    _write(folder / "c3.wav", 0.3, seed=3)
    terminal.seek(0)
    terminal.truncate()
    assert embed_files(init, [folder], tmp_path / "emb", workers=0).skipped == 3
    assert any("4/4" in s for s in _bars(terminal.getvalue(), f"embedding into {tmp_path / 'emb'}: 100%"))


def test_a_second_command_on_one_out_stops_at_once_naming_the_first(tmp_path, capsys):
    """Two commands writing one --out would interleave their shards: the second stops before it writes."""
    import os

    from common.system.lock import run_dir_lock

    init = _export(tmp_path / "e.safetensors")
    clip = _write(tmp_path / "a.wav", 0.5)
    argv = ["--init", str(init), "--inputs", str(clip), "--out", str(tmp_path / "o")]
    with run_dir_lock(tmp_path / "o"):  # what a running command holds
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and f"pid {os.getpid()}" in err[-1] and "another --out" in err[-1], err
        assert not (tmp_path / "o" / "shards").exists()
    assert main(argv) == 0 and len(read_index(tmp_path / "o")) == 1  # once the first has ended


def test_a_damaged_index_is_named_with_its_line(tmp_path):
    from finetune.embed_store import INDEX_COLUMNS

    index = tmp_path / "index.tsv"
    index.write_text("\t".join(INDEX_COLUMNS) + "\nclip\tsrc.wav\t0\t0.000000\t1.000000\t00000.npz\t0\nclip2\tsrc2")
    with pytest.raises(ValueError, match=r"index.tsv: line 3 is not an index row \(2 of 7 columns"):
        read_index(tmp_path)
    index.write_text("id\tpath\n")
    with pytest.raises(ValueError, match=r"index.tsv is not an embedding index"):
        read_index(tmp_path)


def test_the_linear_probes_layer_takes_final_or_a_block_as_embed_does(tmp_path, synth_corpus, capsys):
    """``--layer final`` (the default: every block and the final norm) and block numbers, as ``c2f-embed`` takes
    them, also in a probe recipe; the table's header says which; a bad value is one line."""
    from finetune.linear_probe import main as probe

    data = tmp_path / "data"
    (data / "synth").mkdir(parents=True)
    for f in synth_corpus.glob("synth_*.json*"):
        (data / "synth" / f.name).symlink_to(f)
    init = _export(tmp_path / "e.safetensors", input_tdim=128)
    base = ["--init", str(init), "--task", "synth", "--data-root", str(data), "--workers", "0", "--pool", "mean",
            "--cache-dir", str(tmp_path / "cache")]
    values = {}
    for layer, header in (("final", "layer final"), ("-1", "layer block -1"), (None, "layer final")):
        out = tmp_path / f"probe_{layer}.json"
        assert probe([*base, "--out", str(out), *(["--layer", layer] if layer else [])]) == 0
        assert header in capsys.readouterr().out
        values[layer] = json.loads(out.read_text())[0]["value"]
    assert values["final"] == values[None]
    # a cached file that is not the probe's (cut short, another file, arrays that do not go together) is named and
    # computed again: the same value (it was a BadZipFile or KeyError traceback, or an error naming no file)
    cached = sorted((tmp_path / "cache").glob("*.npz"))
    assert cached
    for damage in (lambda f: f.write_bytes(f.read_bytes()[:100]), lambda f: np.savez(f.open("wb"), z=np.zeros(3)),
                   lambda f: np.savez(f.open("wb"), x=np.zeros(3), y=np.zeros(3))):
        for f in cached:
            damage(f)
        out = tmp_path / "probe_again.json"
        assert probe([*base, "--out", str(out)]) == 0
        assert json.loads(out.read_text())[0]["value"] == values["final"]
        err = capsys.readouterr().err
        assert any(f"feature cache {f} is unusable" in err for f in cached), err
    recipe = tmp_path / "probe.yaml"
    recipe.write_text("layer: final\n")
    assert probe([*base, "--recipe", str(recipe)]) == 0 and "layer final" in capsys.readouterr().out
    assert probe([*base, "--layer", "zero"]) != 0
    assert "--layer: 'final' or a block number" in capsys.readouterr().err


def test_the_linear_probe_checks_every_tasks_data_before_the_first_features(tmp_path, synth_corpus, capsys):
    """A suite whose second task is not prepared stops before the first task's features (hours on a large corpus,
    all lost when the second failed), in one line naming the task and the file."""
    from finetune.linear_probe import main as probe

    data = tmp_path / "data"
    (data / "synth").mkdir(parents=True)
    for f in synth_corpus.glob("synth_*.json*"):
        (data / "synth" / f.name).symlink_to(f)
    init = _export(tmp_path / "e.safetensors", input_tdim=128)
    cache = tmp_path / "cache"
    assert probe(["--init", str(init), "--task", "synth", "esc50", "--data-root", str(data), "--workers", "0",
                  "--cache-dir", str(cache)]) == 2
    assert one_error(capsys.readouterr().err) == (f"error: task esc50: task.classes: class list {data}/esc50/"
                                                  f"esc50_classes.json does not exist; it is written by `python -m "
                                                  f"common.data.corpora prepare`")
    assert not cache.exists()
