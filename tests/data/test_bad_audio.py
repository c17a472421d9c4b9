"""Bad audio everywhere: validation clips are listed and counted, each clip once per run, missing and
truncated files named as such, at preparation and at load, and all-bad validation sets stop clearly."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from common.data.bad_audio import BadAudioTracker, TooMuchBadAudio
from common.data.clips import ClipDataset
from common.data.decode import BadClip, load_clip
from common.data.loader import ClipLoader
from common.data.manifests import open_cuts
from finetune.run import main as finetune
from tests.layouts import truncate, write_clip

TINY = ["model.size=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.batch_size=4",
        "data.num_workers=0", "optim.warmup_steps=0", "train.log_every=1"]


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def local_manifest(src: Path, out: Path, name: str, first: int, damage: dict[int, str]) -> Path:
    """The first ``first`` clips of a synth manifest, copied as WAV files under ``out``; clip ``i`` damaged as
    ``damage[i]``: ``delete`` (after preparation), ``garbage``, ``truncate`` (a little, so a decoder pads it)."""
    out.mkdir(parents=True, exist_ok=True)
    cuts = []
    for i, cut in enumerate(CutSet.from_file(src).to_eager().subset(first=first)):
        path = out / f"{name}-{i}.wav"
        sf.write(str(path), cut.load_audio()[0], cut.sampling_rate)
        cut.recording.sources[0].source = str(path)
        cuts.append(cut)
        kind = damage.get(i)
        if kind == "delete":
            path.unlink()
        elif kind == "garbage":
            path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot audio")
        elif kind == "truncate":
            truncate(path, keep=0.97)
    manifest = out / f"{name}.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(manifest)
    return manifest


def test_a_deleted_file_is_missing_and_a_truncated_one_truncated_at_load(tmp_path, synth_corpus):
    manifest = local_manifest(synth_corpus / "synth_train.jsonl.gz", tmp_path, "m", 3, {0: "delete", 1: "truncate"})
    cuts = list(CutSet.from_file(manifest))
    with pytest.raises(BadClip, match=r"^missing \(no such file\)$"):
        load_clip(cuts[0], 16000)
    # 3 % of the bytes gone: Lhotse would pad it back to its declared length; the WAV header tells
    with pytest.raises(BadClip, match=r"^truncated \(header: \d+ samples, file holds \d+\)"):
        load_clip(cuts[1], 16000)
    assert load_clip(cuts[2], 16000).size == cuts[2].num_samples


def test_a_truncated_file_is_caught_at_preparation(tmp_path):
    from common.data.corpora import get_corpus

    src = tmp_path / "src"
    for label in ("a", "b"):
        for i in range(3):
            write_clip(src / label / f"{i}.flac" if i == 0 else src / label / f"{i}.wav", seconds=1.0, seed=i)
    truncate(src / "a" / "1.wav", keep=0.6)  # the header survives, 40 % of the data does not
    truncate(src / "b" / "0.flac", keep=0.95)
    report = get_corpus("custom").prepare(src, tmp_path / "out", name="mine")
    reasons = dict(report.unreadable)
    assert set(reasons) == {str(src / "a" / "1.wav"), str(src / "b" / "0.flac")}
    assert reasons[str(src / "a" / "1.wav")].startswith("truncated (header: 16000 samples, file holds ")
    assert reasons[str(src / "b" / "0.flac")].startswith("truncated")
    assert report.clips["train"] == 4


def test_a_long_path_leaves_the_decoder_s_reason_whole_at_preparation_and_at_load(tmp_path):
    """libsndfile's message begins with the file's path ("Error opening '<path>': ..."); the corpus report and
    bad_audio.tsv, which name the file beside it, cut the reason at 300 and 200 characters: under a path of 300 or
    more only the path was left. The reason is now libsndfile's message without that beginning."""
    from lhotse import Recording

    from common.data.corpora import get_corpus
    from common.data.integrity import decoder_reason
    from tests.layouts import write_garbage

    src = tmp_path / "src"
    broken = src.joinpath("dog", *[f"folder-{i}-" + "x" * 40 for i in range(7)], "broken.wav")
    assert len(str(broken)) > 300
    write_clip(broken, seconds=0.3)
    cut = Recording.from_file(broken).to_cut()
    write_garbage(broken)  # a failed download, found at preparation and, of a clip prepared before, at load
    write_clip(src / "dog" / "a.wav", seconds=0.3)
    write_clip(src / "cat" / "b.wav", seconds=0.3)
    reason = "Error in WAV file. No 'data' chunk marker. (LibsndfileBackend)"
    report = get_corpus("custom").prepare(src, tmp_path / "out", name="mine")
    assert dict(report.unreadable)[str(broken)] == f"AudioLoadingError: {reason}"
    with pytest.raises(BadClip) as info:
        load_clip(cut, 16000)
    assert str(info.value) == f"unreadable (AudioLoadingError: {reason})"
    for name in ("/a/it's.wav", "/a/b': c.wav", "/a/both'\".wav"):  # as Python writes the name, quotes and all
        assert decoder_reason(RuntimeError(f"Error opening {name!r}: Format not recognised.")) == \
            "Format not recognised."


def test_an_in_memory_clip_s_reason_is_the_same_at_every_run():
    """A Shar clip's audio is read from memory: libsndfile names it by its object (an address that changes at
    every run) and Lhotse appends the call with the clip's whole manifest entry; bad_audio.tsv gets the reason."""
    from lhotse import AudioSource, Recording

    recording = Recording(id="r", sources=[AudioSource(type="memory", channels=[0], source=b"RIFF" + bytes(200))],
                          sampling_rate=16000, num_samples=16000, duration=1.0)
    with pytest.raises(BadClip) as info:
        load_clip(recording.to_cut(), 16000)
    assert str(info.value) == "unreadable (AudioLoadingError: Format not recognised.)"


