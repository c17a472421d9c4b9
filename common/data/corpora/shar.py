"""Export a manifest and its audio as Lhotse Shar shards (sequential reads for sets of millions of clips)."""

from __future__ import annotations

from pathlib import Path

from common.data.manifests import open_cuts
from common.system.disk import output_folder

__all__ = ["export_shar"]


def export_shar(manifest: str | Path, out_dir: str | Path, shard_size: int = 1000, num_jobs: int = 2) -> str:
    """Write ``cuts.NNNNNN.jsonl.gz`` + ``recording.NNNNNN.tar`` shards (FLAC audio) into ``out_dir``.

    Unreadable clips are left out (Lhotse's ``fault_tolerant``); a recipe names ``out_dir`` where it would
    name the manifest. A shard holds each cut's own channel (the first of a multi-channel file, as ``prepare``
    writes the cuts): ``data.channels: mean`` (HTS-AT's default) has nothing to mix down there, so mix a
    multi-channel corpus down before (``ffmpeg -ac 1``) where the mean matters.
    """
    out_dir = output_folder(out_dir)  # to_shar does not create it
    cuts = open_cuts([manifest])
    shards = cuts.to_shar(out_dir, fields={"recording": "flac"}, shard_size=shard_size, num_jobs=num_jobs,
                          fault_tolerant=True)
    count = len(shards.get("cuts", []))
    return f"wrote {count} shard(s) of up to {shard_size} clips to {out_dir}"
