import json
from pathlib import Path

import pytest
from lhotse import CutSet

from common.data.corpora import get_corpus
from common.data.corpora.base import read_classes
from tests.layouts import voxceleb as layout


def test_prepare_voxceleb_miniature(tmp_path):
    src, out = tmp_path / "VoxCeleb1", tmp_path / "manifests"
    built = layout.build(src)
    report = get_corpus("voxceleb").prepare(src, out, num_jobs=2)
    assert sorted(report.manifests) == ["test", "train", "valid"]
    classes, names = read_classes(out / "voxceleb_classes.json")
    assert classes == built["classes"] and names == built["names"]  # the meta-only speaker is left out
    seen = {}
    for split in ("train", "valid", "test"):
        for cut in CutSet.from_file(out / f"voxceleb_{split}.jsonl.gz"):
            c = cut.custom
            assert c["split"] == split and c["labels"] == [c["speaker"]] and cut.sampling_rate == 16000
            audio = Path(cut.recording.sources[0].source)
            assert (c["speaker"], c["video"]) == (audio.parent.parent.name, audio.parent.name)
            assert cut.id == f"{c['speaker']}-{c['video']}-{audio.stem}"
            seen[cut.id] = (split, c["labels"][0])
    assert seen == built["clips"]
    assert "id10002--5TWw2pDbBk-00001" in seen  # video ids starting with '-' survive
    assert report.missing == [str(built["missing"])]
    assert [p for p, _ in report.unreadable] == [str(built["corrupt"])]
    saved = json.loads((out / "voxceleb_prepare.json").read_text())
    assert saved["clips"] == {"train": 4, "valid": 3, "test": 1} and saved["classes"] == 3


def test_prepare_voxceleb_audio_dir_and_no_meta(tmp_path):
    src, out = tmp_path / "VoxCeleb1", tmp_path / "manifests"
    built = layout.build(src, corrupt=False, missing=False, meta=False)
    (src / "wav").rename(tmp_path / "audio")
    report = get_corpus("voxceleb").prepare(src, out, audio_dir=tmp_path / "audio")
    assert sum(report.clips.values()) == len(built["clips"]) and not report.missing
    assert read_classes(out / "voxceleb_classes.json") == (built["classes"], {})


def test_speakers_whose_every_file_is_missing_are_named(tmp_path):
    """VoxCeleb1's dev and test archives each unpack to wav/; unpacked into two folders, the test archive's 40
    speakers lost every clip, with only a count of missing files to say so. The report names the classes left
    with no clip."""
    src, out = tmp_path / "VoxCeleb1", tmp_path / "manifests"
    layout.build(src, corrupt=False, missing=False)
    (src / "wav" / "id10270").rename(tmp_path / "id10270")  # the test archive's speaker, unpacked elsewhere
    report = get_corpus("voxceleb").prepare(src, out, num_jobs=1)
    assert "1 of 3 classes have no clip in any split (e.g. id10270): every file listed for them is missing or " \
           "unreadable" in report.notes
    (tmp_path / "id10270").rename(src / "wav" / "id10270")  # one folder: none lost
    assert not [n for n in get_corpus("voxceleb").prepare(src, tmp_path / "again", num_jobs=1).notes if "no clip" in n]


def test_prepare_voxceleb_errors_name_the_file(tmp_path):
    prepare = get_corpus("voxceleb").prepare
    with pytest.raises(FileNotFoundError, match=r"iden_split\.txt"):
        prepare(tmp_path, tmp_path / "out")
    (tmp_path / "iden_split.txt").write_text("1 id10001/1zcIwhmdeo4/00001.wav\n4 id10001/x/00002.wav\n")
    with pytest.raises(ValueError, match=r"iden_split\.txt:2: expected"):
        prepare(tmp_path, tmp_path / "out")
    (tmp_path / "iden_split.txt").write_text("1 id10001/1zcIwhmdeo4/00001.wav\n")
    with pytest.raises(FileNotFoundError, match=r"audio folder not found: .*wav"):
        prepare(tmp_path, tmp_path / "out")


def test_voxceleb_cli(tmp_path):
    from common.data.corpora.__main__ import main

    src, out = tmp_path / "VoxCeleb1", tmp_path / "manifests"
    layout.build(src, corrupt=False, missing=False)
    assert main(["prepare", "voxceleb", "--src", str(src), "--out", str(out), "--jobs", "1",
                 "--audio-dir", str(src / "wav")]) == 0
    assert sorted(p.name for p in out.glob("voxceleb_*")) == [
        "voxceleb_classes.json", "voxceleb_prepare.json", "voxceleb_test.jsonl.gz", "voxceleb_train.jsonl.gz",
        "voxceleb_valid.jsonl.gz"]