def test_each_bad_clip_is_listed_once_per_run_and_counted_every_time(tmp_path, synth_corpus):
    manifest = local_manifest(synth_corpus / "synth_train.jsonl.gz", tmp_path, "m", 8, {2: "garbage"})
    log = tmp_path / "bad_audio.tsv"

    def epochs(n, tracker):
        loader = ClipLoader(open_cuts([manifest]), ClipDataset(8000), 4, shuffle=True, drop_last=False, seed=0,
                            rank=0, world_size=1, tracker=tracker)
        return [b for b in loader.batches(epochs=n)]

    tracker = BadAudioTracker(max_fraction=0.5, min_clips=1, log_path=str(log))
    epochs(3, tracker)
    assert (tracker.seen, tracker.bad) == (24, 3)  # counted in every epoch: the share is that of the data
    valid = tracker.for_split("valid", [str(manifest)])
    assert tracker.for_split("valid") is valid
    loader = ClipLoader(open_cuts([manifest]), ClipDataset(8000), 4, shuffle=False, drop_last=False,
                        rank=0, world_size=1, tracker=valid)
    for _ in range(2):
        list(loader.batches(epochs=1))
    assert (valid.seen, valid.bad) == (16, 2)
    lines = log.read_text().splitlines()
    assert lines[0] == "split\tpath\treason" and len(lines) == 3
    assert [line.split("\t")[:2] for line in lines[1:]] == [["train", str(tmp_path / "m-2.wav")],
                                                            ["valid", str(tmp_path / "m-2.wav")]]
    # a resumed run (new tracker, state from the checkpoint) neither lists the clip again nor loses counts
    resumed = BadAudioTracker(max_fraction=0.5, min_clips=1, log_path=str(log))
    resumed.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert (resumed.for_split("valid").seen, resumed.for_split("valid").bad) == (16, 2)
    epochs(1, resumed)
    assert len(log.read_text().splitlines()) == 3 and (resumed.seen, resumed.bad) == (32, 4)


def test_no_usable_clip_in_a_split_names_its_manifests(tmp_path, synth_corpus):
    manifest = local_manifest(synth_corpus / "synth_valid.jsonl.gz", tmp_path, "v", 3,
                              {0: "garbage", 1: "delete", 2: "garbage"})
    tracker = BadAudioTracker(1.0).for_split("valid", [str(manifest)])  # even with nothing tolerated
    loader = ClipLoader(open_cuts([manifest]), ClipDataset(8000), 2, shuffle=False, drop_last=False,
                        rank=0, world_size=1, tracker=tracker)
    with pytest.raises(TooMuchBadAudio, match=rf"none of the 3 valid clips of {manifest} could be used"):
        list(loader.batches(epochs=1))


def test_a_split_whose_files_are_mostly_missing_asks_whether_the_corpus_moved(tmp_path, synth_corpus):
    """A corpus moved (or its disk not mounted) since its manifests were written, which hold absolute paths: the
    run stopped naming only missing files. It says the likely cause; bad files of other kinds say nothing of it."""
    moved = local_manifest(synth_corpus / "synth_valid.jsonl.gz", tmp_path, "v", 3, {0: "delete", 1: "delete"})
    garbage = local_manifest(synth_corpus / "synth_valid.jsonl.gz", tmp_path, "g", 3, {0: "garbage", 1: "garbage"})
    for manifest, said in ((moved, True), (garbage, False)):
        tracker = BadAudioTracker(0.1, min_clips=1)
        loader = ClipLoader(open_cuts([manifest]), ClipDataset(8000), 3, shuffle=False, drop_last=False,
                            rank=0, world_size=1, tracker=tracker)
        with pytest.raises(TooMuchBadAudio) as caught:
            list(loader.batches(epochs=1))
        assert ("most are missing: was the corpus moved, or is its disk not mounted, since its manifests were "
                "written? They hold absolute paths: prepare it again where it is now" in str(caught.value)) == said


@pytest.fixture
def data_root(tmp_path, synth_corpus) -> Path:
    data = tmp_path / "data"
    (data / "synth").mkdir(parents=True)
    for f in synth_corpus.glob("synth_*.json*"):
        (data / "synth" / f.name).symlink_to(f)
    return data


@pytest.mark.slow
def test_fine_tuning_lists_and_counts_bad_validation_clips(tmp_path, synth_corpus, data_root):
    valid = local_manifest(synth_corpus / "synth_valid.jsonl.gz", tmp_path / "v", "valid", 8, {1: "delete"})
    train = local_manifest(synth_corpus / "synth_train.jsonl.gz", tmp_path / "t", "train", 12, {5: "garbage"})
    run_dir = tmp_path / "run"
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(data_root), "--run-dir", str(run_dir),
                     *sets(*TINY, f"task.valid=[{valid}]", f"task.train=[{train}]", "data.max_bad_fraction=0.2",
                           "phases=[{compression: none, epochs: 2}]")]) == 0
    header, *lines = (run_dir / "bad_audio.tsv").read_text().splitlines()
    rows = sorted(tuple(line.split("\t")) for line in lines)  # two epochs, each clip listed once
    assert header == "split\tpath\treason" and [r[:2] for r in rows] == [
        ("train", str(tmp_path / "t" / "train-5.wav")), ("valid", str(tmp_path / "v" / "valid-1.wav"))]
    assert rows[0][2].startswith("unreadable (") and rows[1][2] == "missing (no such file)"
    ckpt = sorted((run_dir / "checkpoints").glob("phase*"))[-1]
    tracker = json.loads((ckpt / "trainer_state.json").read_text())["tracker"]
    # the phase-end checkpoint, written again when the phase closed after its own validation, has counted both
    assert tracker["splits"]["valid"]["bad"] == 2 and tracker["splits"]["valid"]["seen"] == 16
    assert tracker["bad"] == 2 and tracker["reasons"] == {"unreadable": 2}


