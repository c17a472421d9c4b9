import json

import pytest
from lhotse import CutSet

from common.data.corpora import get_corpus
from common.data.corpora.base import read_classes
from tests.layouts import audioset as layout


def test_prepare_audioset_miniature(tmp_path):
    src, out = tmp_path / "audioset", tmp_path / "manifests"
    built = layout.build(src)
    report = get_corpus("audioset").prepare(src, out, num_jobs=2)
    assert sorted(report.manifests) == ["balanced_train", "eval", "unbalanced_train"]
    classes, names = read_classes(out / "audioset_classes.json")
    assert classes == built["classes"]  # in class_labels_indices.csv's index order
    assert names["/m/0ytgt"] == "Child speech, kid speaking"
    seen = {}
    for split in built["clips"]:
        cuts = CutSet.from_file(out / f"audioset_{split}.jsonl.gz")
        seen[split] = {cut.id: cut.custom["labels"] for cut in cuts}
        for cut in cuts:
            assert cut.custom["split"] == split and cut.custom["dataset"] == "audioset"
            assert cut.custom["end_seconds"] - cut.custom["start_seconds"] == pytest.approx(10.0)
    assert seen == built["clips"]  # every downloader naming found, labels multi-label in CSV order
    by_id = {cut.id: cut for split in seen for cut in CutSet.from_file(out / f"audioset_{split}.jsonl.gz")}
    assert by_id["-0RWZT-miFs"].custom["start_seconds"] == 420.0
    assert by_id[layout.STEREO].sampling_rate == 44100 and by_id[layout.STEREO].num_channels == 1
    assert layout.TRUNCATED not in by_id  # an interrupted download is not a shorter clip
    assert report.missing == [str(p) for p in built["missing"].values()]
    unreadable = dict(report.unreadable)
    assert sorted(unreadable) == sorted(str(p) for p in [*built["corrupt"].values(), *built["truncated"].values()])
    held = (int((44 + 2 * 16000) * 0.4) - 44) // 2  # 40 % of a 16-bit WAV's bytes, less its 44-byte header
    assert unreadable[str(built["truncated"][layout.TRUNCATED])] == \
        f"truncated (header: 16000 samples, file holds {held})"
    saved = json.loads((out / "audioset_prepare.json").read_text())
    assert saved["clips"] == {"balanced_train": 3, "unbalanced_train": 1, "eval": 2}


def test_prepare_audioset_chosen_splits_and_audio_dir(tmp_path):
    src, out = tmp_path / "audioset", tmp_path / "manifests"
    built = layout.build(src, audio_dir="downloads", splits=("balanced_train", "eval"))
    prepare = get_corpus("audioset").prepare
    report = prepare(src, out, audio_dir=src / "downloads")  # default: the splits whose CSV exists
    assert sorted(report.manifests) == ["balanced_train", "eval"]
    report = prepare(src, tmp_path / "eval_only", audio_dir=src / "downloads", splits="eval")
    assert list(report.manifests) == ["eval"] and report.clips["eval"] == len(built["clips"]["eval"])
    with pytest.raises(FileNotFoundError, match="unbalanced_train_segments.csv"):
        prepare(src, out, audio_dir=src / "downloads", splits="unbalanced_train")
    with pytest.raises(ValueError, match="AudioSet splits must be a comma list of balanced_train"):
        prepare(src, out, audio_dir=src / "downloads", splits="train")


def test_prepare_audioset_metadata_errors_name_the_file(tmp_path):
    prepare = get_corpus("audioset").prepare
    with pytest.raises(FileNotFoundError, match="class_labels_indices.csv"):
        prepare(tmp_path, tmp_path / "out")
    (tmp_path / "class_labels_indices.csv").write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n')
    with pytest.raises(FileNotFoundError, match="no AudioSet segment CSV"):
        prepare(tmp_path, tmp_path / "out")
    (tmp_path / "audio").mkdir()
    (tmp_path / "eval_segments.csv").write_text("# YTID, start_seconds, end_seconds, positive_labels\n"
                                                "--PJHxphWEs, 30.000\n")
    with pytest.raises(ValueError, match=r"eval_segments.csv:2: expected 'YTID, start_seconds"):
        prepare(tmp_path, tmp_path / "out")


