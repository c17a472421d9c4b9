"""Miniature LibriSpeech: <part>/<speaker>/<chapter>/<spk>-<chapter>-<utt>.flac + <spk>-<chapter>.trans.txt."""

from __future__ import annotations

from pathlib import Path

from tests.layouts import write_clip, write_garbage

# part -> [(speaker, chapter)]
CHAPTERS = {
    "train-clean-100": [("103", "1240"), ("1034", "121119")],
    "train-other-500": [("20", "205")],
    "dev-clean": [("84", "121123")],
}
WORDS = ["CHAPTER ONE", "THE TIME MACHINE", "IT WAS A BRIGHT COLD DAY", "AND SO ON"]


def build(root: Path, utts_per_chapter: int = 2, corrupt: bool = True, missing: bool = True) -> dict:
    """Write the parts of ``CHAPTERS``; the corrupt and missing utterances are in train-clean-100's first chapter.

    Returns ``{"clips": {utt id: (part, speaker, chapter, text)}, "parts": [...], "corrupt": path,
    "missing": path}`` where ``clips`` holds only the readable utterances.
    """
    clips, bad, seed = {}, {}, 0
    for part, chapters in CHAPTERS.items():
        for speaker, chapter in chapters:
            folder = root / part / speaker / chapter
            lines = []
            for k in range(utts_per_chapter):
                utt, text = f"{speaker}-{chapter}-{k:04d}", WORDS[seed % len(WORDS)]
                write_clip(folder / f"{utt}.flac", seconds=0.5 + 0.1 * k, seed=seed)
                clips[utt] = (part, speaker, chapter, text)
                lines.append(f"{utt} {text}")
                seed += 1
            if (speaker, chapter) == CHAPTERS["train-clean-100"][0]:
                if corrupt:
                    utt = f"{speaker}-{chapter}-0098"
                    bad["corrupt"] = write_garbage(folder / f"{utt}.flac")
                    lines.append(f"{utt} A DAMAGED DOWNLOAD")
                if missing:
                    utt = f"{speaker}-{chapter}-0099"
                    bad["missing"] = folder / f"{utt}.flac"
                    lines.append(f"{utt} NEVER EXTRACTED")
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return {"clips": clips, "parts": list(CHAPTERS), **bad}
