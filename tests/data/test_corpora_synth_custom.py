import json

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from common.data.corpora import get_corpus
from common.data.corpora.base import read_classes
from common.data.corpora.synth import CLASSES, SIZES, generate_clip
from tests.layouts import write_clip, write_garbage


@pytest.mark.slow
def test_synth_is_deterministic_and_complete(tmp_path):
    report = get_corpus("synth").prepare(None, tmp_path / "a", size="test", seed=3)
    sizes = SIZES["test"]
    assert dict(report.clips) == {"pool": sizes["pool"], "train": sizes["train"] * 12,
                                  "valid": sizes["valid"] * 12, "test": sizes["test"] * 12}
    assert not report.missing and not report.unreadable
    classes, _ = read_classes(tmp_path / "a" / "synth_classes.json")
    assert classes == list(CLASSES) and len(classes) >= 10
    train = CutSet.from_file(tmp_path / "a" / "synth_train.jsonl.gz").to_eager()
    assert {c.custom["labels"][0] for c in train} == set(CLASSES)
    assert all(c.sampling_rate == 16000 for c in train)
    durations = [c.duration for c in train]
    assert min(durations) < 1.2 < max(durations)  # varied lengths: padding and cropping both happen
    assert all(c.custom["labels"] == [] for c in CutSet.from_file(tmp_path / "a" / "synth_pool.jsonl.gz"))
    get_corpus("synth").prepare(None, tmp_path / "b", size="test", seed=3)
    one = sf.read(tmp_path / "a" / "synth_audio" / "train" / "synth-train-rain-0001.flac")[0]
    two = sf.read(tmp_path / "b" / "synth_audio" / "train" / "synth-train-rain-0001.flac")[0]
    assert np.array_equal(one, two)


