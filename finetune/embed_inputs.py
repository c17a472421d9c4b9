"""What ``finetune/embed.py`` embeds: the clips of audio files, folders and Lhotse manifests, each with its id and
source, opened (and, up to :data:`WHOLE_SECONDS`, decoded) ahead by threads."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from common.data.audio_file import AUDIO_SUFFIXES, AudioFile, AudioReadError, Samples, audio_suffixes, folder_audio
from common.data.decode import BadClip, load_clip, source_path
from common.data.manifests import count_clips, manifest_problem, open_cuts

__all__ = ["Clip", "MANIFEST_SUFFIXES", "WHOLE_SECONDS", "clip_key", "list_clips", "prefetch"]

MANIFEST_SUFFIXES = (".jsonl", ".jsonl.gz")
WHOLE_SECONDS = 120.0  # a clip up to this long is decoded whole by a prefetch thread; a longer one window by window


@dataclass(frozen=True)
class Clip:
    """One clip to embed: its id, the file it is read from (an audio file's absolute path), how
    (``open(sample_rate, channels)`` -> an :class:`~common.data.audio_file.AudioFile` or
    :class:`~common.data.audio_file.Samples`; ``channels`` ``first`` or ``mean`` of a multi-channel file), and what
    makes it the same clip in another run (:func:`clip_key`)."""

    clip_id: str
    source: str
    open: Callable[[int, str], AudioFile | Samples]
    key: tuple[str, str]


def clip_key(clip_id: str, source: str) -> tuple[str, str]:
    """What makes an index row's clip the same clip in another run: a manifest's cut is known by its id (cuts of one
    file are different clips), an audio file by its absolute path. A file's row holds the path as given and the
    absolute path (in folders written before, the path as given twice: relative to the folder that run started in),
    so the same file given from another folder or spelled otherwise (``./a.wav``, ``dir/../a.wav``) is one clip."""
    if clip_id == source or (os.path.isabs(source) and _ends_with(source, clip_id)):
        return "file", os.path.normpath(os.path.abspath(source))
    return "cut", clip_id


def _ends_with(path: str, given: str) -> bool:
    """Whether absolute ``path`` is what ``given`` (absolute, or relative to some folder) names."""
    given = os.path.normpath(given)
    if os.path.isabs(given):
        return path == given
    parts = given.split(os.sep)
    while parts and parts[0] == os.pardir:  # ../a.wav: a file named a.wav in the folder above some folder
        parts.pop(0)
    return bool(parts) and path.endswith(os.sep + os.sep.join(parts))


def _file_clip(path: Path) -> Clip:
    source = os.path.normpath(os.path.abspath(path))
    return Clip(str(path), source, lambda rate, channels="first": AudioFile(path, rate, channels),
                ("file", source))


def _cut_clip(cut) -> Clip:
    def load(rate: int, channels: str = "first") -> Samples:
        try:
            return Samples(load_clip(cut, rate, channels), rate)
        except BadClip as err:
            raise AudioReadError(str(err)) from None

    return Clip(cut.id, source_path(cut), load, ("cut", cut.id))


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
            files = folder_audio(path)
            if not files:
                raise FileNotFoundError(f"--inputs: folder {path} holds no audio files ({audio_suffixes()})")
            total = None if total is None else total + len(files)
            plan.append(("folder", path, files))
        else:  # a file, even a missing one: it is listed as unreadable, the others are embedded
            if not path.exists() and (str(item).endswith(("/", os.sep)) or path.suffix.lower() not in AUDIO_SUFFIXES):
                raise FileNotFoundError(f"--inputs {item}: no such file or folder")  # a folder, by its name
            total = None if total is None else total + 1
            plan.append(("file", path, [path]))

    def clips() -> Iterator[Clip]:
        for kind, path, files in plan:
            if kind == "manifest":
                cuts, read = iter(open_cuts([str(path)])), 0
                while True:
                    try:
                        cut = next(cuts)
                    except StopIteration:
                        break
                    except (ValueError, KeyError, TypeError, AttributeError) as err:  # a line of no clip
                        raise ValueError(f"--inputs {path}: the entry after clip {read} is not a clip "
                                         f"({type(err).__name__}: {str(err)[:200]}); prepare the manifest "
                                         f"again") from None
                    read += 1
                    yield _cut_clip(cut)
            else:
                for file in files:
                    yield _file_clip(file)

    return clips(), total


def prefetch(clips: Iterable[Clip], rate: int, workers: int,
             channels: str = "first") -> Iterator[tuple[Clip, AudioFile | Samples | str]]:
    """``(clip, its audio or the reason it cannot be read)`` in order, opened by ``workers`` threads; a clip of up
    to :data:`WHOLE_SECONDS` is decoded there too, a longer file is read a window at a time by whoever embeds it."""
    def read(clip: Clip) -> AudioFile | Samples | str:
        try:
            audio = clip.open(rate, channels)
            if audio.streamed and audio.num_samples <= WHOLE_SECONDS * rate:
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