def test_prepare_audioset_from_the_command_line(tmp_path):
    from common.data.corpora.__main__ import main

    src, out = tmp_path / "audioset", tmp_path / "manifests"
    built = layout.build(src, audio_dir="wavs", splits=("eval",))
    assert main(["prepare", "audioset", "--src", str(src), "--out", str(out), "--jobs", "1",
                 "--audio-dir", str(src / "wavs"), "--splits", "eval"]) == 0
    assert sorted(CutSet.from_file(out / "audioset_eval.jsonl.gz").ids) == sorted(built["clips"]["eval"])


def test_prepare_audioset_keeps_a_clip_listed_in_two_splits_once_and_names_it(tmp_path):
    src, out = tmp_path / "audioset", tmp_path / "manifests"
    layout.build(src, splits=("balanced_train", "eval"))
    ytid, start, _, _ = layout.SEGMENTS["balanced_train"][0]
    with (src / "eval_segments.csv").open("a") as handle:  # the same clip again, in the evaluation set
        handle.write(f'{ytid}, {start:.3f}, {start + 10:.3f}, "/m/04rlf"\n')
    report = get_corpus("audioset").prepare(src, out, num_jobs=1)
    assert ytid in {c.id for c in CutSet.from_file(out / "audioset_balanced_train.jsonl.gz")}
    assert ytid not in {c.id for c in CutSet.from_file(out / "audioset_eval.jsonl.gz")}
    assert [(c["id"], c["kept"]["split"], c["dropped"]["split"]) for c in report.conflicts] == \
        [(ytid, "balanced_train", "eval")]
    assert f"1 listed twice with another split, labels or file, the first listing kept (e.g. {ytid}: " in \
        report.summary()
    assert json.loads((out / "audioset_prepare.json").read_text())["conflicts"] == report.conflicts


def test_prepare_audioset_takes_the_labels_of_an_ast_data_file(tmp_path, capsys):
    """``--labels-json``: the clips an AST / PSLA data file lists (PSLA's label-enhanced AudioSet-20K, which SSAST and
    AST fine-tune on) take its labels, found by the YouTube id in each ``wav`` name however a downloader named it;
    the others keep the segment CSVs'; the report says how many of each split took them."""
    from common.data.corpora.__main__ import main

    src, out = tmp_path / "audioset", tmp_path / "manifests"
    built = layout.build(src)
    enhanced = {"--PJHxphWEs": "/m/09x0r,/t/dd00088,/m/05zppz", "-0RWZT-miFs": "/m/04rlf,/m/09x0r"}
    rows = [{"wav": "/data/audioset/balanced/--PJHxphWEs.wav", "labels": enhanced["--PJHxphWEs"]},
            {"wav": "C:\\audio\\Y-0RWZT-miFs_420.000_430.000.flac", "labels": enhanced["-0RWZT-miFs"]},
            {"wav": "/data/audioset/NotInAnySplit.wav", "labels": "/m/09x0r"}]
    labels = tmp_path / "balanced_train_data_type1_2_mean.json"
    labels.write_text(json.dumps({"data": rows}))
    assert main(["prepare", "audioset", "--src", str(src), "--out", str(out), "--jobs", "1",
                 "--labels-json", str(labels)]) == 0
    assert "balanced_train 2 of 4, unbalanced_train 0 of 2, eval 0 of 3" in capsys.readouterr().out
    got = {cut.id: cut.custom["labels"] for split in built["clips"]
           for cut in CutSet.from_file(out / f"audioset_{split}.jsonl.gz")}
    expected = {cut_id: labels for split in built["clips"].values() for cut_id, labels in split.items()}
    expected.update({ytid: mids.split(",") for ytid, mids in enhanced.items()})
    assert got == expected
    assert "balanced_train 2 of 4" in json.loads((out / "audioset_prepare.json").read_text())["notes"][0]

    prepare = get_corpus("audioset").prepare
    for content, message in [({"data": [{"wav": "a.wav", "labels": "/m/nope"}]}, r"data\[0\] \(a.wav\) has labels "
                              r"\['/m/nope'\] not in class_labels_indices.csv"),
                             ({"data": [{"wav": "a.wav"}]}, r"data\[0\] is not"),
                             ([1, 2], "expected an AST / PSLA data file"),
                             ({"data": [{"wav": "Elsewhere.wav", "labels": "/m/09x0r"}]}, "names no clip")]:
        labels.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            prepare(src, tmp_path / "again", labels_json=labels)
    labels.write_text("{not json")
    with pytest.raises(ValueError, match="balanced_train_data_type1_2_mean.json: not JSON"):
        prepare(src, tmp_path / "again", labels_json=labels)


