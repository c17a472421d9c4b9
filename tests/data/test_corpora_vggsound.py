import json

import pytest
from lhotse import CutSet

from common.data.corpora import get_corpus
from common.data.corpora.base import read_classes
from tests.layouts import vggsound as layout


def test_prepare_vggsound_miniature(tmp_path):
    src, out = tmp_path / "vggsound", tmp_path / "manifests"
    built = layout.build(src)
    report = get_corpus("vggsound").prepare(src, out, num_jobs=2)
    assert sorted(report.manifests) == ["test", "train"]
    classes, _ = read_classes(out / "vggsound_classes.json")
    assert classes == built["classes"] and "male speech, man speaking" in classes  # sorted, commas intact
    seen = {}
    for split in ("train", "test"):
        for cut in CutSet.from_file(out / f"vggsound_{split}.jsonl.gz"):
            seen[cut.id] = (cut.custom["split"], cut.custom["labels"][0])
            assert cut.id == f"{cut.custom['youtube_id']}_{cut.custom['start_seconds']:06d}"
            assert cut.duration == pytest.approx(1.5)
            assert cut.sampling_rate == (44100 if cut.id == layout.HIGH_RATE else 16000)
    assert seen == built["clips"]  # zero-padded, unpadded and plain-YTID names all found
    assert report.missing == [str(p) for p in built["missing"].values()]
    assert [p for p, _ in report.unreadable] == [str(p) for p in built["corrupt"].values()]
    saved = json.loads((out / "vggsound_prepare.json").read_text())
    assert saved["notes"] == ["1 clips listed twice alike: kept once"]
    kept = layout.ROWS[1]  # its first row kept, the other named in the report and its summary
    assert saved["conflicts"] == [{"id": f"{kept[0]}_{kept[1]:06d}",
                                   "kept": {"split": "train", "labels": [kept[2]], "path": str(src / "audio" / kept[4])},
                                   "dropped": {"split": "test", "labels": ["people marching"],
                                               "path": str(src / "audio" / kept[4])}}]
    assert f"1 listed twice with another split, labels or file, the first listing kept (e.g. {kept[0]}_000030: " \
           f"train waterfall burbling, not test people marching)" in report.summary()


def test_prepare_vggsound_metadata_errors_name_the_file(tmp_path):
    prepare = get_corpus("vggsound").prepare
    with pytest.raises(FileNotFoundError, match="vggsound.csv"):
        prepare(tmp_path, tmp_path / "out")
    (tmp_path / "vggsound.csv").write_text("youtube_id,start,label,split\n---g-f_I2yQ,1,people marching,test\n")
    with pytest.raises(ValueError, match=r"vggsound.csv:1: expected YTID,start_seconds,label,split \(no header\)"):
        prepare(tmp_path, tmp_path / "out")
    (tmp_path / "vggsound.csv").write_text("---g-f_I2yQ,1,people marching,test\n")
    with pytest.raises(FileNotFoundError, match="VGGSound audio folder"):
        prepare(tmp_path, tmp_path / "out")


def test_prepare_vggsound_from_the_command_line(tmp_path):
    from common.data.corpora.__main__ import main

    src, out = tmp_path / "vggsound", tmp_path / "manifests"
    built = layout.build(src, audio_dir="clips")
    assert main(["prepare", "vggsound", "--src", str(src), "--out", str(out), "--jobs", "1",
                 "--audio-dir", str(src / "clips")]) == 0
    ids = [i for split in ("train", "test") for i in CutSet.from_file(out / f"vggsound_{split}.jsonl.gz").ids]
    assert sorted(ids) == sorted(built["clips"])


def test_clips_that_are_still_videos_are_named_as_such_not_missing(tmp_path):
    """The authors' copy of VGGSound is <YTID>_<start:06d>.mp4 videos: a clip found only as a video no decoder here
    reads is unreadable with what to do (extract the audio), not 'missing on disk'; its extracted .wav wins."""
    import numpy as np
    import soundfile as sf

    src = tmp_path / "vggsound"
    (src / "audio").mkdir(parents=True)
    (src / "vggsound.csv").write_text('glLQrEijrKg,300,"dog barking",test\n--0PQM4-hqg,30,"cat purring",train\n'
                                      'a1b2c3d4e5f,10,"cat purring",train\n')
    (src / "audio" / "glLQrEijrKg_000300.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    (src / "audio" / "--0PQM4-hqg_000030.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    sf.write(src / "audio" / "--0PQM4-hqg_000030.wav", np.zeros(16000, dtype="float32"), 16000)
    report = get_corpus("vggsound").prepare(src, tmp_path / "out", num_jobs=1)
    assert report.missing == [str(src / "audio" / "a1b2c3d4e5f_000010")]
    (path, reason), = report.unreadable
    assert path == str(src / "audio" / "glLQrEijrKg_000300.mp4")
    assert reason.startswith("a .mp4 file, which this install cannot decode, ffmpeg or not (Lhotse reads "
                             ".mp4/.mkv/.webm/.avi/.mov/.m4a only through torchaudio.io, which this torchaudio lacks): "
                             "extract its audio first (e.g. ffmpeg -i glLQrEijrKg_000300.mp4 -vn -ar 32000 "
                             "glLQrEijrKg_000300.flac")
    assert [c.recording.sources[0].source for c in CutSet.from_file(tmp_path / "out" / "vggsound_train.jsonl.gz")] \
        == [str((src / "audio" / "--0PQM4-hqg_000030.wav").resolve())]


def test_a_file_named_by_its_video_alone_serves_each_segment_it_holds_and_no_other(tmp_path):
    """The same video is listed at several starts (595 videos of the authors' test.csv). A whole video named by its
    YouTube id gives each row its own ten seconds; a file of one segment's length named so was given to every row
    (one clip under two labels, in train and in test): its segment is unknown, and each row is refused."""
    from tests.layouts import write_clip

    src = tmp_path / "vggsound"
    (src / "audio").mkdir(parents=True)
    (src / "vggsound.csv").write_text("WholeVideo0,30,dog barking,train\nWholeVideo0,120,\"bird chirping, tweeting\""
                                      ",test\nOneSegment1,30,dog barking,train\nOneSegment1,120,dog barking,test\n"
                                      "Named2,30,dog barking,train\n")
    write_clip(src / "audio" / "WholeVideo0.wav", seconds=200.0)
    write_clip(src / "audio" / "OneSegment1.wav", seconds=10.0)
    write_clip(src / "audio" / "Named2_000030.wav", seconds=12.0)  # named by its segment: that segment, whole
    out = tmp_path / "out"
    report = get_corpus("vggsound").prepare(src, out, num_jobs=1)
    cuts = [cut for split in ("train", "test") for cut in CutSet.from_file(out / f"vggsound_{split}.jsonl.gz")]
    assert sorted((cut.id, cut.start, cut.duration) for cut in cuts) == [("Named2_000030", 0.0, 12.0),
                                                                         ("WholeVideo0_000030", 30.0, 10.0),
                                                                         ("WholeVideo0_000120", 120.0, 10.0)]
    assert report.unreadable == [(str(src / "audio" / "OneSegment1.wav"),
                                  "10.0 s long, one segment, but named by its video alone, which is listed at 2 "
                                  "starts (30, 120 s): which one it holds is unknown; name each segment's file by its "
                                  "start")]