@pytest.mark.slow
@pytest.mark.parametrize("eval_batches", [None, 1])
def test_all_bad_validation_clips_stop_with_a_clear_error(tmp_path, synth_corpus, data_root, eval_batches, capsys):
    valid = local_manifest(synth_corpus / "synth_valid.jsonl.gz", tmp_path / "v", "valid", 4,
                           {i: "garbage" for i in range(4)})
    extra = [] if eval_batches is None else [f"train.eval_batches={eval_batches}"]
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(data_root), "--run-dir",
                     str(tmp_path / "run"), *sets(*TINY, f"task.valid=[{valid}]", *extra,
                                                   "phases=[{compression: none, epochs: 1}]")]) == 1
    err = capsys.readouterr().err
    assert "need at least one array" not in err and "Traceback" not in err
    if eval_batches is None:  # a whole pass: the tracker names the manifest
        assert f"none of the 4 valid clips of {valid} could be used" in err
    else:  # a partial pass (eval_batches): the objective says so
        assert "validation: none of the clips read could be used" in err and "bad_audio.tsv" in err


def test_non_wav_and_whole_files_pass_the_integrity_check(tmp_path):
    from common.data.integrity import truncation, wav_data_extent

    whole = write_clip(tmp_path / "a.wav", seconds=0.5)
    assert truncation(whole) is None and wav_data_extent(whole) == (16000, 16000, 2)
    assert truncation(write_clip(tmp_path / "a.flac", seconds=0.5)) is None
    assert truncation(write_clip(tmp_path / "s.wav", seconds=0.5, channels=2, subtype="FLOAT")) is None
    ogg = write_clip(tmp_path / "a.ogg", seconds=0.5)
    assert truncation(truncate(ogg, 0.5)) is None  # no length in the header to contradict: the decoder's job
    stream = tmp_path / "stream.wav"  # a streamed WAV declares no data size
    data = bytearray(whole.read_bytes())
    data[40:44] = b"\xff\xff\xff\xff"
    stream.write_bytes(bytes(data))
    assert wav_data_extent(stream) is None and truncation(stream) is None


@pytest.mark.parametrize("name, subtype", [("a.aiff", None), ("b.aiff", "PCM_24"), ("c.rf64", None),
                                           ("d.w64", None), ("e.w64", "PCM_24")])
def test_a_truncated_aiff_rf64_or_wave64_file_is_named(tmp_path, name, subtype):
    """libsndfile shortens these as it does a WAV (the clip passed as a shorter one once corpus preparation and
    prediction read them): their headers' sizes against the bytes present say so."""
    from common.data.integrity import data_extent, truncation

    path = write_clip(tmp_path / name, seconds=0.5, channels=2, subtype=subtype)
    declared, present, frame = data_extent(path)
    assert present >= declared == 8000 * frame and truncation(path) is None
    assert truncation(truncate(path, 0.5)).startswith("truncated (header: 8000 samples, file holds ")


def test_compressed_aiff_c_and_senseless_headers_are_left_to_the_decoder(tmp_path):
    """A compressed AIFF-C's sample size says nothing of its bytes (an intact GSM file was called truncated), and a
    header whose sizes make no sense raised out of the check (one bad file stopped a corpus preparation)."""
    from common.data.integrity import data_extent, truncation

    gsm = tmp_path / "g.aiff"
    sf.write(str(gsm), [0.0] * 8000, 8000, format="AIFF", subtype="GSM610")
    assert data_extent(gsm) is None and truncation(gsm) is None
    wave64 = write_clip(tmp_path / "w.w64", seconds=0.5)
    data = bytearray(wave64.read_bytes())
    data[56:64] = (2 ** 63 + 5).to_bytes(8, "little")  # the fmt chunk's 64-bit size
    wave64.write_bytes(bytes(data))
    assert truncation(wave64) is None


def test_a_truncated_aiff_is_bad_audio_when_a_clip_is_loaded(tmp_path):
    """Loading a clip checks the header of every format that declares its size (it checked .wav files only)."""
    from lhotse import Recording

    clip = truncate(write_clip(tmp_path / "a.aiff", seconds=1.0), 0.7)
    with pytest.raises(BadClip, match="truncated"):
        load_clip(Recording.from_file(clip).to_cut(), 16000)


@pytest.mark.slow
def test_after_a_resume_bad_audio_tsv_lists_what_is_bad_now(tmp_path, synth_corpus, data_root, capsys):
    """A file missing in the first attempt comes back before the resume: it leaves the list (the log says
    so), a clip still bad stays with its reason of now, and the counts keep the run's history."""
    valid = local_manifest(synth_corpus / "synth_valid.jsonl.gz", tmp_path / "v", "valid", 8, {})
    train = local_manifest(synth_corpus / "synth_train.jsonl.gz", tmp_path / "t", "train", 12, {5: "garbage"})
    missing, aside = tmp_path / "t" / "train-3.wav", tmp_path / "aside.wav"
    missing.rename(aside)
    run_dir = tmp_path / "run"
    argv = ["--init", "none", "--task", "synth", "--data-root", str(data_root), "--run-dir", str(run_dir),
            *sets(*TINY, f"task.valid=[{valid}]", f"task.train=[{train}]", "data.max_bad_fraction=0.3",
                  "phases=[{compression: none, epochs: 2}]")]
    assert finetune([*argv, "--stop-after-steps", "4"]) == 0  # the first epoch (3 steps): both bad clips met
    rows = sorted(line.split("\t")[1:] for line in (run_dir / "bad_audio.tsv").read_text().splitlines()[1:])
    assert rows == [[str(missing), "missing (no such file)"], [str(tmp_path / "t" / "train-5.wav"), rows[1][1]]]
    aside.rename(missing)  # the file is back
    capsys.readouterr()
    assert finetune(argv) == 0
    assert (f"1 clip(s) listed by an earlier attempt read fine now and are no longer listed ({missing}); 1 still are"
            in capsys.readouterr().err)
    header, *lines = (run_dir / "bad_audio.tsv").read_text().splitlines()
    assert header == "split\tpath\treason" and len(lines) == 1
    assert lines[0].startswith(f"train\t{tmp_path / 't' / 'train-5.wav'}\tunreadable (")
    ckpt = sorted((run_dir / "checkpoints").glob("phase*"))[-1]
    tracker = json.loads((ckpt / "trainer_state.json").read_text())["tracker"]
    assert tracker["reasons"] == {"missing": 1, "unreadable": 2}  # the history: epoch 1 both, epoch 2 one


