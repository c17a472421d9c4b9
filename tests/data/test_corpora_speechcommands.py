import json

import pytest
from lhotse import CutSet

from common.data.corpora import get_corpus
from common.data.corpora.base import read_classes
from tests.layouts import speechcommands as layout


def test_prepare_speechcommands_miniature(tmp_path):
    src, out = tmp_path / "speech_commands_v0.02", tmp_path / "manifests"
    built = layout.build(src)
    report = get_corpus("speechcommands").prepare(src, out, num_jobs=2)
    assert sorted(report.manifests) == ["test", "train", "valid"]
    assert read_classes(out / "speechcommands_classes.json") == (layout.WORDS, {})  # sorted folder names
    seen = {}
    for split in ("train", "valid", "test"):
        for cut in CutSet.from_file(out / f"speechcommands_{split}.jsonl.gz"):
            c = cut.custom
            assert c["split"] == split and cut.sampling_rate == 16000 and cut.duration == pytest.approx(0.5)
            assert cut.id.startswith(f"{c['labels'][0]}_{c['speaker']}_nohash_")
            seen[cut.id] = (split, c["labels"][0])
    assert seen == built["clips"]  # _background_noise_ left out, listed clips only in their split
    assert "right_bb05582b_nohash_1" in seen
    assert report.missing == [str(built["missing"])]
    assert [p for p, _ in report.unreadable] == [str(built["corrupt"])]
    saved = json.loads((out / "speechcommands_prepare.json").read_text())
    assert saved["clips"] == {"train": 6, "valid": 3, "test": 3} and saved["classes"] == 3


def test_prepare_speechcommands_errors_name_the_file(tmp_path):
    prepare = get_corpus("speechcommands").prepare
    layout.build(tmp_path, corrupt=False, missing=False)
    (tmp_path / "testing_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"testing list not found: .*testing_list\.txt"):
        prepare(tmp_path, tmp_path / "out")
    (tmp_path / "testing_list.txt").write_text("yes/0a7c2a8d_nohash_0.wav\n")  # also in validation_list.txt
    with pytest.raises(ValueError, match=r"both validation_list\.txt and testing_list\.txt, e\.g\. yes/0a7c2a8d"):
        prepare(tmp_path, tmp_path / "out")
    (tmp_path / "testing_list.txt").write_text("0a7c2a8d_nohash_0.wav\n")
    with pytest.raises(ValueError, match=r"testing_list\.txt:1: expected '<word>/<file>\.wav'"):
        prepare(tmp_path, tmp_path / "out")


def test_speechcommands_cli(tmp_path):
    from common.data.corpora.__main__ import main

    src, out = tmp_path / "speech_commands_v0.02", tmp_path / "manifests"
    layout.build(src, corrupt=False, missing=False)
    assert main(["prepare", "speechcommands", "--src", str(src), "--out", str(out), "--jobs", "1"]) == 0
    assert sorted(p.name for p in out.glob("*.jsonl.gz")) == [
        "speechcommands_test.jsonl.gz", "speechcommands_train.jsonl.gz", "speechcommands_valid.jsonl.gz"]
