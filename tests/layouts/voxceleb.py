"""Miniature VoxCeleb1: iden_split.txt, vox1_meta.csv (tab-separated) and wav/<speaker>/<video>/<utt>.wav."""

from __future__ import annotations

from pathlib import Path

from tests.layouts import write_clip, write_garbage

# speaker -> (VGGFace1 id, gender, nationality, set, videos); YouTube ids may hold '-' and '_'
SPEAKERS = {
    "id10001": ("A.J._Buckley", "m", "Ireland", "dev", ["1zcIwhmdeo4", "7w0IBEWc9Qw"]),
    "id10002": ("A.R._Rahman", "m", "India", "dev", ["-5TWw2pDbBk"]),
    "id10270": ("Eartha_Kitt", "f", "USA", "test", ["5r0dWxy17C8"]),
}
EXTRA_META = ("id10003", "Aamir_Khan", "m", "India", "dev")  # in vox1_meta.csv only
SPLIT_CODES = {"train": 1, "valid": 2, "test": 3}


def build(root: Path, corrupt: bool = True, missing: bool = True, meta: bool = True) -> dict:
    """Each speaker's utterances go to train, valid, test, train, ... in turn.

    Returns ``{"clips": {cut id: (split, speaker)}, "classes": [...], "names": {...}, "corrupt": path,
    "missing": path}`` where ``clips`` holds only the readable utterances.
    """
    lines, clips, bad, seed = [], {}, {}, 0
    splits = list(SPLIT_CODES)
    for speaker, (*_, videos) in SPEAKERS.items():
        k = 0
        for video in videos:
            for utt in range(1, 3):
                rel = f"{speaker}/{video}/{utt:05d}.wav"
                split = splits[k % 3]
                write_clip(root / "wav" / rel, seconds=0.5 + 0.1 * utt, seed=seed)
                lines.append(f"{SPLIT_CODES[split]} {rel}")
                clips[f"{speaker}-{video}-{utt:05d}"] = (split, speaker)
                k, seed = k + 1, seed + 1
    if corrupt:
        rel = "id10001/1zcIwhmdeo4/00098.wav"
        bad["corrupt"] = write_garbage(root / "wav" / rel)
        lines.append(f"1 {rel}")
    if missing:
        rel = "id10002/-5TWw2pDbBk/00099.wav"
        bad["missing"] = root / "wav" / rel
        lines.append(f"3 {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    if meta:
        rows = ["VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet"]
        rows += ["\t".join((spk, *info[:4])) for spk, info in SPEAKERS.items()]
        rows.append("\t".join(EXTRA_META))
        (root / "vox1_meta.csv").write_text("\n".join(rows) + "\n")
    names = {spk: info[0] for spk, info in SPEAKERS.items()} if meta else {}
    return {"clips": clips, "classes": sorted(SPEAKERS), "names": names, **bad}