@pytest.mark.slow
def test_max_bad_fraction_may_change_on_resume_and_is_recorded(tmp_path, synth_corpus, data_root, capsys):
    train = local_manifest(synth_corpus / "synth_train.jsonl.gz", tmp_path / "t", "train", 12, {5: "garbage"})
    run_dir = tmp_path / "run"

    def run(fraction: float, *extra: str) -> int:
        return finetune(["--init", "none", "--task", "synth", "--data-root", str(data_root), "--run-dir",
                         str(run_dir), *extra, *sets(*TINY, f"task.train=[{train}]", "phases=[{compression: none, "
                                                     "epochs: 2}]", f"data.max_bad_fraction={fraction}")])

    assert run(0.05, "--stop-after-steps", "1") == 0  # a checkpoint before the first epoch is judged
    capsys.readouterr()
    assert run(0.05) == 1  # 1 clip of 12 is bad: more than 5 %
    err = capsys.readouterr().err
    assert "more than max_bad_fraction=5.0%" in err and "--set data.max_bad_fraction=F" in err
    assert run(0.1) == 0  # the error's advice: the resumed run tolerates more, and the ledger says so
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["interventions"] == [{"step": 1, "phase": 0, "changes": {
        "data.max_bad_fraction": {"from": 0.05, "to": 0.1}}}]
    assert "max_bad_fraction: 0.1" in (run_dir / "recipe.yaml").read_text()
    # the launch that trained on says once that the clip listed by the one that stopped is skipped again
    assert f"{run_dir / 'bad_audio.tsv'}: 1 clip(s) an earlier attempt could not read are listed there; each is " \
           f"skipped again when met" in capsys.readouterr().err


def test_the_recheck_keeps_what_it_cannot_check_and_what_is_still_bad(tmp_path):
    log = tmp_path / "bad_audio.tsv"
    text = ("split\tpath\treason\ntrain\tshar-cut-17\tunreadable (LibsndfileError: ...)\n"
            f"valid\t{tmp_path / 'gone.wav'}\tmissing (no such file)\n")
    log.write_text(text)
    BadAudioTracker(log_path=str(log)).recheck_listed()
    assert log.read_text() == text  # a Shar clip (no file to open) and a file still missing stay listed
    # files that read fine alone, bad against their manifests: only a manifest could clear them, so they stay;
    # a file whose header promised more than it held and that reads fine now (downloaded again) leaves
    good = [str(write_clip(tmp_path / f"{name}.wav", seconds=0.5)) for name in ("rate", "short", "lost", "back")]
    against = ("changed since its manifest was written (the file is 8000 Hz, the manifest says 16000 Hz): prepare "
               "the manifest again", "truncated (4000 of 8000 samples)",
               "unreadable (AudioLoadingError: The number of declared samples in the recording diverged ...)")
    rows = [*zip(good, against), (good[3], "truncated (header: 8000 samples, file holds 100)")]
    log.write_text("split\tpath\treason\n" + "".join(f"train\t{path}\t{reason}\n" for path, reason in rows))
    BadAudioTracker(log_path=str(log)).recheck_listed()
    assert log.read_text() == "split\tpath\treason\n" + "".join(f"train\t{p}\t{r}\n" for p, r in rows[:3])


def test_a_manifest_that_would_run_a_command_or_fetch_a_url_is_refused(tmp_path):
    """Lhotse runs a ``command`` audio source through the shell and fetches a ``url`` one: nothing a user loads
    may run code, so such a clip is refused (named and counted as bad audio, the command never run), and the
    checks before a run refuse a manifest that starts with one."""
    from lhotse import MonoCut, Recording
    from lhotse.audio import AudioSource

    from common.config.recipe import RecipeError
    from common.data.preflight import check_manifest

    wav = write_clip(tmp_path / "a.wav", seconds=0.5)
    marker = tmp_path / "ran"
    good = Recording.from_file(wav)
    cuts = []
    for kind, source in (("command", f"touch {marker}; cat {wav}"), ("url", "http://127.0.0.1:9/a.wav")):
        recording = Recording(id=kind, sources=[AudioSource(type=kind, channels=[0], source=source)],
                              sampling_rate=good.sampling_rate, num_samples=good.num_samples, duration=good.duration)
        cuts.append(MonoCut(id=kind, start=0.0, duration=good.duration, channel=0, recording=recording))
        with pytest.raises(BadClip, match=f"refused .*'{kind}' audio source"):
            load_clip(cuts[-1], 16000)
    assert not marker.exists()
    manifest = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(manifest)
    with pytest.raises(RecipeError, match=r"data.train.0: manifest .*cuts.jsonl.gz: clip command: refused"):
        check_manifest(manifest, "data.train.0")
    assert not marker.exists()
    assert load_clip(good.to_cut(), 16000).size == good.num_samples  # a file source reads as before


