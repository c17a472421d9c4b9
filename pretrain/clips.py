"""How the corpus's clips meet the model's input length, for the ``--dry-run`` plan.

Every training clip is cut or filled to the model's input (``audio.target_frames``): a longer clip is cut
(``data.train_crop``), a shorter one zero-padded (``data.pad: zeros``, SSAST's) or repeated (``data.pad:
repeat``). A corpus of 1-2 s clips under SSAST's 10.24 s input is mostly padding, whose patches the masked
objectives then learn to predict. The plan reads the durations of the first clips of each training
manifest (their ``duration`` fields; no audio is decoded), says what happens to them, and, when the typical
clip fills less than half of the zero-padded input with audio, names the settings that fit it: ``audio.target_frames``
(the shortest input this recipe's phases accept that holds the median clip) or ``data.pad=repeat``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import replace
from pathlib import Path

from common.data.manifest_lines import open_lines

__all__ = ["first_durations", "clip_lines", "fitting_frames"]

SAMPLED = 1000  # clips read per manifest: the first ones (a plan reads no more than that)


def first_durations(path: str | os.PathLike, limit: int = SAMPLED) -> list[float]:
    """Durations (seconds) of the first ``limit`` clips of a Lhotse manifest (``.jsonl(.gz)`` or a Shar
    folder); empty where the manifest is missing or records none."""
    path = Path(os.path.expandvars(os.path.expanduser(str(path))))
    files = sorted(path.glob("cuts.*.jsonl*")) if path.is_dir() else [path]
    out: list[float] = []
    for file in files:
        if not file.is_file() or not file.name.endswith((".jsonl", ".jsonl.gz")):
            continue
        try:
            with open_lines(file) as handle:
                for line in handle:
                    if len(out) >= limit:
                        return out
                    if line.strip():
                        duration = json.loads(line).get("duration")
                        if isinstance(duration, (int, float)) and duration > 0:
                            out.append(float(duration))
        except (OSError, EOFError, ValueError, UnicodeDecodeError):
            return out
    return out


def fitting_frames(recipe, seconds: float) -> int | None:
    """The fewest input frames (a multiple of the patch width) that hold ``seconds`` of audio and that every
    phase of ``recipe`` (a :class:`pretrain.recipe.PretrainRecipe`) accepts, or None."""
    audio = recipe.audio
    need = max(1, math.ceil((seconds * 1000 - audio.frame_length_ms) / audio.frame_shift_ms) + 1)
    step = recipe.base.tshape
    start = math.ceil(need / step) * step
    for frames in range(start, start + 64 * step, step):
        try:
            replace(recipe, audio=replace(audio, target_frames=frames))  # validates every phase's geometry
        except ValueError:
            continue
        return frames
    return None


def clip_lines(recipe) -> list[str]:
    """The plan's lines about clip lengths: the input, what happens to shorter and longer clips, and, for
    each training manifest whose typical clip is under half the input, a warning naming the settings."""
    audio, data = recipe.audio, recipe.data
    model_s = audio.clip_samples / audio.sample_rate
    lines = [f"clips: the model's input is {model_s:.2f} s (audio.target_frames {audio.target_frames}); shorter "
             f"clips are {'zero-padded' if data.pad == 'zeros' else 'repeated'} to it (data.pad: {data.pad}), longer "
             f"ones cut ({'from the start' if data.train_crop == 'start' else 'at random'}: data.train_crop: "
             f"{data.train_crop})"]
    for i, spec in enumerate(data.train):
        durations = first_durations(spec.path)
        if not durations:
            continue
        median = statistics.median(durations)
        lines.append(f"clips: data.train.{i} ({Path(spec.path).name}): {min(durations):.2f}-{max(durations):.2f} s, "
                     f"median {median:.2f} s (first {len(durations)} clips); the median clip fills "
                     f"{min(1.0, median / model_s):.0%} of the input")
        if median < model_s / 2 and data.pad == "zeros":
            frames = fitting_frames(recipe, median)
            fit = f"--set audio.target_frames={frames} (holds the median clip), or " if frames else ""
            lines.append(f"warning: data.train.{i}: most of each input is padding, which the masked patches "
                         f"then learn to predict; fit the input to the clips with {fit}--set data.pad=repeat "
                         f"(an --init's positional embedding is fitted to the input either way)")
    return lines
