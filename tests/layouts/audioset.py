"""Miniature AudioSet: the three segment CSVs and class_labels_indices.csv in Google's exact format, and
clips named the ways different downloaders name them (plain, PANNs ``Y`` prefix, ``YTID_start``, DCASE's
``Y<YTID>_<start>_<end>``)."""

from __future__ import annotations

from pathlib import Path

from tests.layouts import truncate, write_clip, write_garbage

# (mid, display_name) in index order; "Child speech, kid speaking" has a comma, as in the real file
CLASSES = [
    ("/m/09x0r", "Speech"),
    ("/m/05zppz", "Male speech, man speaking"),
    ("/m/0ytgt", "Child speech, kid speaking"),
    ("/m/04rlf", "Music"),
    ("/t/dd00088", "Gush"),
]
SEGMENT_CSVS = {
    "balanced_train": "balanced_train_segments.csv",
    "unbalanced_train": "unbalanced_train_segments.csv",
    "eval": "eval_segments.csv",
}

# split -> (YTID, start, mids, file name under the audio folder or None for a clip never downloaded)
SEGMENTS = {
    "balanced_train": [
        ("--PJHxphWEs", 30.0, ["/m/09x0r", "/t/dd00088"], "--PJHxphWEs.wav"),
        ("-0RWZT-miFs", 420.0, ["/m/04rlf"], "balanced/Y-0RWZT-miFs.wav"),
        ("0a_Xz1B2c3d", 30.0, ["/m/05zppz", "/m/09x0r"], "0a_Xz1B2c3d_30.000.flac"),
        ("YxYpzAo3xuE", 0.0, ["/m/0ytgt"], None),
    ],
    "unbalanced_train": [
        ("_-fH_RaGkPM", 10.0, ["/m/04rlf"], "unbalanced/part00/_-fH_RaGkPM_10000_20000.wav"),
        ("0BCd5ef6G7h", 5.0, ["/m/09x0r"], "unbalanced/part00/0BCd5ef6G7h.wav"),
    ],
    "eval": [
        ("--4gqARaEJE", 0.0, ["/m/09x0r", "/m/0ytgt", "/m/04rlf"], "eval/--4gqARaEJE.wav"),
        ("-1nilez17Dg", 30.0, ["/m/04rlf"], "eval/-1nilez17Dg.ogg"),
        ("-5vpdDAJ9vQ", 20.0, ["/m/0ytgt"], "eval/Y-5vpdDAJ9vQ_20.000_30.000.wav"),  # DCASE: Y<YTID>_<start>_<end>
    ],
}
CORRUPT = "0BCd5ef6G7h"  # a failed download: an audio suffix, no audio
TRUNCATED = "--4gqARaEJE"  # an interrupted download: the WAV header survives, 40% of the bytes do
STEREO = "-1nilez17Dg"  # 44.1 kHz stereo ogg


def _write_segments(path: Path, rows: list[tuple[str, float, list[str], str | None]]) -> None:
    labels = sum(len(r[2]) for r in rows)
    lines = [
        "# Segments csv created Sun Mar  5 10:54:31 2017",
        f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels={len(CLASSES)}, "
        f"num_positive_labels={labels}",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    lines += [f'{ytid}, {start:.3f}, {start + 10:.3f}, "{",".join(mids)}"' for ytid, start, mids, _ in rows]
    path.write_text("\n".join(lines) + "\n")


def build(root: Path, audio_dir: str = "audio", splits: tuple[str, ...] = tuple(SEGMENTS)) -> dict:
    """Write the layout; returns ``clips`` {split: {YTID: mids}} of the clips that should be prepared,
    ``missing`` / ``corrupt`` / ``truncated`` (YTID -> path), ``classes`` and ``names``."""
    root.mkdir(parents=True, exist_ok=True)
    audio = root / audio_dir
    (root / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n" + "".join(f'{i},{mid},"{name}"\n' for i, (mid, name) in enumerate(CLASSES))
    )
    clips: dict[str, dict[str, list[str]]] = {}
    missing, corrupt, truncated = {}, {}, {}
    for seed, (split, rows) in enumerate((s, SEGMENTS[s]) for s in splits):
        _write_segments(root / SEGMENT_CSVS[split], rows)
        clips[split] = {}
        for k, (ytid, _, mids, name) in enumerate(rows):
            if name is None:
                missing[ytid] = audio / ytid
                continue
            path = audio / name
            if ytid == CORRUPT:
                corrupt[ytid] = write_garbage(path)
                continue
            stereo = ytid == STEREO
            write_clip(path, seconds=1.0, sr=44100 if stereo else 16000, channels=2 if stereo else 1,
                       seed=10 * seed + k)
            if ytid == TRUNCATED:  # the header claims 1 s, the file holds 0.4 s: reported, not prepared
                truncated[ytid] = truncate(path)
                continue
            clips[split][ytid] = mids
    return {"clips": clips, "missing": missing, "corrupt": corrupt, "truncated": truncated,
            "classes": [mid for mid, _ in CLASSES], "names": dict(CLASSES)}
