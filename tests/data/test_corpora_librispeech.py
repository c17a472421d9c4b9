import json

import pytest
from lhotse import CutSet

from common.data.corpora import get_corpus
from tests.layouts import librispeech as layout


def _read(path):
    return {cut.id: cut for cut in CutSet.from_file(path)}


def test_prepare_librispeech_miniature(tmp_path):
    src, out = tmp_path / "LibriSpeech", tmp_path / "manifests"
    built = layout.build(src)
    report = get_corpus("librispeech").prepare(src, out, num_jobs=2)
    assert sorted(report.manifests) == sorted(built["parts"] + ["train960"])
    seen = {}
    for part in built["parts"]:
        for cut in _read(out / f"librispeech_{part}.jsonl.gz").values():
            c = cut.custom
            assert c["split"] == c["part"] == part and c["labels"] == [] and c["dataset"] == "librispeech"
            assert cut.sampling_rate == 16000 and 0.45 < cut.duration < 0.65
            seen[cut.id] = (part, c["speaker"], c["chapter"], c["text"])
    assert seen == built["clips"]
    combined = _read(out / "librispeech_train960.jsonl.gz")
    assert sorted(combined) == sorted(k for k, v in built["clips"].items() if v[0].startswith("train"))
    assert {cut.custom["split"] for cut in combined.values()} == {"train960"}
    assert {cut.custom["part"] for cut in combined.values()} == {"train-clean-100", "train-other-500"}
    assert report.missing == [str(built["missing"])]
    assert [p for p, _ in report.unreadable] == [str(built["corrupt"])]
    assert not (out / "librispeech_classes.json").exists()  # unlabeled
    saved = json.loads((out / "librispeech_prepare.json").read_text())
    assert saved["clips"] == {"train-clean-100": 4, "train-other-500": 2, "dev-clean": 2}
    assert "train960" in saved["manifests"] and any("train960: 6 clips" in n for n in saved["notes"])


def test_prepare_librispeech_parts_option(tmp_path):
    src, out = tmp_path / "LibriSpeech", tmp_path / "manifests"
    layout.build(src, corrupt=False, missing=False)
    report = get_corpus("librispeech").prepare(src, out, parts=["dev-clean"], combine_train=True)
    assert sorted(report.manifests) == ["dev-clean"]  # no train part, so no train960
    report = get_corpus("librispeech").prepare(src, out, parts=["train-other-500"], combine_train=False)
    assert sorted(report.manifests) == ["train-other-500"]


def test_prepare_librispeech_errors_name_what_is_missing(tmp_path):
    prepare = get_corpus("librispeech").prepare
    with pytest.raises(FileNotFoundError, match=r"train-clean-100"):
        prepare(tmp_path, tmp_path / "out")
    (tmp_path / "dev-clean").mkdir()
    with pytest.raises(FileNotFoundError, match=r"test-clean"):
        prepare(tmp_path, tmp_path / "out", parts=["test-clean"])
    with pytest.raises(FileNotFoundError, match=r"trans\.txt transcript under .*dev-clean"):
        prepare(tmp_path, tmp_path / "out")


def test_librispeech_cli(tmp_path):
    from common.data.corpora.__main__ import main

    src, out = tmp_path / "LibriSpeech", tmp_path / "manifests"
    layout.build(src, corrupt=False, missing=False)
    assert main(["prepare", "librispeech", "--src", str(src), "--out", str(out), "--jobs", "1",
                 "--parts", "train-clean-100,dev-clean", "--no-combine-train"]) == 0
    assert sorted(p.name for p in out.glob("*.jsonl.gz")) == [
        "librispeech_dev-clean.jsonl.gz", "librispeech_train-clean-100.jsonl.gz"]
