"""Write clip-level and frame-level embeddings of audio files, folders and manifests with a frozen model.

    python finetune/embed.py --init runs/pretrain/ssast_fshift4 --inputs a.wav folder/ data/esc50/esc50_fold1.jsonl.gz \\
        --out emb/ --layer final --pool mean --frames --format npy --batch-size 32
    python finetune/embed.py --init HTSAT_AudioSet_Saved_1.ckpt --inputs recordings/ --out emb_htsat/ --frames

``--init`` is anything fine-tuning takes (a run directory, an export, an official SSAST / AST ``.pth``,
a Hugging Face AST directory, an official HTS-AT checkpoint; :func:`finetune.embedder.load_embedder`).
The model, its front end, the layer and the pooling are :class:`finetune.embedder.Embedder`'s, the code
the linear probe extracts its features with. ``--inputs`` takes audio files, folders (every ``.wav``,
``.flac``, ``.ogg``, ``.mp3``, ``.opus`` under them, in sorted order) and Lhotse manifests
(``.jsonl``/``.jsonl.gz``, as ``python -m common.data.corpora prepare`` writes them, or a Shar folder).

A clip longer than the model's clip is cut into windows of one clip, ``--hop`` seconds apart (default:
one clip, no overlap), the last one ending with the clip; a shorter one is one window, zero-padded as in
training. Windows are embedded in batches of ``--batch-size`` on ``--device``. A file longer than two
minutes is read a window at a time (WAV, FLAC, AIFF, W64, RF64, CAF; ``common.data.audio_file``), so a
recording of hours takes no more memory than its windows' embeddings.

Output (``--out``)::

    embeddings.json          the model (init, SHA-256 of its file, config), front end, layer, pooling,
                             dim, steps per window and each step's offsets in seconds; the format
    index.tsv                one row per window: clip_id, source, window, start, end, shard, row
                             (start, end: seconds from the start of the clip; row i is row i of clips.*)
    clips.npy                [windows, D] float32 clip embeddings in the order of index.tsv
                             (--format safetensors: clips.safetensors, tensor "clip")
    shards/NNNNN.npz         per shard: "clip" [n, D], with --frames "frames" [n, T, D] and
                             "frame_times" [n, T, 2] (start, end of each step, seconds from the clip's
                             start); --format safetensors: shards/NNNNN.safetensors, same tensors
    shards/NNNNN.tsv         the shard's rows of the index (written after its tensors: a shard is done
                             when its .tsv exists)
    bad_audio.tsv            files that could not be read: source, reason
    run.lock                 held while a command writes here (a second command on the same --out stops
                             at once, naming the first; ``common.system.lock``)

With ``--pool none`` only frames are written (no ``clip`` tensors, no ``clips.*``). Frame ``t`` of a
window covers ``frame_times[.., t]``; frames past the window's ``end`` cover the zero padding of a short
clip. Ids: a manifest's cut id, else the path as given (a folder's files: the folder joined with the
file's path under it).

Shards are written atomically (:mod:`common.system.atomic`); running the same command again skips every clip
already in a shard and says how many, so a large corpus is embedded over several runs, and a finished
one computes nothing. A different model, layer, pooling or format in the same ``--out`` is refused.
Unreadable files (missing, not audio, corrupt, empty) are named, listed in ``bad_audio.tsv`` and
skipped (tried again by the next run); the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from common.data.audio_file import AudioFile, AudioReadError, Samples
from common.system.prog import prog
from finetune.embedder import POOLS, Embedder, load_embedder, parse_layer
from finetune.predict import hop_samples, hop_seconds, windows

# Imports the command alone needs are inside its functions: --help answers without loading torch.

__all__ = ["FORMATS", "INDEX_COLUMNS", "EmbedSummary", "embed_files", "list_clips", "read_index", "read_shard",
           "read_clips", "main"]

log = logging.getLogger("embed")

FORMATS = ("npy", "safetensors")
INDEX_COLUMNS = ("clip_id", "source", "window", "start", "end", "shard", "row")
MANIFEST_SUFFIXES = (".jsonl", ".jsonl.gz")
WHOLE_SECONDS = 120.0  # a clip up to this long is decoded whole by a prefetch thread; a longer one window by window


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Clip:
    """One clip to embed: its id, the file it is read from, and how (``open(sample_rate, channels)`` -> an
    :class:`~common.data.audio_file.AudioFile` or :class:`~common.data.audio_file.Samples`; ``channels``
    ``first`` or ``mean`` of a multi-channel file)."""

    clip_id: str
    source: str
    open: Callable[[int, str], AudioFile | Samples]


def _file_clip(path: Path) -> Clip:
    return Clip(str(path), str(path), lambda rate, channels="first": AudioFile(path, rate, channels))


def _cut_clip(cut) -> Clip:
    from common.data.decode import BadClip, load_clip, source_path

    def load(rate: int, channels: str = "first") -> Samples:
        try:
            return Samples(load_clip(cut, rate, channels), rate)
        except BadClip as err:
            raise AudioReadError(str(err)) from None

    return Clip(cut.id, source_path(cut), load)


def _is_manifest(path: Path) -> bool:
    return path.name.endswith(MANIFEST_SUFFIXES) or (path.is_dir() and any(path.glob("cuts.*.jsonl*")))


def list_clips(inputs: Sequence[str | os.PathLike]) -> tuple[Iterator[Clip], int | None]:
    """The clips of ``inputs`` (audio files, folders, manifests) and their number (None where a manifest
    cannot be counted without reading it).

    Raises:
        FileNotFoundError: a manifest or a folder that does not exist (a missing path without an audio suffix,
            or ending in ``/``), or a folder with no audio file. A missing audio file is a clip that cannot be
            read (listed, the others embedded).
    """
    from common.data.corpora.base import AUDIO_SUFFIXES
    from common.data.manifests import count_clips, manifest_problem

    plan: list[tuple[str, Path, list[Path] | None]] = []
    total: int | None = 0
    for item in inputs:
        path = Path(item)
        if _is_manifest(path):
            if not path.exists():
                raise FileNotFoundError(f"--inputs: manifest {path} does not exist")
            problem = manifest_problem(path) if path.is_file() else None
            if problem:
                raise ValueError(f"--inputs: manifest {path}: {problem}")
            count = count_clips(path)
            total = None if total is None or count is None else total + count
            plan.append(("manifest", path, None))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
            if not files:
                raise FileNotFoundError(f"--inputs: folder {path} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
            total = None if total is None else total + len(files)
            plan.append(("folder", path, files))
        else:  # a file, even a missing one: it is listed as unreadable, the others are embedded
            if not path.exists() and (str(item).endswith(("/", os.sep)) or path.suffix.lower() not in AUDIO_SUFFIXES):
                raise FileNotFoundError(f"--inputs {item}: no such file or folder")  # a folder, by its name
            total = None if total is None else total + 1
            plan.append(("file", path, [path]))

    def clips() -> Iterator[Clip]:
        from common.data.manifests import open_cuts

        for kind, path, files in plan:
            if kind == "manifest":
                for cut in open_cuts([str(path)]):
                    yield _cut_clip(cut)
            else:
                for file in files:
                    yield _file_clip(file)

    return clips(), total


def _prefetch(clips: Iterable[Clip], rate: int, workers: int,
              channels: str = "first") -> Iterator[tuple[Clip, AudioFile | Samples | str]]:
    """``(clip, its audio or the reason it cannot be read)`` in order, opened by ``workers`` threads; a clip of up
    to :data:`WHOLE_SECONDS` is decoded there too, a longer file is read a window at a time by whoever embeds it."""
    whole_seconds = WHOLE_SECONDS

    def read(clip: Clip) -> AudioFile | Samples | str:
        try:
            audio = clip.open(rate, channels)
            if audio.streamed and audio.num_samples <= whole_seconds * rate:
                with audio:
                    return Samples(audio.read(0, audio.num_samples), rate)
            return audio
        except AudioReadError as err:
            return str(err)

    if workers <= 0:
        for clip in clips:
            yield clip, read(clip)
        return
    with ThreadPoolExecutor(workers) as pool:
        queue: deque = deque()
        for clip in clips:
            queue.append((clip, pool.submit(read, clip)))
            if len(queue) >= 4 * workers:
                head, future = queue.popleft()
                yield head, future.result()
        while queue:
            head, future = queue.popleft()
            yield head, future.result()


# ---------------------------------------------------------------------------------------------- output
def _shard_name(number: int, fmt: str) -> str:
    return f"{number:05d}.{'npz' if fmt == 'npy' else 'safetensors'}"


def _write_tensors(path: Path, tensors: dict[str, np.ndarray], fmt: str) -> None:
    from common.system.atomic import atomic_path

    size = sum(t.nbytes for t in tensors.values()) + 4096
    with atomic_path(path, size=size) as tmp:
        if fmt == "npy":
            with open(tmp, "wb") as handle:
                np.savez(handle, **tensors)
        else:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))


def read_shard(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of one shard (or of ``clips.*``): ``.npz``/``.npy`` or ``.safetensors``; ``keys``: only these."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

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
        return {"out": str(self.out), "clips": self.clips, "windows": self.windows, "skipped": self.skipped,
                "bad": [{"source": s, "reason": r} for s, r in self.bad], "duplicates": self.duplicates,
                "batches": self.batches}


class _Writer:
    """Collects whole clips' windows, embeds them in batches and writes shards of about ``shard_size`` windows."""

    def __init__(self, embedder: Embedder, out: Path, fmt: str, batch_size: int, shard_size: int,
                 summary: EmbedSummary) -> None:
        self.embedder, self.out, self.fmt = embedder, out, fmt
        self.batch_size, self.shard_size, self.summary = batch_size, shard_size, summary
        numbers = [int(p.stem) for p in (out / "shards").glob("*.tsv") if p.stem.isdigit()]
        self.number = max(numbers, default=-1) + 1
        offsets, ends = embedder.step_times()
        self.offsets = np.stack([offsets, ends], axis=1)  # [T, 2]
        self.queue: list[tuple[np.ndarray, int]] = []  # windows not embedded yet
        self.rows: list[tuple] = []  # (clip_id, source, window, start, end) of the shard's windows
        self.clip: list[np.ndarray] = []
        self.frames: list[np.ndarray] = []

    def add(self, clip: Clip, audio: AudioFile | Samples, hop: int) -> None:
        """Queue every window of ``clip`` (read from ``audio`` a window at a time, which this closes).

        Raises:
            AudioReadError: a window cannot be read; none of the clip's windows is kept.
        """
        size, rate = self.embedder.clip_samples, self.embedder.sample_rate
        _tsv(clip.clip_id), _tsv(clip.source)  # before any compute
        first = len(self.rows)
        with audio:
            try:
                for k, start in enumerate(windows(audio.num_samples, size, hop)):
                    piece = audio.read(start, size)
                    self.queue.append((piece, piece.size))
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
        batch = torch.zeros(len(self.queue), self.embedder.clip_samples)
        lengths = torch.zeros(len(self.queue), dtype=torch.long)
        for i, (piece, length) in enumerate(self.queue):
            batch[i, :length] = torch.from_numpy(piece)
            lengths[i] = length
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
        from common.system.atomic import atomic_write_text

        lines = ["\t".join(INDEX_COLUMNS)] + [
            f"{cid}\t{src}\t{k}\t{start:.6f}\t{end:.6f}\t{name}\t{i}"
            for i, (cid, src, k, start, end) in enumerate(self.rows)]
        atomic_write_text(self.out / "shards" / f"{self.number:05d}.tsv", "\n".join(lines) + "\n")
        self.summary.windows += len(self.rows)
        self.number += 1
        self.rows, self.clip, self.frames = [], [], []


