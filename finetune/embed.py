"""Write clip-level and frame-level embeddings of audio files, folders and manifests with a frozen model.

    python finetune/embed.py --init runs/pretrain/ssast_fshift4 --inputs a.wav folder/ data/esc50/esc50_fold1.jsonl.gz \\
        --out emb/ --layer final --pool mean --frames --format npy --batch-size 32
    python finetune/embed.py --init HTSAT_AudioSet_Saved_1.ckpt --inputs recordings/ --out emb_htsat/ --frames

``--init`` is anything fine-tuning takes (a run directory, an export, an official SSAST / AST ``.pth``,
a Hugging Face AST directory, an official HTS-AT checkpoint; :func:`finetune.embedder.load_embedder`).
The model, its front end, the layer and the pooling are :class:`finetune.embedder.Embedder`'s, the code
the linear probe extracts its features with. ``--inputs`` takes audio files, folders (every audio file
under them, ``common.data.audio_file.AUDIO_SUFFIXES``, in sorted order) and Lhotse manifests
(``.jsonl``/``.jsonl.gz``, as ``python -m common.data.corpora prepare`` writes them, or a Shar folder).

A clip longer than the model's clip is cut into windows of one clip, ``--hop`` seconds apart (default:
one clip, no overlap), the last one ending with the clip (so it overlaps the one before); a shorter one is one
window, filled as in training: zero-padded, or repeated for a model trained with ``data.pad: repeat`` (its record,
as ``predict`` reads it). Windows are embedded in batches of ``--batch-size`` on ``--device``. A file
longer than two minutes is read a window at a time (WAV, FLAC, AIFF, W64, RF64, CAF; ``common.data.audio_file``),
so a recording of hours takes no more memory than its windows' embeddings.

Output (``--out``)::

    embeddings.json          the model (init, SHA-256 of its file, config), front end, layer, pooling,
                             dim, steps per window and each step's offsets in seconds; the format
    index.tsv                one row per window: clip_id, source, window, start, end, shard, row
                             (start, end: seconds from the start of the clip, for a manifest's cut from the
                             cut's start in its source, the segment's of a whole video; row i is row i of clips.*)
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
window covers ``frame_times[.., t]``; frames past the window's ``end`` cover the padding of a short clip
(zeros, or the clip repeated). Ids: a manifest's cut id, else the path as given (a folder's files: the folder
joined with the file's path under it); ``source`` is the file read, an audio file's absolute path. A clip already
embedded is known by its cut id, or for an audio file by that absolute path: a run continued from another folder, or
naming a file otherwise (``./a.wav``, ``dir/../a.wav``), skips it, and a file given twice is embedded once.

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
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from common.data.audio_file import AudioReadError, hop_samples, hop_seconds
from common.system.prog import DEVICE_HELP, prog, whole_number
from finetune.embed_store import FORMATS, POOLS, EmbedSummary, ShardWriter, done_rows, write_index

if TYPE_CHECKING:
    from finetune.embed_inputs import Clip
    from finetune.embedder import Embedder

# Imports the command alone needs are inside its functions: --help answers without loading torch.

__all__ = ["embed_files", "main"]

log = logging.getLogger("embed")


def _check_settings(out: Path, settings: dict) -> None:
    path = out / "embeddings.json"
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not JSON ({err}); give a new --out") from None
    if not isinstance(before, dict):
        raise ValueError(f"{path} is a JSON {type(before).__name__}, not the settings embed writes; give a new --out")
    keys = ("model_sha256", "layer", "pool", "frames", "format", "hop_seconds", "front_end", "model", "channels", "pad")
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
    from common.system.paths import escape_controls
    from finetune.embed_inputs import clip_key, list_clips, prefetch
    from finetune.embedder import Embedder, load_embedder, parse_layer

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
                **({"pad": "repeat"} if embedder.pad == "repeat" else {}),  # (an older folder's zeros stay valid)
                "format": fmt, "hop_seconds": hop / rate,
                "window_seconds": size / rate, "step_offsets": [[float(s), float(e)] for s, e in zip(starts, ends)]}
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples are lists)
    with run_dir_lock(output_folder(out), "--out"):  # one command per --out: a second one stops at once
        _check_settings(out, settings)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        remove_orphans(out, ("shards",))  # the folders it writes into, not a tree --out may hold
        text = json.dumps(settings, indent=1) + "\n"
        if not (out / "embeddings.json").is_file() or (out / "embeddings.json").read_text() != text:
            atomic_write_text(out / "embeddings.json", text)
        done = {clip_key(r["clip_id"], r["source"]) for r in done_rows(out)}
        summary = EmbedSummary(out)
        writer = ShardWriter(embedder, out, fmt, batch_size, shard_size, summary)
        seen: set[tuple[str, str]] = set()

        def todo() -> Iterator[Clip]:
            for clip in clips:
                if clip.key in seen:
                    summary.duplicates += 1
                    continue
                seen.add(clip.key)
                if clip.key in done:
                    summary.skipped += 1
                    bar.update(1)
                    continue
                yield clip

        bar = progress(total, 0, f"embedding into {out}", show_progress, unit="clip")
        with bar:
            for clip, wave in prefetch(todo(), rate, workers, embedder.channels):
                if not isinstance(wave, str):
                    try:
                        writer.add(clip, wave, hop)
                    except AudioReadError as err:
                        wave = str(err)
                if isinstance(wave, str):
                    summary.bad.append((clip.source, wave))
                    log.warning("%s: %s; skipped", escape_controls(clip.source), escape_controls(wave))
                bar.update(1)
            writer.flush()
        if summary.skipped:
            log.info("%d clips were embedded by an earlier run and are skipped", summary.skipped)
        bad_file = out / "bad_audio.tsv"
        if summary.bad:
            atomic_write_text(bad_file, "source\treason\n" + "".join(f"{escape_controls(s)}\t{escape_controls(r)}\n"
                                                                       for s, r in summary.bad))  # a row per clip
        elif bad_file.is_file():
            bad_file.unlink()
        write_index(out, fmt, embedder.pool != "none")
        return summary


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
    parser.add_argument("--batch-size", type=whole_number(1, "of windows >= 1"), default=16,
                        help="windows per forward pass (default 16)")
    parser.add_argument("--hop", type=hop_seconds, default=None,
                        help="seconds between the windows of a long clip (default: one clip; the last window ends with "
                             "the clip, overlapping the one before)")
    parser.add_argument("--shard-size", type=whole_number(1, "of windows >= 1"), default=512,
                        help="windows per shard (default 512)")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--workers", type=whole_number(0, ">= 0 (0: decode in this thread)"), default=2,
                        help="decoding threads (default 2)")
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
