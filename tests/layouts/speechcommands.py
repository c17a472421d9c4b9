"""Miniature Speech Commands v2: <word>/<speaker>_nohash_<n>.wav, _background_noise_/, the two split lists."""

from __future__ import annotations

from pathlib import Path

from tests.layouts import write_clip, write_garbage

WORDS = ["backward", "right", "yes"]  # 3 of the 35 folders
SPEAKERS = ["0a7c2a8d", "bb05582b", "c1d39ce8", "ffd2ba2f"]


def build(root: Path, corrupt: bool = True, missing: bool = True) -> dict:
    """Per word: the first speaker's clip is listed for validation, the second for testing, the rest train.

    Returns ``{"clips": {cut id: (split, word)}, "classes": [...], "corrupt": path, "missing": path}``
    where ``clips`` holds only the readable clips.
    """
    clips, lists, bad, seed = {}, {"valid": [], "test": []}, {}, 0
    for word in WORDS:
        for k, speaker in enumerate(SPEAKERS):
            name = f"{speaker}_nohash_{k % 2}"
            write_clip(root / word / f"{name}.wav", seconds=0.5, seed=seed)
            split = {0: "valid", 1: "test"}.get(k, "train")
            if split != "train":
                lists[split].append(f"{word}/{name}.wav")
            clips[f"{word}_{name}"] = (split, word)
            seed += 1
    write_clip(root / "_background_noise_" / "white_noise.wav", seconds=1.0, seed=seed)
    (root / "LICENSE").write_text("Creative Commons BY 4.0\n")
    if corrupt:
        bad["corrupt"] = write_garbage(root / "right" / "deadbeef_nohash_0.wav")  # a train clip
    if missing:
        bad["missing"] = root / "yes" / "0123abcd_nohash_1.wav"
        lists["test"].append("yes/0123abcd_nohash_1.wav")
    (root / "validation_list.txt").write_text("\n".join(lists["valid"]) + "\n")
    (root / "testing_list.txt").write_text("\n".join(lists["test"]) + "\n")
    return {"clips": clips, "classes": sorted(WORDS), **bad}