def test_a_clip_changed_after_its_manifest_is_bad_audio_not_padded(tmp_path):
    """Lhotse reads a file at its manifest's rate and pads a shortfall of up to half a second with the clip's own
    mirrored end: a clip re-encoded at half the rate, or cut short, would train as something it is not."""
    from lhotse import Recording

    halved = write_clip(tmp_path / "a.wav", seconds=1.0)
    cut = Recording.from_file(halved).to_cut()
    data, rate = sf.read(halved, dtype="float32")
    sf.write(halved, data[::2], rate // 2)  # re-encoded in place at 8 kHz
    with pytest.raises(BadClip, match=r"changed since its manifest was written \(the file is 8000 Hz, the manifest "
                                      r"says 16000 Hz\)"):
        load_clip(cut, 16000)
    short = write_clip(tmp_path / "b.flac", seconds=1.0)
    cut = Recording.from_file(short).to_cut()
    data, rate = sf.read(short, dtype="float32")
    sf.write(short, data[: int(0.7 * rate)], rate)  # edited: 0.3 s shorter
    with pytest.raises(BadClip, match="unreadable"):
        load_clip(cut, 16000)
    unchanged = write_clip(tmp_path / "c.flac", seconds=1.0)
    assert load_clip(Recording.from_file(unchanged).to_cut(), 32000).size == 32000  # resampled as before
    # a manifest that resamples on load (Lhotse's resample(), written into the manifest): the file's rate is the
    # transform's source rate, as prepared; re-encoded after that, it is changed
    resampled = Recording.from_file(unchanged).to_cut().resample(8000)
    again = CutSet.from_dicts([resampled.to_dict()])[0]  # as read back from a manifest file
    for cut in (resampled, again):
        assert load_clip(cut, 8000).size == 8000 and load_clip(cut, 16000).size == 16000
    data, rate = sf.read(unchanged, dtype="float32")
    sf.write(unchanged, data[::2], rate // 2)
    with pytest.raises(BadClip, match=r"changed since .*\(the file is 8000 Hz, the manifest says 16000 Hz\)"):
        load_clip(again, 8000)


def test_a_shar_export_leaves_out_a_clip_shorter_than_its_manifest_says(tmp_path):
    """``c2f-corpora shar`` alone (a fresh process: nothing else narrowed Lhotse's process-wide tolerance) treats
    a clip 0.3 s shorter than its manifest as unreadable, as training does, instead of padding it (Lhotse's 0.5 s)."""
    import gzip
    import os
    import subprocess
    import sys

    from lhotse import Recording

    files = [write_clip(tmp_path / f"{name}.flac", seconds=1.0) for name in "abcd"]
    CutSet.from_cuts(Recording.from_file(f).to_cut() for f in files).to_file(tmp_path / "m.jsonl.gz")
    data, rate = sf.read(files[1], dtype="float32")
    sf.write(files[1], data[: int(0.7 * rate)], rate)  # edited after the manifest: 0.3 s shorter
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "common.data.corpora", "shar", str(tmp_path / "m.jsonl.gz"),
                           "--out", str(tmp_path / "shar"), "--shard-size", "10"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    exported = [line for shard in sorted((tmp_path / "shar").glob("cuts.*.jsonl.gz"))
                for line in gzip.open(shard, "rt") if line.strip()]
    assert len(exported) == 3 and not any(Path(files[1]).stem in line for line in exported)


def test_a_file_named_like_a_shell_command_is_only_a_name(tmp_path, monkeypatch):
    """Lhotse's default backends read ``*.sph`` with sph2pipe and open ``pipe:...`` paths through a shell, the path
    unquoted: a manifest entry, a file given to predict or embed, or a file in a prepared tree named
    ``x; COMMAND; .sph`` ran COMMAND. This package's Lhotse has no backend that starts a subprocess
    (``common.data.lhotse_safety``): such a clip is bad audio, such a manifest cannot be opened, nothing runs; a
    real NIST SPHERE file still reads (libsndfile)."""
    import numpy as np
    from lhotse import MonoCut, Recording
    from lhotse.audio import AudioSource

    from common.data.audio_file import AudioFile
    from common.data.corpora.base import ClipEntry, _read_cut

    monkeypatch.chdir(tmp_path)  # a command in a file name writes here
    marker = tmp_path / "ran"
    named = tmp_path / "x; touch ran; .sph"
    named.write_bytes(np.random.default_rng(0).bytes(4000))
    recording = Recording(id="r", sources=[AudioSource(type="file", channels=[0], source=str(named))],
                          sampling_rate=16000, num_samples=8000, duration=0.5)
    with pytest.raises(BadClip):
        load_clip(MonoCut(id="c", start=0.0, duration=0.5, channel=0, recording=recording), 16000)
    with pytest.raises(ValueError):
        AudioFile(named, 16000)
    assert _read_cut(ClipEntry("c", named, "train", ()), "custom")[1] is None
    with pytest.raises(Exception):  # noqa: B017 - whatever Lhotse raises for a path it cannot open
        CutSet.from_file("pipe:touch ran; echo {}")
    assert not marker.exists()
    sphere = tmp_path / "real.sph"
    sf.write(sphere, np.zeros(8000, dtype=np.float32) + 0.1, 16000, format="NIST", subtype="PCM_16")
    cut = Recording.from_file(sphere).to_cut()
    assert load_clip(cut, 16000).shape == (8000,)


@pytest.mark.parametrize("scale, bad", [(1.5, False), (4.0, False), (12000.0, True), (1e30, True)])
def test_float_samples_far_outside_full_scale_are_bad_audio_in_training_and_inference(tmp_path, scale, bad):
    """A float file a little over full scale trains; one at integer scale (int16 values written as float: every
    log-mel value ~20 too high) or of garbage floats (1e30: NaN features, a NaN loss naming no clip) is bad audio,
    with the same reason where training loads it and where predict and embed read it."""
    from lhotse import Recording

    from common.data.audio_file import AudioFile, AudioReadError
    from common.data.decode import audio_file_problem
    from common.data.integrity import MAX_SAMPLE_PEAK

    tone = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    path = tmp_path / "scaled.wav"
    sf.write(path, (scale * tone).astype(np.float32), 16000, subtype="FLOAT")
    cut = Recording.from_file(path).to_cut()
    if not bad:
        assert np.abs(load_clip(cut, 16000)).max() == pytest.approx(scale, rel=1e-3)
        assert audio_file_problem(str(path)) is None
        with AudioFile(path, 16000) as audio:
            assert audio.read(0, 16000).size == 16000
        return
    assert scale > MAX_SAMPLE_PEAK
    reason = (rf"^samples far outside \[-1, 1\] \(peak {scale:.2g}\): not float audio at full scale \(garbage data, "
              rf"or integer PCM written as float\?\)$").replace("+", r"\+")
    with pytest.raises(BadClip, match=reason):
        load_clip(cut, 16000)
    with pytest.raises(BadClip, match=reason):
        load_clip(cut, 32000, channels="mean")  # resampled: the same peak, up to the filter's ripple
    assert audio_file_problem(str(path)).startswith("samples far outside")  # a resume's recheck keeps it listed
    with pytest.raises(AudioReadError, match=reason):  # predict, embed
        with AudioFile(path, 16000) as audio:
            audio.read(0, 16000)


@pytest.mark.slow
def test_fine_tuning_s_test_score_applies_max_bad_fraction_and_counts_bad_clips(tmp_path, synth_corpus, data_root,
                                                                               capsys):
    """The test score a run reports (the paper's tables) is of the clips that could be read: more bad ones than
    data.max_bad_fraction stop the run as in validation, and test_metrics.json says how many were skipped, as
    c2f-evaluate does; the advice (a resume that tolerates more) scores it."""
    test = local_manifest(synth_corpus / "synth_test.jsonl.gz", tmp_path / "s", "test", 12, {4: "delete"})
    run_dir = tmp_path / "run"

    def run(fraction: float) -> int:
        return finetune(["--init", "none", "--task", "synth", "--data-root", str(data_root), "--run-dir",
                         str(run_dir), *sets(*TINY, f"task.test=[{test}]", f"data.max_bad_fraction={fraction}",
                                             "phases=[{compression: none, epochs: 1}]")])

    assert run(0.05) == 1  # 1 of 12 test clips: more than 5 %
    err = capsys.readouterr().err
    assert "1 of 12 clips (8.3%) could not be used (test), more than max_bad_fraction=5.0%" in err
    assert not (run_dir / "test_metrics.json").exists()
    assert run(0.1) == 0
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["clips"] == 11 and metrics["bad_clips"] == 1
    rows = (run_dir / "bad_audio.tsv").read_text().splitlines()[1:]
    assert rows == [f"test\t{tmp_path / 's' / 'test-4.wav'}\tmissing (no such file)"]


def test_the_tracker_s_counts_are_every_split_s_including_those_kept_from_a_checkpoint(tmp_path):
    import torch

    from common.data.clips import Batch

    def batch(clips: int, bad: int, reason: str = "missing (no such file)") -> Batch:
        ids = [f"c{i}" for i in range(clips)]
        return Batch(torch.zeros(clips, 8), torch.full((clips,), 8), None, ids,
                     bad=[(f"{tmp_path}/b{i}.wav", reason) for i in range(bad)])

    tracker = BadAudioTracker(1.0)
    tracker.update(batch(3, 1))
    tracker.for_split("valid").update(batch(2, 2, "unreadable (x)"))
    assert tracker.counts() == {"train": {"seen": 4, "bad": 1, "reasons": {"missing": 1}},
                                "valid": {"seen": 4, "bad": 2, "reasons": {"unreadable": 2}}}
    resumed = BadAudioTracker(1.0)
    resumed.load_state_dict(json.loads(json.dumps(tracker.state_dict())))  # valid not opened again yet
    assert resumed.counts() == tracker.counts()


@pytest.mark.slow
def test_ledger_json_counts_bad_clips_per_split_exactly_through_a_resume_and_the_last_line_says_so(
        tmp_path, synth_corpus, data_root, capsys):
    """The counts were only in the checkpoints' trainer state: ledger.json holds them per split (every time a clip
    was met), the same for a run stopped and resumed as for one that ran through, and the run's last line says
    how many clips were skipped and where they are listed."""
    valid = local_manifest(synth_corpus / "synth_valid.jsonl.gz", tmp_path / "v", "valid", 8, {1: "delete"})
    train = local_manifest(synth_corpus / "synth_train.jsonl.gz", tmp_path / "t", "train", 12, {5: "garbage"})
    ledgers = {}
    for name, stop in (("through", None), ("resumed", 4)):
        run_dir = tmp_path / name
        argv = ["--init", "none", "--task", "synth", "--data-root", str(data_root), "--run-dir", str(run_dir),
                *sets(*TINY, f"task.valid=[{valid}]", f"task.train=[{train}]", "data.max_bad_fraction=0.2",
                      "phases=[{compression: none, epochs: 2}]")]
        if stop:
            assert finetune([*argv, "--stop-after-steps", str(stop)]) == 0  # into the second epoch
            capsys.readouterr()
        assert finetune(argv) == 0
        ledgers[name] = json.loads((run_dir / "ledger.json").read_text())["bad_audio"]
        assert capsys.readouterr().out.strip().endswith(
            f"; bad audio skipped 4 time(s) (the clips: {run_dir / 'bad_audio.tsv'})")  # 2 clips, 2 epochs
    assert ledgers["through"] == {"train": {"seen": 24, "bad": 2, "reasons": {"unreadable": 2}},
                                  "valid": {"seen": 16, "bad": 2, "reasons": {"missing": 2}}}
    assert ledgers["resumed"] == ledgers["through"]


@pytest.mark.slow
def test_pretraining_s_last_line_says_how_many_clips_were_skipped(tmp_path, synth_corpus, capsys):
    from tests.helpers import run as pretrain

    pool = local_manifest(synth_corpus / "synth_pool.jsonl.gz", tmp_path / "p", "pool", 12, {3: "garbage"})
    run_dir = tmp_path / "run"
    assert pretrain(run_dir, synth_corpus, f"data.train=[{{path: {pool}}}]", "data.max_bad_fraction=0.5") == 0
    bad = json.loads((run_dir / "ledger.json").read_text())["bad_audio"]
    assert bad["train"]["bad"] >= 1 and sum(s["bad"] for s in bad.values()) == bad["train"]["bad"]
    assert capsys.readouterr().out.strip() == (
        f"done: {run_dir / 'model.safetensors'} (ledger: {run_dir / 'ledger.json'}); bad audio skipped "
        f"{bad['train']['bad']} time(s) (the clips: {run_dir / 'bad_audio.tsv'})")


def test_the_linear_probe_counts_judges_and_repeats_from_its_cache_the_clips_it_skipped(tmp_path, synth_corpus,
                                                                                          capsys):
    """The probe skipped bad clips without a limit or a count, logged them as '(eval)', and said nothing when its
    features came from the cache: it counts them per split, stops past max_bad_fraction (training's default)
    and says the same from the cache, where the features stay those taken (a file restored since stays out)."""
    from common.models.ast.encoder import ASTEncoder, EncoderConfig
    from common.models.exports import save_encoder
    from finetune.linear_probe import main as probe

    save_encoder(ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=64, fstride=10,
                                          tstride=10)), tmp_path / "e.safetensors")
    train = local_manifest(synth_corpus / "synth_train.jsonl.gz", tmp_path / "t", "train", 24,
                           {3: "delete", 7: "garbage"})
    (tmp_path / "t.yaml").write_text(
        f"name: t\ntrain: [{train}]\nvalid: [{synth_corpus}/synth_valid.jsonl.gz]\n"
        f"classes: {synth_corpus}/synth_classes.json\ntarget_frames: 64\nnorm: audioset\nmetric: acc\nloss: ce\n")
    out = tmp_path / "probe.json"
    argv = ["--init", str(tmp_path / "e.safetensors"), "--task", str(tmp_path / "t.yaml"), "--cache-dir",
            str(tmp_path / "cache"), "--workers", "0", "--out", str(out)]
    deleted, garbage = str(tmp_path / "t" / "train-3.wav"), str(tmp_path / "t" / "train-7.wav")
    for cached in (False, True):
        capsys.readouterr()
        assert probe(argv) == 1  # the default, 2 %
        err = capsys.readouterr().err
        assert "error: t: 2 of 24 train clips (8.3%) are bad audio, more than max_bad_fraction=2.0%" in err
        assert "--max-bad-fraction F" in err and "--set data.max_bad_fraction" not in err
        assert probe([*argv, "--max-bad-fraction", "0.1"]) == 0
        captured = capsys.readouterr()
        assert f"skipped bad audio (train) {deleted}: missing (no such file)" in captured.err
        assert f"skipped bad audio (train) {garbage}: unreadable" in captured.err and "(eval)" not in captured.err
        assert "t: 2 clip(s) skipped as bad audio (train 2 of 24; listed in --out)" in captured.out
        result = json.loads(out.read_text())[0]
        assert result["clips"] == {"train": 22, "valid": 12} and result["bad_clips"] == {"train": 2, "valid": 0}
        assert sorted(p for p, _ in result["skipped"]["train"]) == [deleted, garbage]
        assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
        if not cached:
            Path(deleted).write_bytes(Path(str(tmp_path / "t" / "train-4.wav")).read_bytes())  # restored


