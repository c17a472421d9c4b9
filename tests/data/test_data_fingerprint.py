"""The manifests' fingerprints: recorded in ledger.json, and a resume refused when they changed."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from common.data.fingerprint import changes, fingerprint, run_fingerprints
from pretrain.run import main
from tests.helpers import RECIPE, run, tiny


def test_a_fingerprint_follows_the_content(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"id": "x"}\n')
    first = fingerprint(a)
    a.write_text('{"id": "x"}\n')  # rewritten, same bytes
    assert fingerprint(a) == first and first["bytes"] == 12
    a.write_text('{"id": "y"}\n')
    assert fingerprint(a)["sha256"] != first["sha256"]

    shar = tmp_path / "shar"
    shar.mkdir()
    (shar / "cuts.000000.jsonl.gz").write_bytes(gzip.compress(b'{"id": "x"}\n'))
    (shar / "recording.000000.tar").write_bytes(b"\0" * 100)
    before = fingerprint(shar)
    (shar / "recording.000000.tar").write_bytes(b"\1" * 100)  # audio shards: names and sizes only
    assert fingerprint(shar) == before
    (shar / "cuts.000000.jsonl.gz").write_bytes(gzip.compress(b'{"id": "y"}\n'))
    assert fingerprint(shar)["sha256"] != before["sha256"]


def test_the_same_clips_gzipped_again_are_the_same_manifest(tmp_path):
    """A gzip header holds the time of writing: a corpus prepared again (or on another machine) gives other bytes
    of the same clips. Resumes and baselines compare the content; ledgers that recorded only the bytes still
    compare by the bytes."""
    from common.phases.baseline import differences

    lines = b'{"id": "x"}\n{"id": "y"}\n'
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, mtime in ((a, 1_000_000), (b, 2_000_000)):
        folder.mkdir()
        (folder / "v.jsonl.gz").write_bytes(gzip.compress(lines, mtime=mtime))
        shar = folder / "shar"
        shar.mkdir()
        (shar / "cuts.000000.jsonl.gz").write_bytes(gzip.compress(lines, mtime=mtime))
    first, again = fingerprint(a / "v.jsonl.gz"), fingerprint(b / "v.jsonl.gz")
    assert first["sha256"] != again["sha256"] and first["content_sha256"] == again["content_sha256"]
    assert fingerprint(a / "shar")["content_sha256"] == fingerprint(b / "shar")["content_sha256"]
    old = {"train": {}, "valid": {"v.jsonl.gz": first}}
    assert changes(old, {"train": {}, "valid": {"v.jsonl.gz": again}}) == {}
    assert differences({"data": old}, "acc", {"train": {}, "valid": {"w.jsonl.gz": again}}, None) == []
    bytes_only = {"train": {}, "valid": {"v.jsonl.gz": {"sha256": first["sha256"], "bytes": first["bytes"]}}}
    assert changes(bytes_only, {"train": {}, "valid": {"v.jsonl.gz": first}}) == {}  # an older ledger: same file
    assert list(changes(bytes_only, {"train": {}, "valid": {"v.jsonl.gz": again}})) == ["valid: v.jsonl.gz"]
    (b / "v.jsonl.gz").write_bytes(gzip.compress(b'{"id": "z"}\n'))
    assert list(changes(old, {"train": {}, "valid": {"v.jsonl.gz": fingerprint(b / "v.jsonl.gz")}})) == \
        ["valid: v.jsonl.gz"]


def test_a_manifest_named_with_home_or_a_variable_is_fingerprinted_where_the_loader_reads_it(tmp_path,
                                                                                              monkeypatch):
    (tmp_path / "a.jsonl").write_text('{"id": "x"}\n')
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("C2F_DATA", str(tmp_path))
    assert fingerprint("~/a.jsonl") == fingerprint("$C2F_DATA/a.jsonl") == fingerprint(tmp_path / "a.jsonl")


def test_changes_name_the_role_and_the_path(tmp_path):
    train, valid = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    train.write_text("1")
    valid.write_text("2")
    old = run_fingerprints([train], [valid])
    assert changes(old, run_fingerprints([train], [valid])) == {}
    assert changes(None, old) == {}  # a run recorded before fingerprints: nothing to compare
    valid.write_text("3")
    changed = changes(old, run_fingerprints([train], [valid]))
    assert list(changed) == [f"valid: {valid}"] and changed[f"valid: {valid}"]["from"] == old["valid"][str(valid)]["sha256"]


def test_changes_compare_manifests_in_order_whatever_their_paths(tmp_path):
    """The same manifests by other paths (a link, another working folder) are no change; two swapped are (the data
    position would point at other clips); one added or removed is."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("1")
    b.write_text("2")
    (tmp_path / "link").symlink_to(tmp_path)
    old = run_fingerprints([a, b], [])
    assert changes(old, run_fingerprints([tmp_path / "link" / "a.jsonl", tmp_path / "link" / "b.jsonl"], [])) == {}
    assert list(changes(old, run_fingerprints([b, a], []))) == [f"train: {b}", f"train: {a}"]
    assert list(changes(old, run_fingerprints([a], []))) == [f"train: {b}"]