def _done_rows(out: Path) -> list[dict]:
    """The rows of every finished shard, in shard order (a shard whose tensors are missing is not finished)."""
    rows = []
    for tsv in sorted((out / "shards").glob("*.tsv")):
        part = _rows_of(tsv)
        if part and not (out / "shards" / part[0]["shard"]).is_file():
            log.warning("%s: its tensors %s are missing; its clips are embedded again", tsv, part[0]["shard"])
            tsv.unlink()
            continue
        rows.extend(part)
    return rows


def _check_settings(out: Path, settings: dict) -> None:
    path = out / "embeddings.json"
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not JSON ({err}); give a new --out") from None
    keys = ("model_sha256", "layer", "pool", "frames", "format", "hop_seconds", "front_end", "model", "channels")
    changed = [k for k in keys if before.get(k) != settings.get(k)]
    if changed:
        what = ", ".join(f"{k} {before.get(k)!r} -> {settings.get(k)!r}" if k not in ("front_end", "model")
                         else k for k in changed)
        raise ValueError(f"--out {out} holds embeddings made with other settings ({what}); give a new --out, or "
                         f"the same settings to go on")


def embed_files(init: str | os.PathLike | Embedder, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                layer: int | str | None = None, pool: str = "auto", frames: bool = False, fmt: str = "npy",
                batch_size: int = 16, hop_seconds: float | None = None, shard_size: int = 512, device: str = "cpu",
                workers: int = 2, norm: str | None = None, show_progress: bool = True) -> EmbedSummary:
    """Embed ``inputs`` into ``out`` (see the module docstring); clips already there are skipped.

    Args:
        init: anything ``--init`` takes, or a ready :class:`~finetune.embedder.Embedder` (then ``layer``,
            ``pool``, ``frames``, ``norm`` and ``device`` are its own).
        inputs: audio files, folders and manifests.
        out: the output folder (created; an earlier run's folder is continued).
        layer, pool, frames, norm, device: see :func:`finetune.embedder.load_embedder`.
        fmt: ``npy`` or ``safetensors``.
        batch_size: windows per forward pass.
        hop_seconds: seconds between the windows of a long clip (default: one clip).
        shard_size: windows per shard (a shard holds whole clips, so it can be larger).
        workers: decoding threads (0: decode in this thread).
        show_progress: a progress bar on a terminal.

    Raises:
        ValueError: a bad setting, or ``out`` holding embeddings made with other settings.
        FileNotFoundError: an input folder or manifest that does not exist.
    """
    from common.system.atomic import atomic_write_text, remove_orphans
    from common.system.disk import output_folder
    from common.system.lock import run_dir_lock
    from common.system.logger import progress

    if fmt not in FORMATS:
        raise ValueError(f"--format: choose one of {', '.join(FORMATS)}, got {fmt!r}")
    for name, value, least in (("--batch-size", batch_size, 1), ("--shard-size", shard_size, 1),
                               ("--workers", workers, 0)):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if not inputs:
        raise ValueError("--inputs: give audio files, folders or manifests")
    clips, total = list_clips(inputs)
    embedder = init if isinstance(init, Embedder) else load_embedder(
        init, layer=parse_layer(layer), pool=pool, frames=frames, norm=norm, device=device)
    rate, size = embedder.sample_rate, embedder.clip_samples
    hop = hop_samples(hop_seconds, rate, size)
    out = Path(out)
    starts, ends = embedder.step_times()
    settings = {**embedder.describe(), **({"channels": "mean"} if embedder.channels == "mean" else {}),
                "format": fmt, "hop_seconds": hop / rate,
                "window_seconds": size / rate, "step_offsets": [[float(s), float(e)] for s, e in zip(starts, ends)]}
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples are lists)
    with run_dir_lock(output_folder(out), "--out"):  # one command per --out: a second one stops at once
        _check_settings(out, settings)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        remove_orphans(out)
        text = json.dumps(settings, indent=1) + "\n"
        if not (out / "embeddings.json").is_file() or (out / "embeddings.json").read_text() != text:
            atomic_write_text(out / "embeddings.json", text)
        done_rows = _done_rows(out)
        done = {r["clip_id"] for r in done_rows}
        summary = EmbedSummary(out)
        writer = _Writer(embedder, out, fmt, batch_size, shard_size, summary)
        seen: set[str] = set()

        def todo() -> Iterator[Clip]:
            for clip in clips:
                if clip.clip_id in seen:
                    summary.duplicates += 1
                    continue
                seen.add(clip.clip_id)
                if clip.clip_id in done:
                    summary.skipped += 1
                    bar.update(1)
                    continue
                yield clip

        bar = progress(total, 0, f"embedding into {out}", show_progress, unit="clip")
        with bar:
            for clip, wave in _prefetch(todo(), rate, workers, embedder.channels):
                if not isinstance(wave, str):
                    try:
                        writer.add(clip, wave, hop)
                    except AudioReadError as err:
                        wave = str(err)
                if isinstance(wave, str):
                    summary.bad.append((clip.source, wave))
                    log.warning("%s: %s; skipped", clip.source, wave)
                bar.update(1)
            writer.flush()
        if summary.skipped:
            log.info("%d clips were embedded by an earlier run and are skipped", summary.skipped)
        bad_file = out / "bad_audio.tsv"
        if summary.bad:
            atomic_write_text(bad_file, "source\treason\n" + "".join(f"{s}\t{r}\n" for s, r in summary.bad))
        elif bad_file.is_file():
            bad_file.unlink()
        _write_index(out, fmt, embedder.pool != "none")
        return summary