def test_a_probe_cache_of_an_earlier_version_is_read_where_it_holds_every_clip(tmp_path, caplog):
    """Feature caches written before the probe kept its skipped clips were all computed again after an upgrade
    (hours of features on AudioSet, identical to the old ones): one with a row for every clip of its split skipped
    none and is read; one short of clips is computed again (which were skipped, and why, is not known)."""
    import logging

    import numpy as np

    from finetune.linear_probe import _read_cached

    old = tmp_path / "0123456789abcdef.npz"
    np.savez(old, x=np.ones((3, 4), np.float32), y=np.array([0, 1, 2]))
    x, y, skipped = _read_cached(old, lambda: 3)
    assert x.shape == (3, 4) and y.tolist() == [0, 1, 2] and skipped == []
    with caplog.at_level(logging.WARNING):
        assert _read_cached(old, lambda: 4) is None and _read_cached(old) is None
    np.savez(old, x=np.ones((3, 4), np.float32), y=np.array([0, 1, 2]), skipped=np.zeros((0, 2), str))
    assert _read_cached(old, lambda: pytest.fail("a cache of this version counts no manifest"))[2] == []
    assert [r.getMessage().split("(", 1)[1] for r in caplog.records] == [
        "ValueError: written by an older version, without the list of the clips it skipped as bad audio, and with "
        f"3 feature rows for {n} clips); computing the features again" for n in (4, "?")]


