"""Command line for corpus preparation and statistics.

    python -m common.data.corpora list
    python -m common.data.corpora prepare NAME --src DIR --out DIR [corpus options]
    python -m common.data.corpora stats MANIFEST [--target-frames 1024]
    python -m common.data.corpora shar MANIFEST --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.data.corpora import CORPORA, get_corpus
from common.system.prog import error_line, prog, whole_number
from common.system.signals import piped

# Imports the command alone needs are inside its functions: --help answers without loading torch.


_count = whole_number(1, "above 0")
_workers = whole_number(0, ">= 0 (0: decode in this process)")  # as evaluate's and the probe's


def _build_parser(corpora: bool = True) -> argparse.ArgumentParser:
    """The command's options; ``corpora``: with ``prepare``'s corpora, whose options their modules add (each imports
    Lhotse: left out of a command line without ``prepare``, so that ``--help`` answers without loading it)."""
    parser = argparse.ArgumentParser(
        prog=prog("python -m common.data.corpora"),
        description="Prepare Lhotse manifests for the supported corpora and compute normalisation statistics.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the corpora that can be prepared")

    prep = sub.add_parser("prepare", help="write Lhotse manifests for a downloaded corpus",
                          description="Write Lhotse manifests (NAME_SPLIT.jsonl.gz), the class list and a report.")
    names = prep.add_subparsers(dest="corpus", required=True, metavar="NAME")
    for name in CORPORA if corpora else ():
        module = get_corpus(name)
        p = names.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        needs_src = getattr(module, "NEEDS_SRC", True)
        p.add_argument("--src", type=Path, required=needs_src,
                       help=getattr(module, "SRC_HELP", "the corpus as downloaded"))
        p.add_argument("--out", type=Path, required=True, help="folder for the manifests")
        p.add_argument("--jobs", type=_count, default=4, help="threads reading audio headers (default 4)")
        if hasattr(module, "add_arguments"):
            module.add_arguments(p)

    stats = sub.add_parser("stats", help="fbank mean/std of a manifest (as AST's get_norm_stats)",
                           description="Compute the fbank mean and std of a manifest's clips and write them "
                                       "to MANIFEST_STEM.stats.json beside it; recipes name that file as `norm`.")
    stats.add_argument("manifest", type=Path, help="a Lhotse manifest (.jsonl.gz)")
    stats.add_argument("--target-frames", type=_count, default=1024,
                       help="frames per clip at 10 ms, as the task's clip length (default 1024: AudioSet's 10 s; "
                            "clips are cut / zero-padded as in training, so a longer length than the clips counts "
                            "padding)")
    stats.add_argument("--max-clips", type=_count, default=None,
                       help="use at most this many clips (the first ones; default: all)")
    stats.add_argument("--num-mel-bins", type=_count, default=128, help="mel bins of the fbank (default 128)")
    stats.add_argument("--workers", type=_workers, default=2,
                       help="decoding worker processes (default 2; 0: decode in this process)")

    shar = sub.add_parser("shar", help="export a manifest and its audio as Lhotse Shar shards",
                          description="Export a manifest with its audio as Lhotse Shar shards, for sets of "
                                      "millions of clips; recipes then name the Shar folder instead of the manifest.")
    shar.add_argument("manifest", type=Path, help="a Lhotse manifest (.jsonl.gz)")
    shar.add_argument("--out", type=Path, required=True,
                      help="folder for the shards (cuts.*.jsonl.gz, recording.*.tar)")
    shar.add_argument("--shard-size", type=_count, default=1000, help="clips per shard (default 1000)")
    shar.add_argument("--jobs", type=_count, default=2, help="processes writing shards (default 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; a failure ends with one ``error:`` line and exit status 2 (no traceback). The
    process's logging is given back as it was (a call from Python)."""
    from common.system.logger import process_logging  # lazy: the logger imports tqdm; --help and list need none

    with process_logging():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from common.system.logger import setup_logging  # lazy: as main's

    # the package's console: lines never land on the progress bars of prepare / stats, Lhotse's notices stay off it
    setup_logging(None, console_format="%(levelname)s %(message)s")
    args = _build_parser("prepare" in (sys.argv[1:] if argv is None else argv)).parse_args(argv)
    try:
        return piped(lambda: _run(args))  # `... | head`: what was asked is done, its output no longer read
    except KeyboardInterrupt:
        print("interrupted; nothing was published (manifests appear only when complete)", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        # missing folders / metadata, malformed CSVs, unknown corpora, Lhotse errors: all name their file
        message = str(err) or type(err).__name__
        if isinstance(err, KeyError):
            message = f"missing key {message}"
        print(f"error: {error_line(message)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "list":
        for name in CORPORA:
            print(f"{name:<16} {get_corpus(name).DESCRIPTION}")
        return 0
    if args.command == "prepare":
        from common.data.corpora.base import prepare_lock

        module = get_corpus(args.corpus)
        options = {k: v for k, v in vars(args).items() if k not in ("command", "corpus", "src", "out", "jobs")}
        with prepare_lock(args.out):  # one prepare per --out: a second one stops at once, naming this one
            report = module.prepare(args.src, args.out, num_jobs=args.jobs, **options)
        print(report.summary())
        for note in report.notes:
            print(f"  note: {note}")
        for split, path in sorted(report.manifests.items()):
            print(f"  {split:<12} {path}")
        if not sum(report.clips.values()):
            print(f"error: no clip was written; {args.out / (report.corpus + '_prepare.json')} lists what was "
                  f"missing or unreadable", file=sys.stderr)
            return 1
        return 0
    if args.command == "stats":
        from common.data.corpora.stats import compute_stats

        result = compute_stats(args.manifest, target_frames=args.target_frames, max_clips=args.max_clips,
                               num_mel_bins=args.num_mel_bins, workers=args.workers)
        print(f"mean={result['mean']:.7f} std={result['std']:.7f} over {result['clips']} clips -> {result['path']}")
        return 0
    if args.command == "shar":
        from common.data.corpora.shar import export_shar

        print(export_shar(args.manifest, args.out, shard_size=args.shard_size, num_jobs=args.jobs))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
