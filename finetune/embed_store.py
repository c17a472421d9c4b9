"""The files ``finetune/embed.py`` writes (see its docstring for the layout): shards of embeddings with their rows,
written atomically as whole clips' windows are embedded, and the index and ``clips.*`` over the finished ones."""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from common.data.audio_file import AudioFile, AudioReadError, Samples, pad_windows, windows
from common.system.atomic import atomic_path, atomic_write_text
from common.system.paths import is_plain_name

if TYPE_CHECKING:  # the store is light: c2f-embed's --help reads FORMATS and POOLS without loading torch
    from finetune.embed_inputs import Clip
    from finetune.embedder import Embedder

__all__ = ["FORMATS", "INDEX_COLUMNS", "POOLS", "EmbedSummary", "ShardWriter", "done_rows", "read_clips", "read_index",
           "read_shard", "write_index"]

log = logging.getLogger("embed")

FORMATS = ("npy", "safetensors")
POOLS = ("auto", "mean", "prefix", "cls", "none")  # a folder's clip embeddings (--pool; none: frames only)
INDEX_COLUMNS = ("clip_id", "source", "window", "start", "end", "shard", "row")


def _shard_name(number: int, fmt: str) -> str:
    return f"{number:05d}.{'npz' if fmt == 'npy' else 'safetensors'}"


def _write_tensors(path: Path, tensors: dict[str, np.ndarray], fmt: str) -> None:
    size = sum(t.nbytes for t in tensors.values()) + 4096
    with atomic_path(path, size=size) as tmp:
        if fmt == "npy":
            with open(tmp, "wb") as handle:
                np.savez(handle, **tensors)
        else:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))


def read_shard(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of one shard (or of ``clips.*``): ``.npz``/``.npy`` or ``.safetensors``; ``keys``: only these."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="numpy") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys() if keys is None or k in keys}
    if path.suffix == ".npy":
        return {"clip": np.load(path, allow_pickle=False)}
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if keys is None or k in keys}


def _rows_of(path: Path) -> list[dict]:
    """The typed rows of an index file (``index.tsv`` or a shard's ``NNNNN.tsv``); ``ValueError`` naming the
    file and line when it is not one (damaged, cut short)."""
    lines = path.read_text().splitlines()
    if not lines or tuple(lines[0].split("\t")) != INDEX_COLUMNS:
        raise ValueError(f"{path} is not an embedding index (header {lines[0] if lines else 'missing'!r}, expected "
                         f"{chr(9).join(INDEX_COLUMNS)!r})")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        cols = line.split("\t")
        try:
            rows.append({"clip_id": cols[0], "source": cols[1], "window": int(cols[2]), "start": float(cols[3]),
                         "end": float(cols[4]), "shard": cols[5], "row": int(cols[6])})
        except (IndexError, ValueError):
            raise ValueError(f"{path}: line {number} is not an index row ({len(cols)} of {len(INDEX_COLUMNS)} "
                             f"columns: {line[:120]!r}); the file is damaged") from None
    return rows


def read_index(out: str | os.PathLike) -> list[dict]:
    """The rows of ``OUT/index.tsv`` (see the module docstring), typed."""
    return _rows_of(Path(out) / "index.tsv")


def read_clips(out: str | os.PathLike) -> np.ndarray:
    """``[windows, D]``: the clip embeddings of ``OUT`` in the order of its index."""
    out = Path(out)
    file = out / "clips.npy" if (out / "clips.npy").is_file() else out / "clips.safetensors"
    return read_shard(file)["clip"]


def _tsv(value: str) -> str:
    if "\t" in value or "\n" in value:
        raise ValueError(f"clip id or path {value!r} holds a tab or a line break, which index.tsv cannot hold")
    return value


@dataclass
class EmbedSummary:
    """What a run of :func:`embed_files` did.

    Attributes:
        out: the output folder.
        clips: clips embedded by this run; windows: their windows.
        skipped: clips already embedded by an earlier run (not computed again).
        bad: ``(source, reason)`` of the clips that could not be read (listed in ``bad_audio.tsv``).
        duplicates: clip ids given more than once (embedded once).
        batches: batches the model computed in this run.
    """

    out: Path
    clips: int = 0
    windows: int = 0
    skipped: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0
    batches: int = 0

    def to_dict(self) -> dict:
        """The summary as plain data (JSON), the skipped files with their reasons."""
        return {"out": str(self.out), "clips": self.clips, "windows": self.windows, "skipped": self.skipped,
                "bad": [{"source": s, "reason": r} for s, r in self.bad], "duplicates": self.duplicates,
                "batches": self.batches}