@pytest.mark.slow
def test_a_resume_on_changed_manifests_is_refused_unless_accepted(tmp_path, synth_corpus, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(synth_corpus, corpus)
    run_dir = tmp_path / "run"
    assert run(run_dir, corpus, stop=2) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    pool = str(corpus / "synth_pool.jsonl.gz")
    assert ledger["data"]["train"][pool] == fingerprint(pool)
    assert list(ledger["data"]["valid"]) == [str(corpus / "synth_valid.jsonl.gz")]

    lines = gzip.decompress(Path(pool).read_bytes()).decode().splitlines()
    Path(pool).write_bytes(gzip.compress(("\n".join(reversed(lines)) + "\n").encode()))  # same clips, other order
    capsys.readouterr()
    assert run(run_dir, corpus) == 2
    err = capsys.readouterr().err
    assert "manifests changed since the run started" in err and f"train: {pool}" in err
    assert "--accept-changed-data" in err

    assert main(["--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(corpus), "--accept-changed-data"]) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    (intervention,) = ledger["interventions"]
    assert list(intervention["changes"]) == [f"manifest train: {pool}"] and intervention["step"] == 2
    assert ledger["data"]["train"][pool] == fingerprint(pool)  # the manifests the run went on with
    assert (run_dir / "model.safetensors").is_file()


def test_a_manifest_is_read_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """A start fingerprints its manifests twice (the ranks' check against rank 0's, then the ledger's record): the
    second is the first's result while the file is as it was, and a changed file is read again."""
    import common.data.fingerprint as fp

    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a"}\n')
    reads = []
    real = fp._file_sha256
    monkeypatch.setattr(fp, "_file_sha256", lambda p, into=None: reads.append(p) or real(p, into))
    first = fp.fingerprint(path)
    assert fp.fingerprint(path) == first and len(reads) == 2  # content and bytes, once
    path.write_text('{"id": "b"}\n{"id": "c"}\n')
    assert fp.fingerprint(path) != first and len(reads) == 4


def test_a_shar_folder_with_a_cuts_shard_cut_short_is_named(tmp_path):
    """A Shar folder whose cuts shard was cut short (a copy that stopped) is a ValueError naming the shard, as a cut
    manifest file is (it was an EOFError out of the fingerprint, a traceback at the ranks' check)."""
    shar = tmp_path / "shar"
    shar.mkdir()
    (shar / "cuts.000000.jsonl.gz").write_bytes(gzip.compress(b'{"id": "x"}\n' * 200)[:40])
    with pytest.raises(ValueError, match="cuts.000000.jsonl.gz"):
        fingerprint(shar)
