"""Export a manifest and its audio as Lhotse Shar shards (sequential reads for sets of millions of clips)."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
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

    The shards are written into a temporary folder beside ``out_dir`` (``.NAME.XXXXXXXX.tmp``), renamed to
    ``out_dir`` when all are written: a reader never sees part of an export, and two exports never mix their
    shards. ``out_dir`` must not hold files (an earlier export's shards beyond this one's count would be read
    as part of it).

    Raises:
        ValueError: ``out_dir`` holds files, or another export published it meanwhile.
    """
    out_dir = output_folder(out_dir)
    if any(out_dir.iterdir()):
        raise ValueError(f"--out {out_dir} holds files already (an earlier export?); a Shar folder holds one "
                         f"export's shards only: remove it or name a new folder")
    cuts = open_cuts([manifest])
    tmp = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        shards = cuts.to_shar(tmp, fields={"recording": "flac"}, shard_size=shard_size, num_jobs=num_jobs,
                              fault_tolerant=True)
        try:
            os.rename(tmp, out_dir)  # onto the empty folder, in one step
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ValueError(f"--out {out_dir} was filled by another export while this one ran; its shards "
                                 f"are kept, this export's are discarded") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    count = len(shards.get("cuts", []))
    return f"wrote {count} shard(s) of up to {shard_size} clips to {out_dir}"