class ShardWriter:
    """Collects whole clips' windows, embeds them in batches and writes shards of about ``shard_size`` windows."""

    def __init__(self, embedder: Embedder, out: Path, fmt: str, batch_size: int, shard_size: int,
                 summary: EmbedSummary) -> None:
        self.embedder, self.out, self.fmt = embedder, out, fmt
        self.batch_size, self.shard_size, self.summary = batch_size, shard_size, summary
        numbers = [int(p.stem) for p in (out / "shards").glob("*.tsv") if p.stem.isdigit()]
        self.number = max(numbers, default=-1) + 1
        offsets, ends = embedder.step_times()
        self.offsets = np.stack([offsets, ends], axis=1)  # [T, 2]
        self.queue: list[np.ndarray] = []  # windows not embedded yet
        self.rows: list[tuple] = []  # (clip_id, source, window, start, end) of the shard's windows
        self.clip: list[np.ndarray] = []
        self.frames: list[np.ndarray] = []

    def add(self, clip: Clip, audio: AudioFile | Samples, hop: int) -> None:
        """Queue every window of ``clip`` (read from ``audio`` a window at a time, which this closes).

        Raises:
            AudioReadError: a window cannot be read; none of the clip's windows is kept.
        """
        size, rate = self.embedder.clip_samples, self.embedder.sample_rate
        first = len(self.rows)
        with audio:
            _tsv(clip.clip_id), _tsv(clip.source)  # before any compute
            try:
                for k, start in enumerate(windows(audio.num_samples, size, hop)):
                    piece = audio.read(start, size)
                    self.queue.append(piece)
                    self.rows.append((clip.clip_id, clip.source, k, start / rate, (start + piece.size) / rate))
                    if len(self.queue) >= self.batch_size:
                        self._compute()
            except AudioReadError:
                self._drop_from(first)
                raise
        self.summary.clips += 1
        if len(self.rows) >= self.shard_size:
            self.flush()

    def _drop_from(self, row: int) -> None:
        """Forget the windows from ``row`` on (a clip that failed midway; the shard holds whole clips)."""
        self._compute()
        self.rows = self.rows[:row]
        for name in ("clip", "frames"):
            kept = getattr(self, name)
            if kept:
                setattr(self, name, [np.concatenate(kept)[:row]])

    def _compute(self) -> None:
        if not self.queue:
            return
        batch, lengths = pad_windows(self.queue, self.embedder.clip_samples)
        out = self.embedder.embed(batch, lengths)
        self.summary.batches += 1
        if out.clip is not None:
            self.clip.append(out.clip)
        if out.frames is not None:
            self.frames.append(out.frames)
        self.queue = []

    def flush(self) -> None:
        """Embed what is queued and write it as one shard (its tensors, then its rows)."""
        self._compute()
        if not self.rows:
            return
        tensors = {}
        if self.clip:
            tensors["clip"] = np.concatenate(self.clip).astype(np.float32, copy=False)
        if self.frames:
            tensors["frames"] = np.concatenate(self.frames).astype(np.float32, copy=False)
            starts = np.array([r[3] for r in self.rows])
            tensors["frame_times"] = starts[:, None, None] + self.offsets[None]
        name = _shard_name(self.number, self.fmt)
        _write_tensors(self.out / "shards" / name, tensors, self.fmt)
        lines = ["\t".join(INDEX_COLUMNS)] + [
            f"{cid}\t{src}\t{k}\t{start:.6f}\t{end:.6f}\t{name}\t{i}"
            for i, (cid, src, k, start, end) in enumerate(self.rows)]
        atomic_write_text(self.out / "shards" / f"{self.number:05d}.tsv", "\n".join(lines) + "\n")
        self.summary.windows += len(self.rows)
        self.number += 1
        self.rows, self.clip, self.frames = [], [], []