def _bad(*clips: tuple[str, str]):
    import torch

    from common.data.clips import Batch

    return Batch(torch.zeros(0, 8), torch.zeros(0), None, [], bad=list(clips))


def test_a_path_with_a_tab_or_newline_stays_one_row_and_one_log_line(tmp_path, caplog):
    """A manifest's path may hold a newline or a tab (``x\\ntouch ~/pwned #.flac``): written as it was, it made a
    second, forged line in train.log and a bogus row in bad_audio.tsv. Control characters are escaped in both,
    and the resume's recheck reads the row back as the same path: still missing, it stays listed (not again);
    back and readable (a real file with a tab in its name), it leaves."""
    log = tmp_path / "bad_audio.tsv"
    gone = str(tmp_path / "gone\ntouch /tmp/pwned #.flac")
    back = tmp_path / "back\tclip\\n.wav"
    tracker = BadAudioTracker(max_fraction=1.0, min_clips=99, log_path=str(log))
    with caplog.at_level("WARNING"):
        tracker.update(_bad((gone, "missing (no such file)"), (str(back), "unreadable (x\ny)")))
    said = [r.getMessage() for r in caplog.records if "skipped bad audio" in r.getMessage()]
    assert len(said) == 2 and all("\n" not in m and "\t" not in m for m in said), said
    assert "gone\\ntouch /tmp/pwned #.flac: missing" in said[0] and "back\\tclip\\\\n.wav" in said[1]
    lines = log.read_text().split("\n")
    assert len(lines) == 4 and lines[3] == "" and all(len(line.split("\t")) == 3 for line in lines[:3]), lines
    resumed = BadAudioTracker(max_fraction=1.0, min_clips=99, log_path=str(log))
    assert not resumed._list.add("train", gone, "missing (no such file)")  # read back as the same path
    write_clip(back, seconds=0.5)
    resumed.recheck_listed()
    assert log.read_text().split("\n")[1:] == [f"train\t{str(tmp_path)}/gone\\ntouch /tmp/pwned #.flac\t"
                                               f"missing (no such file)", ""]


