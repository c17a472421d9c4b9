import json

import pytest
from lhotse import CutSet

from common.data.corpora import get_corpus
from common.data.corpora.base import read_classes
from tests.layouts import esc50 as layout


def test_prepare_esc50_miniature(tmp_path):
    src, out = tmp_path / "ESC-50-master", tmp_path / "manifests"
    built = layout.build(src)
    report = get_corpus("esc50").prepare(src, out)
    assert sorted(report.manifests) == [f"fold{i}" for i in range(1, 6)]
    classes, _ = read_classes(out / "esc50_classes.json")
    assert classes == layout.CATEGORIES  # ordered by the csv's target index
    seen = {}
    for fold in range(1, 6):
        for cut in CutSet.from_file(out / f"esc50_fold{fold}.jsonl.gz"):
            seen[cut.id] = (cut.custom["split"], cut.custom["labels"][0])
            assert cut.custom["fold"] == fold and cut.sampling_rate == 44100
            assert cut.duration == pytest.approx(5.0)
    assert seen == built["clips"]
    assert report.missing == [str(src / "audio" / "2-9999-A-1.wav")]
    assert [p for p, _ in report.unreadable] == [str(src / "audio" / "1-9998-A-0.wav")]
    assert "LibsndfileError" in report.unreadable[0][1] or "Error" in report.unreadable[0][1]
    saved = json.loads((out / "esc50_prepare.json").read_text())
    assert saved["clips"] == {f"fold{i}": 2 for i in range(1, 6)} and len(saved["missing"]) == 1


def test_prepare_esc50_without_metadata_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"meta/esc50.csv"):
        get_corpus("esc50").prepare(tmp_path, tmp_path / "out")


def test_the_corpora_command_called_from_python_gives_logging_back():
    """`c2f-corpora`'s main left its console handler and the INFO level on the root logger, as the training commands
    did before they gave them back (docs/interop.md)."""
    import logging

    from common.data.corpora.__main__ import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    assert main(["list"]) == 0
    assert root.handlers == handlers and root.level == level
