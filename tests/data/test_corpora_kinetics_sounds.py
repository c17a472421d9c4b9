import json

import pytest
from lhotse import CutSet

from common.data.corpora import get_corpus
from common.data.corpora.base import read_classes
from tests.layouts import kinetics_sounds as layout


def _labels(path):
    return {cut.id: cut.custom["labels"][0] for cut in CutSet.from_file(path)}


def test_prepare_kinetics_sounds_miniature(tmp_path):
    src, out = tmp_path / "kinetics", tmp_path / "manifests"
    built = layout.build(src)
    report = get_corpus("kinetics_sounds").prepare(src, out, num_jobs=2)
    assert sorted(report.manifests) == ["test", "train"]
    classes, _ = read_classes(out / "kinetics_sounds_classes.json")
    assert classes == layout.CLASSES  # the class file's order, other Kinetics classes dropped
    assert _labels(out / "kinetics_sounds_train.jsonl.gz") == built["clips"]["train"]
    assert _labels(out / "kinetics_sounds_test.jsonl.gz") == built["clips"]["validate"]
    for cut in CutSet.from_file(out / "kinetics_sounds_train.jsonl.gz"):
        assert cut.id == f"{cut.custom['youtube_id']}_{cut.custom['time_start']:06d}_{cut.custom['time_end']:06d}"
        assert cut.custom["split"] == "train" and cut.duration == pytest.approx(1.0)
        assert cut.sampling_rate == (44100 if cut.id == layout.STEREO else 16000)
    assert report.missing == [str(p) for p in built["missing"].values()]
    assert [p for p, _ in report.unreadable] == [str(p) for p in built["corrupt"].values()]
    saved = json.loads((out / "kinetics_sounds_prepare.json").read_text())
    assert saved["notes"] == ["test split from annotations/validate.csv",
                              f"classes with no clip in the annotations: {', '.join(layout.UNUSED)}"]


def test_prepare_kinetics_sounds_reads_the_cvdf_copys_val_csv(tmp_path):
    """The CVDF copy of Kinetics (cvdfoundation/kinetics-dataset) names the validation annotations val.csv: they are
    the default test split as validate.csv is, and `--test-from val` names the same choice."""
    prepare = get_corpus("kinetics_sounds").prepare
    src = tmp_path / "cvdf"
    built = layout.build(src, validation_file="val.csv")
    assert not (src / "annotations" / "validate.csv").exists()
    for choice in ("validate", "val"):
        report = prepare(src, tmp_path / choice, test_from=choice)
        assert _labels(report.manifests["test"]) == built["clips"]["validate"]
        saved = json.loads((tmp_path / choice / "kinetics_sounds_prepare.json").read_text())
        assert saved["notes"][0] == "test split from annotations/val.csv"
    (src / "annotations" / "val.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"annotations/validate.csv \(or val.csv\)"):
        prepare(src, tmp_path / "none")
    with pytest.raises(ValueError, match="test_from"):
        prepare(src, tmp_path / "none", test_from="valid")


def test_prepare_kinetics_sounds_test_from_test_csv(tmp_path):
    prepare = get_corpus("kinetics_sounds").prepare
    src = tmp_path / "withheld"
    layout.build(src)
    with pytest.raises(ValueError, match=r"test.csv: missing columns \['label'\].*withheld"):
        prepare(src, tmp_path / "out", test_from="test")
    src = tmp_path / "labelled"
    built = layout.build(src, test_labels=True)
    report = prepare(src, tmp_path / "out", test_from="test")
    assert _labels(report.manifests["test"]) == built["clips"]["test"]


def test_prepare_kinetics_sounds_metadata_errors_name_the_file(tmp_path):
    prepare = get_corpus("kinetics_sounds").prepare
    with pytest.raises(FileNotFoundError, match="kinetics_sounds_classes.txt"):
        prepare(tmp_path, tmp_path / "out")
    (tmp_path / "kinetics_sounds_classes.txt").write_text("bowling\n")
    with pytest.raises(FileNotFoundError, match=r"annotations/train.csv"):
        prepare(tmp_path, tmp_path / "out")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.csv").write_text("label,youtube_id,time_start\nbowling,--33Lscn6sk,4\n")
    with pytest.raises(ValueError, match=r"train.csv: missing columns \['time_end'\]"):
        prepare(tmp_path, tmp_path / "out")


def test_prepare_kinetics_sounds_from_the_command_line(tmp_path):
    from common.data.corpora.__main__ import main

    src, out = tmp_path / "kinetics", tmp_path / "manifests"
    built = layout.build(src, test_labels=True)
    (src / "kinetics_sounds_classes.txt").rename(src / "ks.txt")
    assert main(["prepare", "kinetics_sounds", "--src", str(src), "--out", str(out), "--jobs", "1",
                 "--classes", str(src / "ks.txt"), "--audio-dir", str(src / "audio"), "--test-from", "test"]) == 0
    assert _labels(out / "kinetics_sounds_test.jsonl.gz") == built["clips"]["test"]