def _lengths(path: Path) -> dict[str, int]:
    """The first dimension of every tensor of a shard (or of ``clips.*``), read from the headers only.

    Raises:
        ValueError: the file is no such shard (cut short, another format, an object array).
    """
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="numpy") as handle:
                return {k: handle.get_slice(k).get_shape()[0] for k in handle.keys()}
        if path.suffix == ".npy":
            return {"clip": len(np.load(path, mmap_mode="r", allow_pickle=False))}
        found = {}
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0)(member)
                if dtype.hasobject or not shape:
                    raise ValueError(f"{name} is not an array of numbers")
                found[name.removesuffix(".npy")] = shape[0]
        return found
    except Exception as err:  # noqa: BLE001 - whatever the file is, it is not a shard this package wrote
        raise ValueError(f"{type(err).__name__}: {err}") from None


def _shard_problem(path: Path, rows: int) -> str | None:
    """Why the tensors of a shard of ``rows`` rows are not usable (missing, unreadable, another length), or None."""
    if not path.is_file():
        return f"its tensors {path.name} are missing"
    try:
        lengths = _lengths(path)
    except ValueError as err:
        return f"its tensors {path.name} cannot be read ({err})"
    wrong = {k: n for k, n in lengths.items() if n != rows}
    if not lengths or wrong:
        return f"its tensors {path.name} hold {wrong or 'no'} rows where its index lists {rows}"
    return None


def done_rows(out: Path) -> list[dict]:
    """The rows of every finished shard, in shard order. A shard whose tensors are missing, cannot be read or do
    not have its rows (a damaged copy) is not finished: its index is removed (and the tensors) and its clips are
    embedded again."""
    rows = []
    for tsv in sorted((out / "shards").glob("*.tsv")):
        part = _rows_of(tsv)
        names = list(dict.fromkeys(row["shard"] for row in part))
        # a shard's rows name its tensors, a file beside it: a copy that names a path elsewhere is damaged, and
        # that path is neither read nor removed
        plain = len(names) == 1 and is_plain_name(names[0])
        problem = None if not part else _shard_problem(out / "shards" / names[0], len(part)) if plain else \
            f"its rows name {', '.join(map(repr, names))} for its tensors, not one file in {out / 'shards'}"
        if problem is not None:
            log.warning("%s: %s; its clips are embedded again", tsv, problem)
            tsv.unlink()
            if plain:
                (out / "shards" / names[0]).unlink(missing_ok=True)
            continue
        rows.extend(part)
    return rows


def _clips_fit(path: Path, rows: int) -> bool:
    """Whether ``clips.*`` is there with one row per index row (else it is written again from the shards)."""
    try:
        return path.is_file() and _lengths(path).get("clip") == rows
    except ValueError:
        return False


def write_index(out: Path, fmt: str, has_clip: bool) -> None:
    """``index.tsv`` and ``clips.*`` over every finished shard (kept when nothing changed)."""
    rows = done_rows(out)
    text = "\t".join(INDEX_COLUMNS) + "\n" + "".join(
        "\t".join([r["clip_id"], r["source"], str(r["window"]), f"{r['start']:.6f}", f"{r['end']:.6f}", r["shard"],
                   str(r["row"])]) + "\n" for r in rows)
    index = out / "index.tsv"
    clips_file = out / ("clips.npy" if fmt == "npy" else "clips.safetensors")
    if index.is_file() and index.read_text() == text and (not has_clip or _clips_fit(clips_file, len(rows))):
        return
    if has_clip and rows:
        shards = list(dict.fromkeys(r["shard"] for r in rows))
        if fmt == "npy":  # filled shard by shard: the whole corpus need not fit in memory
            first = read_shard(out / "shards" / shards[0], ["clip"])["clip"]
            with atomic_path(clips_file, size=len(rows) * first.shape[1] * 4 + 4096) as tmp:
                clip = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(rows), first.shape[1]))
                at = 0
                for shard in shards:
                    part = read_shard(out / "shards" / shard, ["clip"])["clip"]
                    clip[at : at + len(part)] = part
                    at += len(part)
                clip.flush()
                del clip
        else:
            parts = [read_shard(out / "shards" / shard, ["clip"])["clip"] for shard in shards]
            _write_tensors(clips_file, {"clip": np.concatenate(parts)}, fmt)
    atomic_write_text(index, text)