def _write_index(out: Path, fmt: str, has_clip: bool) -> None:
    """``index.tsv`` and ``clips.*`` over every finished shard (kept when nothing changed)."""
    from common.system.atomic import atomic_write_text

    rows = _done_rows(out)
    text = "\t".join(INDEX_COLUMNS) + "\n" + "".join(
        "\t".join([r["clip_id"], r["source"], str(r["window"]), f"{r['start']:.6f}", f"{r['end']:.6f}", r["shard"],
                   str(r["row"])]) + "\n" for r in rows)
    index = out / "index.tsv"
    clips_file = out / ("clips.npy" if fmt == "npy" else "clips.safetensors")
    if index.is_file() and index.read_text() == text and (clips_file.is_file() or not has_clip):
        return
    if has_clip and rows:
        shards = list(dict.fromkeys(r["shard"] for r in rows))
        if fmt == "npy":  # filled shard by shard: the whole corpus need not fit in memory
            from common.system.atomic import atomic_path

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


# ---------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("finetune/embed.py"),
        description="Write clip-level and frame-level embeddings of audio files, folders and manifests with a "
                    "frozen model of any --init. Long clips are cut into windows; what an earlier run wrote into "
                    "--out is skipped; unreadable files are listed in OUT/bad_audio.tsv (exit status 1).",
        epilog="example: python finetune/embed.py --init runs/pretrain/ssast_fshift4 --inputs clips/ "
               "data/esc50/esc50_fold1.jsonl.gz --out emb/ --frames")
    parser.add_argument("--init", required=True,
                        help="a run directory, an export, an official SSAST / AST .pth, a Hugging Face AST "
                             "directory, an official HTS-AT checkpoint")
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="audio files, folders (every audio file under them) and Lhotse manifests (.jsonl.gz)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (an earlier run's is continued)")
    parser.add_argument("--layer", default="final",
                        help="final (every block and the final norm, default) or a block number (1-based, negative "
                             "from the end: -1 is the last block before the final norm)")
    parser.add_argument("--pool", choices=POOLS, default="auto",
                        help="clip embedding: mean of the patch tokens, mean of the prefix tokens, the cls token, "
                             "none (frames only), or auto: as the init's code pools (default)")
    parser.add_argument("--frames", action="store_true", help="also write frame embeddings (one per time step)")
    parser.add_argument("--format", choices=FORMATS, default="npy", help="npy (.npy/.npz, default) or safetensors")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default 16)")
    parser.add_argument("--hop", type=hop_seconds, default=None,
                        help="seconds between the windows of a long clip (default: one clip, no overlap)")
    parser.add_argument("--shard-size", type=int, default=512, help="windows per shard (default 512)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    parser.add_argument("--norm", default=None,
                        help="AST family: normalisation statistics (a name such as audioset, or a stats JSON) "
                             "instead of what the init records")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from common.system.distributed import single_process

        single_process("c2f-embed")
        from common.cli import command_device
        from common.system.logger import setup_logging

        setup_logging(None)
        device = command_device(args.device)
        summary = embed_files(args.init, args.inputs, args.out, layer=args.layer, pool=args.pool,
                              frames=args.frames, fmt=args.format, batch_size=args.batch_size, hop_seconds=args.hop,
                              shard_size=args.shard_size, device=device, workers=args.workers, norm=args.norm)
        if args.json:
            print(json.dumps(summary.to_dict(), indent=1))
        else:
            print(f"embedded {summary.clips} clips ({summary.windows} windows) into {summary.out}"
                  + (f"; {summary.skipped} clips already there were skipped" if summary.skipped else ""))
        if summary.duplicates:
            print(f"warning: {summary.duplicates} clip ids were given more than once; embedded once",
                  file=sys.stderr)
        if summary.bad:  # each one was named as it was skipped
            print(f"error: {len(summary.bad)} files could not be read and were skipped; listed in "
                  f"{summary.out / 'bad_audio.tsv'}", file=sys.stderr)
        return 1 if summary.bad else 0

    from common.cli import run_main

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