def test_a_bad_audio_tsv_that_is_a_symbolic_link_is_refused(tmp_path):
    """A run directory received from someone may hold ``bad_audio.tsv -> ~/.bashrc``: appending followed it, and the
    resume's recheck copied the file it points to into the list. Both refuse it in one line; the target is
    untouched."""
    from common.system.paths import LinkRefused

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    log = tmp_path / "bad_audio.tsv"
    log.symlink_to(victim)
    with pytest.raises(LinkRefused, match=rf"^{log} is a symbolic link: a run's bad_audio.tsv is never written"):
        BadAudioTracker(log_path=str(log)).recheck_listed()
    with pytest.raises(LinkRefused, match=rf"^{log} is a symbolic link"):
        BadAudioTracker(min_clips=99, log_path=str(log)).update(_bad(("a.wav", "missing (no such file)")))
    log.unlink()
    log.symlink_to(tmp_path / "dangling")  # O_CREAT would have made the file it names
    with pytest.raises(LinkRefused):
        BadAudioTracker(min_clips=99, log_path=str(log)).update(_bad(("a.wav", "missing (no such file)")))
    assert victim.read_text() == "precious\n" and not (tmp_path / "dangling").exists()


def test_too_much_audio_far_outside_full_scale_is_to_be_rescaled_not_restored():
    """A corpus stored as float at integer scale fails the sample check clip after clip: the files are there and
    read, so "Restore the files" sent the user looking for missing ones; the advice is to rescale them."""
    import torch

    from common.data.clips import Batch
    from common.data.integrity import sample_problem

    loud = sample_problem(np.full(4, 12000.0, dtype=np.float32))
    for reason, advice in ((loud, "Rescale the files to float audio at full scale (integer PCM stored as float: "
                                  "divide by 32768, then prepare the corpus again) and run the same command again"),
                           ("unreadable (not audio)", "Restore the files and run the same command again"),
                           ("missing (no such file)", "Restore the files; most are missing: was the corpus moved")):
        tracker = BadAudioTracker(max_fraction=0.1, min_clips=1)
        batch = Batch(torch.zeros(2, 8), torch.full((2,), 8), None, ["a", "b"],
                      bad=[(f"c{i}.wav", reason) for i in range(3)])
        with pytest.raises(TooMuchBadAudio, match=re.escape(advice)):
            tracker.update(batch)


def test_the_machines_memory_running_out_while_decoding_is_not_bad_audio(tmp_path, synth_corpus, monkeypatch):
    """A MemoryError inside Lhotse's decoding was a bad clip ('unreadable (MemoryError ...)'): skipped, counted
    against max_bad_fraction with the advice to restore the files, and a resume could skip other clips."""
    from lhotse.cut import MonoCut

    cut = next(iter(CutSet.from_file(synth_corpus / "synth_train.jsonl.gz")))

    def no_memory(self, *args, **kwargs):
        raise MemoryError("cannot allocate 3 GiB")

    monkeypatch.setattr(MonoCut, "load_audio", no_memory)
    with pytest.raises(MemoryError, match="cannot allocate 3 GiB"):
        load_clip(cut, 16000)


def test_memory_running_out_in_lhotses_audio_backends_is_not_bad_audio(tmp_path, synth_corpus, monkeypatch):
    """Where decoding allocates its array (soundfile's read), Lhotse wraps the MemoryError in an AudioLoadingError
    that names it only in its text: it was still a bad clip."""
    from lhotse.audio.backend import get_current_audio_backend

    cut = next(iter(CutSet.from_file(synth_corpus / "synth_train.jsonl.gz")))

    def no_memory(*args, **kwargs):
        raise MemoryError("cannot allocate 3 GiB")

    backend = get_current_audio_backend()
    for sub in getattr(backend, "backends", [backend]):
        monkeypatch.setattr(sub, "read_audio", no_memory)
    with pytest.raises(MemoryError, match=r"^out of memory while decoding .*cannot allocate 3 GiB"):
        load_clip(cut, 16000)