def test_synth_classes_differ_in_time_structure_not_only_spectrum():
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    slow, fast = generate_clip("low_pulse_slow", rng()), generate_clip("low_pulse_fast", rng())

    def pulse_rate(x):
        env = np.abs(x[: len(x) // 160 * 160]).reshape(-1, 160).mean(1)  # 10 ms envelope
        env = env - env.mean()
        spec = np.abs(np.fft.rfft(env, 4096))
        freqs = np.fft.rfftfreq(4096, 0.01)
        band = (freqs > 1.5) & (freqs < 20)
        return freqs[band][spec[band].argmax()]

    assert 2.5 < pulse_rate(slow) < 4.5 and 10 < pulse_rate(fast) < 15


def test_custom_csv_multilabel_and_carve_out(tmp_path):
    for i in range(6):
        write_clip(tmp_path / "clips" / f"c{i}.wav", seconds=0.5, seed=i)
    write_garbage(tmp_path / "clips" / "broken.wav")
    (tmp_path / "list.csv").write_text(
        "path,label,split\n" + "".join(f"clips/c{i}.wav,{'dog;bark' if i % 2 else 'cat'},\n" for i in range(5))
        + "clips/c5.wav,cat,test\nclips/broken.wav,cat,train\nclips/gone.wav,cat,train\n")
    report = get_corpus("custom").prepare(None, tmp_path / "out", csv=tmp_path / "list.csv", name="pets",
                                          valid_fraction=0.3)
    assert read_classes(tmp_path / "out" / "pets_classes.json")[0] == ["bark", "cat", "dog"]
    cuts = {c.id: c for split in report.manifests.values() for c in CutSet.from_file(split)}
    assert cuts["clips-c1"].custom["labels"] == ["dog", "bark"]
    assert cuts["clips-c5"].custom["split"] == "test"
    assert sum(report.clips.values()) == 6 and "valid" in report.clips
    assert len(report.missing) == 1 and len(report.unreadable) == 1


def test_custom_folder_per_class_with_splits_and_unlabeled(tmp_path):
    for split in ("train", "test"):
        for label in ("kick", "snare"):
            write_clip(tmp_path / "tree" / split / label / f"{label}1.flac", seconds=0.3)
    write_clip(tmp_path / "raw" / "a" / "x.wav", seconds=0.3)
    write_clip(tmp_path / "raw" / "y.wav", seconds=0.3)
    report = get_corpus("custom").prepare(tmp_path / "tree", tmp_path / "out", unlabeled=tmp_path / "raw")
    assert dict(report.clips) == {"train": 2, "test": 2, "pool": 2}
    pool = CutSet.from_file(report.manifests["pool"]).to_eager()
    assert sorted(c.id for c in pool) == ["pool-a-x", "pool-y"] and all(c.custom["labels"] == [] for c in pool)
    with pytest.raises(ValueError, match="give --src"):
        get_corpus("custom").prepare(None, tmp_path / "out")
    (tmp_path / "bad.csv").write_text("file,class\nx.wav,a\n")
    with pytest.raises(ValueError, match="columns 'path' and 'label'"):
        get_corpus("custom").prepare(None, tmp_path / "out", csv=tmp_path / "bad.csv")


def test_custom_folders_take_every_format_predict_reads(tmp_path):
    """A class folder of AIFF or CAF recordings is prepared as WAV and FLAC are (the folder scan and predict's share
    one list of suffixes): none is skipped."""
    write_clip(tmp_path / "tree" / "kick" / "k1.aiff", seconds=0.3)
    write_clip(tmp_path / "tree" / "kick" / "k2.wav", seconds=0.3)
    write_clip(tmp_path / "tree" / "snare" / "s1.caf", seconds=0.3)
    write_clip(tmp_path / "raw" / "x.w64", seconds=0.3)
    report = get_corpus("custom").prepare(tmp_path / "tree", tmp_path / "out", unlabeled=tmp_path / "raw")
    assert dict(report.clips) == {"train": 3, "pool": 1} and not report.unreadable
    train = CutSet.from_file(report.manifests["train"]).to_eager()
    assert sorted(c.id for c in train) == ["kick-k1", "kick-k2", "snare-s1"]
    assert all(c.load_audio().shape == (1, 4800) for c in train)


def test_custom_folders_keep_every_file_of_a_shared_name(tmp_path):
    """Files named alike in different sub-folders are different clips (a class folder of recording sessions, an
    unlabeled pool split in folders): none is dropped."""
    for session in ("a", "b"):
        write_clip(tmp_path / "tree" / "dog" / session / "001.wav", seconds=0.3)
        write_clip(tmp_path / "raw" / session / "000000.wav", seconds=0.3)
    write_clip(tmp_path / "tree" / "cat" / "001.wav", seconds=0.3)
    report = get_corpus("custom").prepare(tmp_path / "tree", tmp_path / "out", unlabeled=tmp_path / "raw")
    assert dict(report.clips) == {"train": 3, "pool": 2}
    train = CutSet.from_file(report.manifests["train"]).to_eager()
    assert sorted(c.id for c in train) == ["cat-001", "dog-a-001", "dog-b-001"]
    pool = CutSet.from_file(report.manifests["pool"]).to_eager()
    assert sorted(c.id for c in pool) == ["pool-a-000000", "pool-b-000000"]


def test_custom_tree_with_a_class_named_like_a_split_is_refused_not_read_as_splits(tmp_path):
    """ESC-50 has a class `train`: in a `<class>/` tree it would make the tree a split layout, dropping every other
    class (or, its files in sub-folders, making those sub-folders classes). Refused, naming both kinds of folder;
    a split layout with a folder of no audio beside it (notes) is still read."""
    for label in ("dog", "siren", "train"):
        write_clip(tmp_path / "flat" / label / "x0.wav", seconds=0.3)
        write_clip(tmp_path / "nested" / label / "rec1" / "x0.wav", seconds=0.3)
    for tree in ("flat", "nested"):
        with pytest.raises(ValueError, match=r"holds split folders \(train\) and folders of audio beside them "
                                             r"\(dog, siren\).*train is a class, list the clips in a --csv"):
            get_corpus("custom").prepare(tmp_path / tree, tmp_path / "out")
    for split in ("train", "valid"):
        write_clip(tmp_path / "splits" / split / "dog" / "x0.wav", seconds=0.3)
    (tmp_path / "splits" / "notes").mkdir()
    (tmp_path / "splits" / "notes" / "README.txt").write_text("recorded in 2019\n")
    # what unzipping a Mac archive and a desktop's trash leave: no classes, no clips
    (tmp_path / "splits" / "__MACOSX" / "train" / "dog").mkdir(parents=True)
    (tmp_path / "splits" / "__MACOSX" / "train" / "dog" / "._x0.wav").write_bytes(b"\x00\x05\x16\x07" * 20)
    (tmp_path / "splits" / "train" / "dog" / "._x0.wav").write_bytes(b"\x00\x05\x16\x07" * 20)
    write_clip(tmp_path / "splits" / ".Trash-0" / "files" / "old.wav", seconds=0.3)
    write_clip(tmp_path / "splits" / "train" / ".cat" / "x1.wav", seconds=0.3)
    report = get_corpus("custom").prepare(tmp_path / "splits", tmp_path / "out")
    assert dict(report.clips) == {"train": 1, "valid": 1} and not report.unreadable


def test_custom_csv_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Spreadsheets save "CSV UTF-8" with a byte-order mark before the header."""
    write_clip(tmp_path / "clips" / "ä-clip_é.wav", seconds=0.3)
    (tmp_path / "list.csv").write_text("\ufeffpath,label\nclips/ä-clip_é.wav,dog\n", encoding="utf-8")
    report = get_corpus("custom").prepare(None, tmp_path / "out", csv=tmp_path / "list.csv")
    assert dict(report.clips) == {"train": 1}
    assert read_classes(tmp_path / "out" / "custom_classes.json")[0] == ["dog"]


def test_custom_csv_ids_are_unique_for_files_outside_its_folder(tmp_path):
    """Absolute paths elsewhere whose file names repeat (issue 10 item 11)."""
    data = tmp_path / "data" / "set"
    for split in ("train", "valid"):
        for i in range(2):
            write_clip(data / split / f"{i:06d}.wav", seconds=0.3, seed=i)
    rows = [(data / split / f"{i:06d}.wav", split) for split in ("train", "valid") for i in range(2)]
    (tmp_path / "lists").mkdir()
    csv = tmp_path / "lists" / "all.csv"
    csv.write_text("path,label,split\n" + "".join(f"{p},{'a' if i % 2 else 'b'},{s}\n"
                                                  for i, (p, s) in enumerate(rows)))
    report = get_corpus("custom").prepare(None, tmp_path / "out", csv=csv)
    ids = {c.id: c for m in report.manifests.values() for c in CutSet.from_file(m)}
    assert sorted(ids) == ["train-000000", "train-000001", "valid-000000", "valid-000001"]
    assert ids["valid-000001"].recording.sources[0].source == str((data / "valid" / "000001.wav").resolve())
    csv.write_text(csv.read_text() + f"{rows[0][0]},b,train\n")
    with pytest.raises(ValueError, match="listed twice"):
        get_corpus("custom").prepare(None, tmp_path / "out2", csv=csv)
    listing = tmp_path / "lists" / "pool.txt"  # an unlabeled list: the same rule
    listing.write_text("".join(f"{p}\n" for p, _ in rows))
    pool = get_corpus("custom").prepare(None, tmp_path / "out3", unlabeled=listing)
    assert sorted(c.id for c in CutSet.from_file(pool.manifests["pool"])) == [
        "pool-train-000000", "pool-train-000001", "pool-valid-000000", "pool-valid-000001"]


def test_manifests_are_written_in_a_seeded_shuffled_order(tmp_path):
    """A folder per class lists clips class after class; the manifest must not (issue 10 item 1)."""
    for label in ("a", "b", "c"):
        for i in range(20):
            write_clip(tmp_path / "tree" / label / f"{label}{i:02d}.wav", seconds=0.1, seed=i)
    orders = []
    for out in ("one", "two"):
        report = get_corpus("custom").prepare(tmp_path / "tree", tmp_path / out, num_jobs=1)
        orders.append([c.id for c in CutSet.from_file(report.manifests["train"])])
    labels = [i.split("-")[0] for i in orders[0]]
    changes = sum(x != y for x, y in zip(labels, labels[1:]))
    assert changes > 25  # class order has 2 changes; a random order about 39
    assert orders[0] == orders[1] and sorted(orders[0]) != orders[0]  # deterministic, not source order


def test_the_carve_out_takes_every_class_its_share(tmp_path, caplog):
    """--valid-fraction / --test-fraction carve per class: the totals are round(fraction x clips), every class with
    enough clips is in both carved sets, each keeps a training clip, the draw follows the seed; a class too small
    to be carved is warned about by name. A file listed again as unlabeled counts once when it is unreadable, and
    a 0-byte file is said to be empty."""
    sizes = {"kick": 6, "snare": 6, "tom": 3, "bell": 1}
    for label, n in sizes.items():
        for i in range(n):
            write_clip(tmp_path / "tree" / label / f"{label}{i}.wav", seconds=0.2, seed=i)
    splits = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"out{len(splits)}"
        with caplog.at_level("WARNING"):
            report = get_corpus("custom").prepare(tmp_path / "tree", out, unlabeled=tmp_path / "tree",
                                                  valid_fraction=0.25, test_fraction=0.25, seed=seed)
        cuts = [c for s in ("train", "valid", "test") for c in CutSet.from_file(report.manifests[s])]
        splits[len(splits)] = {c.id: c.custom["split"] for c in cuts}
        assert {s: report.clips[s] for s in ("train", "valid", "test")} == {"valid": 4, "test": 4, "train": 8}
        per_class = {label: {c.custom["split"] for c in cuts if c.custom["labels"] == [label]} for label in sizes}
        assert per_class["kick"] == per_class["snare"] == {"train", "valid", "test"}
        assert "train" in per_class["tom"] and per_class["bell"] == {"train"}
        assert "valid holds no clip of 1 class(es) (bell)" in caplog.text
        caplog.clear()
    assert splits[0] == splits[1] and splits[0] != splits[2]
    (tmp_path / "tree" / "kick" / "empty.wav").write_bytes(b"")  # a 0-byte file, in the tree and the pool
    report = get_corpus("custom").prepare(tmp_path / "tree", tmp_path / "again", unlabeled=tmp_path / "tree")
    assert report.unreadable == [(str(tmp_path / "tree" / "kick" / "empty.wav"), "empty file (0 bytes)")]
    assert "; 1 unreadable" in report.summary() and report.clips["pool"] == sum(sizes.values())
    assert "_prepare.json" not in report.summary()  # the one file is named: nothing more to look up
    (tmp_path / "tree" / "snare" / "empty.wav").write_bytes(b"")  # a second one: the summary gives one example
    report = get_corpus("custom").prepare(tmp_path / "tree", tmp_path / "again", unlabeled=tmp_path / "tree")
    listed = tmp_path / "again" / "custom_prepare.json"
    assert report.summary().endswith(f"; 2 unreadable (e.g. {report.unreadable[0][0]}: empty file (0 bytes)); all of "
                                     f"them in {listed}")
    assert len(json.loads(listed.read_text())["unreadable"]) == 2


def test_the_carve_out_of_a_multi_label_csv_keeps_every_label_in_train(tmp_path, caplog):
    """A label seen only after a clip's first one (``a;b``) keeps a training clip; the warning names the labels
    a carved split holds no clip of, counting every label of every clip and the splits the CSV gives; clips left
    over by classes too small to give any go to the large class, round after round, up to the total asked for."""
    rows = [f"clips/a{i}.wav,a,\n" for i in range(4)] + ["clips/ab.wav,a;b,\n"]
    rows += [f"clips/x{i}.wav,x,valid\n" for i in range(2)] + [f"clips/y{i}.wav,{'a;y' if i else 'y'},\n"
                                                              for i in range(2)]
    rows += [f"clips/big{i}.wav,big,\n" for i in range(30)] + [f"clips/one{i}.wav,one{i},\n" for i in range(10)]
    for row in rows:
        write_clip(tmp_path / row.split(",")[0], seconds=0.2)
    (tmp_path / "list.csv").write_text("path,label,split\n" + "".join(rows))
    for seed in range(4):
        with caplog.at_level("WARNING"):
            report = get_corpus("custom").prepare(None, tmp_path / f"out{seed}", csv=tmp_path / "list.csv",
                                                  valid_fraction=0.5, seed=seed)
        cuts = [c for s in ("train", "valid") for c in CutSet.from_file(report.manifests[s])]
        train = {label for c in cuts if c.custom["split"] == "train" for label in c.custom["labels"]}
        valid = {label for c in cuts if c.custom["split"] == "valid" for label in c.custom["labels"]}
        assert {"a", "b", "x", "y", "big"} <= train | {"x"} and "b" in train  # x is all valid, as the CSV says
        assert report.clips["valid"] >= 2 + 23  # the CSV's 2, and about half of the 47 others (big makes it up)
        short = sorted({"a", "b", "x", "y", "big", *(f"one{i}" for i in range(10))} - valid)
        assert f"valid holds no clip of {len(short)} class(es) ({', '.join(short[:5])}" in caplog.text
        assert "x" not in short and "one0" in short
        caplog.clear()
