"""finetune/embed_store.py on a folder it did not write: a shard index naming a path elsewhere for its tensors."""

import logging

import numpy as np

from finetune.embed_store import INDEX_COLUMNS, done_rows


def _shard_index(path, shard: str) -> None:
    path.write_text("\t".join(INDEX_COLUMNS) + f"\nclip\tsrc.wav\t0\t0.000000\t1.000000\t{shard}\t0\n")


def test_a_shard_index_naming_a_path_elsewhere_removes_nothing_there(tmp_path, caplog):
    """A shard whose tensors do not read is dropped with its tensors; a copied ``--out`` whose ``shards/*.tsv``
    named ``../../victim`` (or an absolute path) had that file deleted (a security review). Only a plain file
    name inside ``shards/`` is removed; the index naming anything else is damaged and dropped alone."""
    out = tmp_path / "emb"
    (out / "shards").mkdir(parents=True)
    victims = [tmp_path / "victim", tmp_path / "victim2"]
    for victim in victims:
        victim.write_text("precious")
    _shard_index(out / "shards" / "00000.tsv", "../../victim")
    _shard_index(out / "shards" / "00001.tsv", str(victims[1]))
    _shard_index(out / "shards" / "00002.tsv", "00002.npz")  # damaged tensors of its own: removed, as before
    (out / "shards" / "00002.npz").write_bytes(b"not a shard")
    np.savez(out / "shards" / "00003.npz", clip=np.zeros((1, 4), np.float32))
    _shard_index(out / "shards" / "00003.tsv", "00003.npz")
    with caplog.at_level(logging.WARNING):
        rows = done_rows(out)
    assert [r["shard"] for r in rows] == ["00003.npz"]
    assert all(v.read_text() == "precious" for v in victims)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00003.npz", "00003.tsv"]
    said = caplog.text
    assert "00000.tsv: its rows name '../../victim' for its tensors, not one file in" in said
    assert f"00001.tsv: its rows name '{victims[1]}' for its tensors" in said
