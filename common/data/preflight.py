"""What a run needs on disk, checked before any compute: manifests, normalisation statistics, class lists.

A recipe's values are checked when it loads (the dataclasses' ``__post_init__``); the files it names
are checked here, right after loading and before a model, an engine or a run directory is made, so that
a missing validation manifest is not found 4000 steps into a run. The checks are cheap enough for
AudioSet-2M: a manifest is opened and its first cut read (no audio is decoded), a statistics file or a
class list is parsed. Every error is a :class:`common.config.recipe.RecipeError` whose message starts with the
recipe key that names the file.

Audio files themselves are not opened here: a clip that cannot be decoded is skipped and counted at
training time (``common.data.bad_audio.BadAudioTracker``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

from lhotse import CutSet

from common.audio.fbank import NORM_STATS, resolve_norm_stats
from common.config.recipe import RecipeError
from common.data.corpora.base import read_classes
from common.data.decode import refused_source
from common.data.manifest_lines import CUT_SHORT, manifest_path, open_lines, truncated_manifest
from common.data.manifests import epoch_clips, manifest_problem
from common.data.shar_stream import folder_shards

__all__ = ["check_manifest", "check_norm", "norm_mismatch", "check_classes", "check_labels", "data_checks",
           "check_data", "problems", "count_clips"]

_PREPARE_HINT = "write it with `python -m common.data.corpora prepare NAME --out DIR` (see `python -m common.data.corpora list`)"


def check_manifest(path: str | os.PathLike, key: str) -> None:
    """A Lhotse manifest (``*.jsonl.gz`` CutSet or Shar folder) exists and its first cut can be read.

    Args:
        path: the manifest.
        key: the recipe key that names it (``data.valid.0``), the start of any error message.

    Raises:
        RecipeError: missing, empty, or not a readable manifest.
    """
    path = manifest_path(path)
    if path.is_dir():
        try:
            cuts = Path(folder_shards(path)[0]["cuts"])  # no cuts shard, or files that do not pair up: said
        except (FileNotFoundError, ValueError) as err:
            raise RecipeError(f"{key}: {err}") from None
        try:
            with open_lines(cuts) as handle:
                first = handle.readline()
            if not first.strip():
                raise RecipeError(f"{key}: Shar folder {path} holds no clips ({cuts.name} is empty)")
            if "id" not in json.loads(first):
                raise ValueError("the first line is not a cut")
        except RecipeError:
            raise
        except (OSError, EOFError, ValueError, UnicodeDecodeError) as err:
            raise RecipeError(f"{key}: {cuts} is not a readable Lhotse Shar shard ({err})") from None
        return
    if not path.exists():
        raise RecipeError(f"{key}: manifest {path} does not exist; {_PREPARE_HINT}")
    if not os.access(path, os.R_OK):
        raise RecipeError(f"{key}: manifest {path} is not readable (permissions)")


    problem = manifest_problem(path)
    if problem:
        raise RecipeError(f"{key}: manifest {path}: {problem}")
    try:
        cuts = CutSet.from_file(path)  # lazy for .jsonl(.gz): reads one line below; None for an empty file
        first = next(iter(cuts), None) if cuts is not None else None
    except Exception as err:  # noqa: BLE001 - gzip, JSON and Lhotse errors all mean "not a manifest"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"{key}: {path} is not a readable Lhotse manifest ({detail[:200]})") from None
    if first is None:
        raise RecipeError(f"{key}: manifest {path} holds no clips")
    refused = refused_source(first)
    if refused:
        raise RecipeError(f"{key}: manifest {path}: clip {first.id}: {refused}")


def check_norm(spec: str, key: str) -> None:
    """Normalisation statistics resolve: a known name, or a stats JSON file with a finite mean and std.

    Raises:
        RecipeError: unknown name, missing file, or a file without usable ``mean`` / ``std``.
    """
    try:
        resolve_norm_stats(spec)
    except (OSError, ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise RecipeError(f"{key}: {err}") from None


def norm_mismatch(spec: str, target_frames: int, num_mel_bins: int | None, key: str) -> str | None:
    """A warning when a statistics file (``python -m common.data.corpora stats``) was computed for another clip
    length or number of mel bins than the run's: zero padding to another length moves the mean and the std.
    It may be intended (statistics of another corpus), so it is a warning, not an error.

    Args:
        spec: the recipe's statistics (a name of ``common.audio.fbank.NORM_STATS`` or a file).
        target_frames, num_mel_bins: the run's clip length in frames and mel bins (None: not checked).
        key: the recipe key that names the statistics.

    Returns:
        The warning, or None (a named set, a file without those fields, or one :func:`check_norm` rejects).
    """
    if not isinstance(spec, str) or spec in NORM_STATS:
        return None
    path = manifest_path(spec)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    frames, mels = data.get("target_frames"), data.get("num_mel_bins")
    differ = []
    if isinstance(frames, int) and frames != target_frames:
        differ.append(f"{frames} frames per clip, this run cuts / pads clips to {target_frames}")
    if isinstance(mels, int) and num_mel_bins is not None and mels != num_mel_bins:
        differ.append(f"{mels} mel bins, this run uses {num_mel_bins}")
    if not differ:
        return None
    manifest = data.get("manifest") or "MANIFEST"
    options = f"--target-frames {target_frames}" + (f" --num-mel-bins {num_mel_bins}" if len(differ) > 1 or
                                                     not isinstance(frames, int) or frames == target_frames else "")
    return (f"{key}: {path} was computed at {' and '.join(differ)}; statistics of other clips are not this "
            f"run's (zero padding moves the mean and the std): recompute them with "
            f"`python -m common.data.corpora stats {manifest} {options}`")


def check_classes(path: str | os.PathLike, key: str) -> None:
    """A class list written by the corpus preparation exists and holds unique class ids.

    Raises:
        RecipeError: missing or malformed.
    """
    try:
        read_classes(manifest_path(path))
    except (OSError, ValueError, AttributeError) as err:
        raise RecipeError(f"{key}: {err}") from None


_LABELS = re.compile(rb'"labels":\s*(\[[^\]]*\])')


def check_labels(path: str | os.PathLike, key: str, classes: str | os.PathLike | Sequence[str] | None = None,
                 single_label: bool = True) -> None:
    """The clips' labels of a ``.jsonl(.gz)`` manifest, before any compute: every clip has one, and only one, where
    a single-label task needs it (accuracy counts an unlabeled clip as class 0; cross-entropy learns nothing
    from it, and counts each of several labels as a whole target), and every label is in the class list ``classes`` (its file, or the classes themselves; a clip with
    another would stop the run when its batch is drawn). Only each line's label list is parsed (about a second
    per 100,000 clips); Shar folders, missing files and an unreadable class list are left to the other checks. A
    manifest where no clip has a label (the pool split of unlabeled audio) is refused by any task.

    Raises:
        RecipeError: naming the key, how many clips fail and the first of them.
    """
    path = manifest_path(path)
    if not path.is_file() or not path.name.endswith((".jsonl", ".jsonl.gz")) or manifest_problem(path):
        return
    known, named = None, classes  # the labels allowed, and how the message names where they come from
    if isinstance(classes, (list, tuple, set)):
        known, named = set(classes), "of the model"
    elif classes is not None:
        try:
            known = set(read_classes(manifest_path(classes))[0])
        except (OSError, ValueError, AttributeError):
            known = None  # check_classes says why
    unlabeled, unknown, several, clips = [0, None], [0, None, None], [0, None, None], 0
    try:
        with open_lines(path) as handle:
            for number, line in enumerate(handle, 1):
                entry = line.strip()
                if not entry:
                    continue
                if not (entry.startswith(b"{") and entry.endswith(b"}")):  # a clip's entry is a JSON object
                    raise RecipeError(f"{key}: {path}: line {number} is not a clip's entry (a JSON object): "
                                      f"{entry[:60].decode('utf-8', 'replace')!r}; prepare the manifest again")
                clips += 1
                found = _LABELS.search(line)
                try:
                    labels = json.loads(found.group(1)) if found else []
                except ValueError:  # a label holding "]": the whole line
                    labels = _parsed(line).get("custom", {}).get("labels", [])
                if not labels:  # refused by a single-label task; a multi-label one, where every clip is so
                    unlabeled[0] += 1
                    unlabeled[1] = unlabeled[1] or _clip_id(line)
                if single_label and len(set(labels)) > 1:
                    several[0] += 1
                    if several[1] is None:
                        several[1], several[2] = _clip_id(line), labels
                strange = [label for label in labels if known is not None and label not in known]
                if strange:
                    unknown[0] += 1
                    if unknown[1] is None:
                        unknown[1], unknown[2] = _clip_id(line), strange[0]
    except CUT_SHORT as err:  # cut short past its first lines (check_manifest's)
        raise RecipeError(f"{key}: {truncated_manifest(path, err)}") from None
    except OSError:
        return  # not a readable manifest: check_manifest says why
    if unlabeled[0] and unlabeled[0] == clips:
        raise RecipeError(f"{key}: {path} is a manifest of unlabeled audio (none of its {clips} clip(s) has a label: "
                          f"the pool split, for pretraining); give a labelled split (train, valid, test)")
    if unlabeled[0] and single_label:
        raise RecipeError(f"{key}: {unlabeled[0]} clip(s) of {path} have no label (e.g. {unlabeled[1]}); a "
                          f"single-label task (metric acc or loss ce) needs one label per clip: give them their label, "
                          f"or prepare them as unlabeled audio (--unlabeled, the pool split, for pretraining)")
    if several[0]:
        raise RecipeError(f"{key}: {several[0]} clip(s) of {path} have several labels (e.g. clip {several[1]}: "
                          f"{', '.join(map(repr, several[2]))}); a single-label task (metric acc or loss ce) needs one "
                          f"label per clip (cross-entropy would count each label as a whole target): give each clip "
                          f"one, or train the task as multi-label (task.loss: bce, task.metric: map)")
    if unknown[0]:
        raise RecipeError(f"{key}: {unknown[0]} clip(s) of {path} have labels that are not in the class list "
                          f"{named} (e.g. clip {unknown[1]}: {unknown[2]!r}); prepare the manifest and its class "
                          f"list together")


def _parsed(line: bytes) -> dict:
    try:
        data = json.loads(line)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _clip_id(line: bytes) -> str:
    return str(_parsed(line).get("id", "?"))


def data_checks(data, prefix: str = "data") -> list[Callable[[], None]]:
    """One check per training and validation manifest of a :class:`common.data.config.DataConfig`."""
    keyed = [(spec.path, f"{prefix}.train.{i}.path") for i, spec in enumerate(data.train)]
    keyed += [(path, f"{prefix}.valid.{i}") for i, path in enumerate(data.valid)]
    return [lambda path=path, key=key: check_manifest(path, key) for path, key in keyed]


def check_data(data, prefix: str = "data") -> None:
    """Every training and validation manifest of a :class:`common.data.config.DataConfig`.

    Raises:
        RecipeError: naming ``data.train.N.path`` or ``data.valid.N``.
    """
    for check in data_checks(data, prefix):
        check()


def problems(checks: Iterable[Callable[[], None]]) -> list[str]:
    """Run every check; the messages of those that failed (for ``--dry-run``, which plans without data)."""
    found = []
    for check in checks:
        try:
            check()
        except RecipeError as err:
            found.append(str(err))
    return found


def count_clips(paths: Sequence[str | os.PathLike]) -> int:
    """Clips in manifests, counted from their lines (no cut is parsed; a few seconds per million clips), a Shar
    folder's from its shards (``common.data.manifests.epoch_clips``); another format is read."""
    total = 0
    for path in map(manifest_path, paths):
        lines = epoch_clips(path)
        if lines is None and not path.is_dir():
            lines = len(CutSet.from_file(path))
        total += lines or 0
    return total