def test_a_file_that_holds_the_whole_video_is_cut_to_its_segment(tmp_path):
    """A downloader that fetched the whole video (named by its YouTube id, as a segment's file is) trained the
    video's first ten seconds under the segment's labels, without a word. The clip is the segment's span of the
    file and the report counts such clips; a file that is neither the segment (or one padded to 10 s) nor a
    video that holds it is named as such; a segment's own file is whole, as before."""
    import numpy as np
    import soundfile as sf

    from common.data.clips import ClipDataset

    src = tmp_path / "audioset"
    layout.build(src)
    rate = 16000
    tone = np.zeros(90 * rate, dtype=np.float32)  # a 90 s video, silent but for its labelled 30-40 s
    tone[30 * rate:40 * rate] = 0.3 * np.sin(2 * np.pi * 440 * np.arange(10 * rate) / rate)
    sf.write(src / "audio" / "WholeVideo0.wav", tone, rate)
    sf.write(src / "audio" / "ShortVideo1.wav", np.zeros(25 * rate, dtype=np.float32) + 0.01, rate)  # ends at 25 s
    sf.write(src / "audio" / "EndSegment2.wav", np.zeros(10 * rate, dtype=np.float32) + 0.01, rate)  # padded to 10 s
    sf.write(src / "audio" / "Named3_30.000.wav", np.zeros(12 * rate, dtype=np.float32) + 0.01, rate)  # its name
    # gives the segment: that segment with a margin, whole; but a whole video saved under a segment's name is cut
    sf.write(src / "audio" / "Named4_30.000.wav", tone, rate)
    with (src / "eval_segments.csv").open("a") as handle:
        handle.write('WholeVideo0, 30.000, 40.000, "/m/09x0r"\nShortVideo1, 30.000, 40.000, "/m/09x0r"\n'
                     'EndSegment2, 294.000, 300.000, "/m/04rlf"\nNamed3, 30.000, 40.000, "/m/04rlf"\n'
                     'Named4, 30.000, 40.000, "/m/09x0r"\n')
    out = tmp_path / "out"
    report = get_corpus("audioset").prepare(src, out, num_jobs=1)
    cuts = {cut.id: cut for cut in CutSet.from_file(out / "audioset_eval.jsonl.gz")}
    whole = cuts["WholeVideo0"]
    assert (whole.start, whole.duration, whole.recording.duration) == (30.0, 10.0, 90.0)
    wave = ClipDataset(10 * rate, rate, crop="start")[(0, 0, [whole])].waveforms[0].numpy()
    assert np.sqrt(np.mean(wave ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=1e-3)  # the tone, not the silence
    assert (cuts["EndSegment2"].start, cuts["EndSegment2"].duration) == (0.0, 10.0)
    assert (cuts["Named3"].start, cuts["Named3"].duration) == (0.0, 12.0)
    assert (cuts["Named4"].start, cuts["Named4"].duration) == (30.0, 10.0)
    assert cuts["-5vpdDAJ9vQ"].start == 0.0  # a segment's own file (the layout's) stays whole
    assert "ShortVideo1" not in cuts
    assert dict(report.unreadable)[str(src / "audio" / "ShortVideo1.wav")] == \
        "25.0 s long, longer than its 10 s segment (30-40 s of the video), but holding 0.0 s of it: a video cut " \
        "short, or another one"
    assert any(note.startswith("2 clips cut from the whole video their file holds (e.g. ") for note in report.notes)
