"""Linear probing: a frozen encoder's features + scikit-learn logistic regression.

    python finetune/linear_probe.py --init runs/pretrain/ssast_fshift4 --task esc50
    python finetune/linear_probe.py --init MODEL --task esc50 speechcommands voxceleb     # one table
    python finetune/linear_probe.py --init MODEL --recipe recipes/linear_probe.yaml

Features: the tokens of one block (default: the last, after the final norm), mean-pooled over the patch
tokens or the prefix tokens (default: as the init's code pools, ``common.phases.init.init_pool``), for every
clip at full resolution, read as the model was validated in training (an export's ``clips`` record: a short clip
zero-padded or repeated, a long one cut from its start or centre, ``finetune.inference.clip_handling``), computed
by ``finetune.embedder.Embedder`` as ``finetune/embed.py`` computes its clip embeddings. They are cached per
(checkpoint, task split, layer, pooling) in ``cache_dir``, so probing again with another ``C`` is instant; nothing
evicts the files, and a temporary that a probe killed while writing left is removed by a later probe after an hour.
The classifier is a standardised logistic regression (one-vs-rest for multi-label tasks); the task's metric is
computed on its test split (the evaluation split if it has none; ESC-50: the mean over its five folds).

``C`` (the inverse regularisation) is one number, or a grid to choose from without looking at the split that is
scored (:func:`choose_C`): on the validation split where the task has one besides its test split (SpeechCommands,
VoxCeleb), else by 5-fold cross-validation on the training split (VGGSound, AudioSet, whose validation split is the
one scored), and for ESC-50 within each fold, over the other four training folds. Choosing ``C`` from the printed
test numbers of several probes would select it on the test split.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np

from common.system.prog import DEVICE_HELP, prog, whole_number

if TYPE_CHECKING:
    import torch

# Imports the command alone needs are inside its functions: --help answers without loading torch.

log = logging.getLogger("linear_probe")

# a temporary of the feature cache that nothing has written for this long is a killed probe's (a probe writing its
# features, whatever their size, writes all the time; one still computing them has written nothing yet)
STALE_SECONDS = 3600

__all__ = ["ProbeRecipe", "check_tasks", "choose_C", "extract_features", "fit_and_score", "probe_task", "main"]


@dataclass(frozen=True)
class ProbeRecipe:
    """A probe suite: the tasks and how features are taken and classified.

    Args:
        tasks: task names (or task YAML files).
        layer: block whose tokens are the features (1-based, negative from the end: -1 is the last block, before
            the final norm); ``final`` or null: every block and the final norm.
        pool: ``mean`` over patch tokens, over ``prefix`` tokens, or ``auto``: as the init's code pools.
        C: inverse L2 regularisation of the logistic regression: one number, or a list to choose from on data
            other than the scored split (:func:`choose_C`).
        batch_size: clips per forward pass of the feature extraction.
        num_workers: decoding processes of the feature extraction (0: in the probe's own process).
        data_root: folder the tasks' manifests are under.
        cache_dir: where features are cached (relative to the working folder; one file per model and split, never
            evicted: docs/finetuning.md says what it holds and how to clear it).
        max_bad_fraction: the probe stops when more than this share of a split's clips is bad audio (skipped:
            missing, unreadable, ...), as training's ``data.max_bad_fraction`` (the same default) stops a run.
    """

    tasks: list[str] = field(default_factory=list)
    layer: int | None = None
    pool: Literal["auto", "mean", "prefix"] = "auto"
    C: float | list[float] = 1.0
    batch_size: int = 32
    num_workers: int = 2
    data_root: str = "data"
    cache_dir: str = "runs/probe_cache"
    max_bad_fraction: float = 0.02

    def __post_init__(self) -> None:
        grid = self.C if isinstance(self.C, list) else [self.C]
        if not grid or not all(math.isfinite(c) and c > 0 for c in grid):
            raise ValueError(f"C: the inverse regularisation must be a finite number above 0, or a list of them, "
                             f"got {self.C}")
        if len(set(grid)) != len(grid):
            raise ValueError(f"C: a value is listed twice in {self.C}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be 1 or more, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be 0 (decode in this process) or more, got {self.num_workers}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction: must be a share in [0, 1], got {self.max_bad_fraction}")

    @property
    def grid(self) -> list[float]:
        """The values of ``C`` to choose from, smallest (the strongest regularisation) first."""
        return sorted(self.C) if isinstance(self.C, list) else [self.C]


def _read_cached(path: Path, clips: Callable[[], int | None] = lambda: None
                 ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None:
    """The features, targets and skipped clips (``(path, reason)``) a probe cached in ``path``, or None (with a
    warning naming the file) where it is not such a cache (cut short, another file, arrays that do not go together,
    a cache written before the skipped clips were kept with the features that lacks some of the split's clips,
    counted by ``clips()`` only for such a cache: which were skipped, and why, is not known): they are computed
    again. Such an older cache with a row for each clip skipped none, and is read."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
            if "skipped" in data:
                skipped = data["skipped"]
            elif (counted := clips()) is not None and len(x) == counted:  # an older version's, of every clip
                skipped = _skipped_array([])
            else:
                raise ValueError(f"written by an older version, without the list of the clips it skipped as bad "
                                 f"audio, and with {len(x)} feature rows for {counted if counted is not None else '?'} "
                                 f"clips")
        if x.ndim != 2 or y.ndim not in (1, 2) or len(x) != len(y) or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"x {x.shape} {x.dtype} and y {y.shape} are not one feature row per clip")
        if skipped.ndim != 2 or skipped.shape[1] != 2:
            raise ValueError(f"skipped {skipped.shape} is not one (path, reason) row per skipped clip")
    except Exception as err:  # noqa: BLE001 - any unreadable cache is computed again, never trusted
        log.warning("feature cache %s is unusable (%s: %s); computing the features again", path,
                    type(err).__name__, err)
        return None
    return x, y, [(str(a), str(b)) for a, b in skipped]


def _split_clips(manifests: Sequence[str]) -> int | None:
    """The clips of a split's manifests, counted from their lines (None where one cannot be counted so)."""
    from common.data.manifests import count_clips

    counts = [count_clips(m) for m in manifests]
    return None if None in counts else sum(counts)


def _skipped_array(skipped: Sequence[tuple[str, str]]) -> np.ndarray:
    """The skipped clips as the cache stores them: strings ``[n, 2]`` (no pickle)."""
    return np.array([list(row) for row in skipped], dtype=str).reshape(len(skipped), 2)


def _said_again(tracker, clips: int, skipped: Sequence[tuple[str, str]]) -> None:
    """Count cached features' clips in ``tracker`` as their extraction did: ``clips`` used and the ``skipped``
    ones (each named again, with its reason of then), and judge the split with the tracker's limit."""
    import torch

    from common.data.clips import Batch

    tracker.update(Batch(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), None, [""] * clips, bad=list(skipped)))
    tracker.check()


def _cache_key(ckpt: str, manifests: Sequence[str], cfg, layer, pool, front_end: str = "",
               classes: Sequence[str] = ()) -> str:
    """The features' identity: the model file, its config, layer and pooling, the front end (the statistics the
    features were normalised with, the sample rate and frames), the class list (the targets) and the manifests."""
    from common.models.exports import resolve_model_file
    from common.models.hf import is_hf_directory

    files = sorted(p for p in Path(ckpt).iterdir() if p.is_file()) if is_hf_directory(ckpt) \
        else [resolve_model_file(ckpt)]
    parts = [str(x) for f in files for x in (f.resolve(), f.stat().st_mtime_ns)] + [str(cfg.to_dict()), str(layer),
                                                                                    pool, front_end, repr(list(classes))]
    parts += [f"{Path(m).resolve()}:{Path(m).stat().st_mtime_ns if Path(m).exists() else 0}" for m in manifests]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def extract_features(encoder, arch, manifests: Sequence[str], classes: Sequence[str], layer: int | None = None,
                     pool: str = "mean", batch_size: int = 32, num_workers: int = 2,
                     device: str | torch.device = "cpu", channels: str = "first", pad: str = "zeros",
                     crop: str = "start", tracker=None, skipped: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(features [clips, D], targets [clips, classes])`` of a frozen full-resolution encoder over
    ``manifests``: each clip's first window, embedded by :class:`finetune.embedder.Embedder` (the code
    ``finetune/embed.py`` writes embeddings with) around ``encoder`` and the front end of ``arch``
    (``common.models.arch``); ``channels`` (how a multi-channel file is read), ``pad`` (how a short clip is
    filled) and ``crop`` (where a long one is cut) as the encoder was validated in training
    (``finetune.inference.clip_handling``). Bad audio is skipped, counted and judged by ``tracker`` (a
    :class:`~common.data.bad_audio.BadAudioTracker` of the split; None: counted without a limit) and each
    skipped clip's ``(path, reason)`` appended to ``skipped``."""
    from common.data.loader import eval_loader
    from common.system.logger import progress
    from finetune.embedder import Embedder

    embedder = Embedder.from_arch(encoder, arch, layer=layer, pool=pool, device=device, pad=pad)
    loader = eval_loader(manifests, classes, arch.clip_samples, arch.sample_rate, batch_size, num_workers,
                         channels=channels, pad=pad, crop=crop, tracker=tracker)
    feats, targets = [], []
    bar = progress(_split_clips(manifests), 0, f"features of {Path(manifests[0]).name}"
                   + (f" (+{len(manifests) - 1})" if len(manifests) > 1 else ""), True, unit="clip")
    with bar:
        for batch in loader.batches(epochs=1):
            bar.update(len(batch) + len(batch.bad))
            if skipped is not None:
                skipped.extend(batch.bad)
            if not len(batch):
                continue
            feats.append(embedder.embed(batch.waveforms, batch.lengths).clip)
            targets.append(batch.targets.numpy().copy())  # a view would keep the batch (its shared memory)
    if not feats:
        raise ValueError(f"no usable clip in {', '.join(map(str, manifests))}")
    return np.concatenate(feats), np.concatenate(targets)


def fit_and_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, metric: str,
                  multilabel: bool, C: float = 1.0, seed: int = 0) -> float:
    """Train a standardised logistic regression on the training features and score the test features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from common.metrics import accuracy, mean_average_precision

    scores = np.zeros_like(y_test, dtype=np.float64)
    if multilabel:
        present = np.flatnonzero((y_train > 0.5).any(0) & ~(y_train > 0.5).all(0))  # classes with both outcomes
        if present.size:  # (none: every class scores 0)
            clf = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=C, max_iter=2000,
                                                                                         random_state=seed)))
            clf.fit(x_train, (y_train[:, present] > 0.5).astype(int))
            proba = clf.predict_proba(x_test)
            # one such class: scikit-learn takes its one column as a binary target and gives both outcomes' columns
            scores[:, present] = proba[:, 1:] if present.size == 1 and proba.shape[1] == 2 else proba
    else:
        labels = y_train.argmax(1)
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
        clf.fit(x_train, labels)
        scores[:, clf.classes_] = clf.predict_proba(x_test)  # classes absent from training score 0
    return mean_average_precision(y_test, scores) if metric == "mAP" else accuracy(y_test, scores)


def choose_C(grid: Sequence[float], x: np.ndarray, y: np.ndarray, metric: str, multilabel: bool,
             valid: tuple[np.ndarray, np.ndarray] | None = None, groups: np.ndarray | None = None,
             seed: int = 0) -> tuple[float, dict[float, float], str | None]:
    """The ``C`` of ``grid`` whose probe scores best without the scored split: ``(C, {C: selection score}, what it
    was chosen on)``; one value is taken as given (``({}, None)``).

    Chosen on ``valid`` (features and targets) where given; else over ``groups`` (each training row's fold: each
    held out in turn, the others trained on); else by 5-fold cross-validation of ``x`` (shuffled with ``seed``;
    stratified by class for a single-label task, fewer folds where a class has fewer than 5 clips). Ties, and grids
    where no score is defined, go to the smallest ``C``. A grid of k values costs k fits per fold besides the
    final one (about 5k + 1 fits where it is chosen by cross-validation), each on a copy of that fold's features."""
    if len(grid) == 1:
        return grid[0], {}, None
    if valid is not None:
        splits, on = [(x, y, *valid)], "the validation split"
    elif groups is not None:
        splits = [(x[groups != g], y[groups != g], x[groups == g], y[groups == g]) for g in np.unique(groups)]
        on = "the other training folds"
    else:
        from sklearn.model_selection import KFold, StratifiedKFold

        if len(x) < 2:
            raise ValueError(f"{len(x)} training clip: too few to choose C by cross-validation; give one C")
        labels = None if multilabel else y.argmax(1)
        fewest = None if labels is None else int(np.bincount(labels)[np.unique(labels)].min())
        folds = StratifiedKFold(n_splits=min(5, fewest), shuffle=True, random_state=seed).split(x, labels) \
            if fewest is not None and fewest >= 2 else KFold(n_splits=min(5, len(x)), shuffle=True,
                                                             random_state=seed).split(x)
        splits = [(x[a], y[a], x[b], y[b]) for a, b in folds]
        on = f"{len(splits)}-fold cross-validation on the training split"
    scores = {}
    for c in sorted(grid):  # a part that trains on one class alone scores nothing (a single-label fit needs two)
        values = [fit_and_score(*split, metric, multilabel, c, seed)
                  if multilabel or len(np.unique(split[1].argmax(1))) > 1 else float("nan") for split in splits]
        scores[c] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
    best = max(sorted(grid), key=lambda c: -math.inf if math.isnan(scores[c]) else scores[c])  # first of equals
    return best, scores, on


def check_tasks(recipe: ProbeRecipe) -> None:
    """The files every task of the suite reads (class list, manifests, labels, statistics), before any features.

    Raises:
        RecipeError: naming the task and the first problem (the task key and the file).
    """
    from common.config.recipe import RecipeError
    from finetune.recipe import task_checks

    for name in recipe.tasks:
        for check in task_checks(_task(name, recipe)):
            try:
                check()
            except RecipeError as err:
                raise RecipeError(f"task {name}: {err}") from None


def _task(name: str, recipe: ProbeRecipe):
    """Task ``name`` (registered, or a task file) with its manifests under the suite's ``data_root``."""
    from common.config.recipe import build
    from finetune.task_file import task_source
    from finetune.tasks import TaskConfig

    fields, _ = task_source(name)
    return build(TaskConfig, {**fields, "data_root": recipe.data_root}, "task")  # bad values named, not raised


def probe_task(init_path: str, task_name: str, recipe: ProbeRecipe, device: torch.device) -> dict:
    """Probe one task; returns ``{"task", "metric", "value", "folds"?, ...}``."""
    from common.audio.augment import SpecAugmentConfig
    from common.audio.compression import Compression
    from common.audio.pipeline import AudioConfig
    from common.data.corpora.base import read_classes
    from common.models.arch import architecture_for
    from common.models.spec import ModelSpec
    from common.phases.init import load_init, resolve_pool, task_encoder, task_encoder_config

    task = _task(task_name, recipe)
    classes, _ = read_classes(task.path(task.classes))
    init = load_init(init_path)
    cfg = task_encoder_config(init, ModelSpec(arch=init.arch if init is not None else "ast"), 128,
                              task.target_frames, keep_stride=True)  # the encoder as it was trained (as embed)
    encoder = task_encoder(init, cfg)
    pool = resolve_pool(recipe.pool, init, cfg)
    arch = architecture_for(cfg, AudioConfig(num_mel_bins=getattr(cfg, "num_mel_bins", 128),
                                             target_frames=task.target_frames, norm=task.norm))
    if not arch.normalises_input:  # the task's statistics normalise the input
        from common.data.preflight import norm_mismatch

        caution = norm_mismatch(task.norm, task.target_frames, getattr(cfg, "num_mel_bins", None), "task.norm")
        if caution:
            log.warning("%s", caution)
    from common.system.atomic import atomic_path, remove_orphans

    cache = Path(recipe.cache_dir)
    if os.path.isdir(cache):  # a killed probe leaves a temporary as large as its features (GBs); False, not an
        # error, for a folder this user cannot search (another user's home)
        for tmp in remove_orphans(cache, older_than=STALE_SECONDS):
            log.info("removed %s, left by a probe that did not finish writing its features", tmp)
    pipeline = arch.frontend(arch.geometry(Compression()), Compression(), SpecAugmentConfig())
    front_end = f"{getattr(arch, 'audio', None)}|{getattr(pipeline, 'stats', None)}|{arch.clip_samples}"
    from finetune.inference import clip_handling

    clips = clip_handling(init.meta if init is not None else {})  # as the encoder was validated (from scratch: AST's)
    # the features of older caches stay valid where they were read so (AST's defaults)
    front_end += "".join(f"|{key}={clips[key]}" for key, usual in (("channels", "first"), ("pad", "zeros"),
                                                                  ("crop", "start")) if clips[key] != usual)

    from common.data.bad_audio import BadAudioTracker, TooMuchBadAudio

    used: dict[str, int] = {}  # split -> clips whose features were taken
    skipped: dict[str, list[tuple[str, str]]] = {}  # split -> (path, reason) of the clips skipped as bad audio

    def features(manifests: list[str], split: str) -> tuple[np.ndarray, np.ndarray]:
        """The split's features, from the cache or extracted; its bad clips counted (named under ``split``) and
        judged with ``recipe.max_bad_fraction``, the same whether the features are cached or not."""
        path = cache / f"{_cache_key(init_path, manifests, cfg, recipe.layer, pool, front_end, classes)}.npz"
        tracker = BadAudioTracker(recipe.max_bad_fraction, split=split, source=manifests)
        cached = (_read_cached(path, lambda: _split_clips(manifests)) if os.path.isfile(path)  # (counted: older)
                  else None)
        try:
            if cached is not None:
                x, y, bad = cached
                if bad:
                    log.info("%s: %d clip(s) of %s were left out of these cached features as bad audio when they "
                             "were taken", path, len(bad), split)
                _said_again(tracker, len(x), bad)
            else:
                bad = []
                x, y = extract_features(encoder, arch, manifests, classes, recipe.layer, pool, recipe.batch_size,
                                        recipe.num_workers, device, clips["channels"], clips["pad"], clips["crop"],
                                        tracker, bad)
                keep(path, x, y, _skipped_array(bad))
        except TooMuchBadAudio:
            if tracker.bad == tracker.seen:  # none usable: the tracker's message names the manifests
                raise
            raise TooMuchBadAudio(  # the probe's own advice (the tracker's is a training run's)
                f"{task.name}: {tracker.bad} of {tracker.seen} {split} clips ({tracker.bad / tracker.seen:.1%}) are "
                f"bad audio, more than max_bad_fraction={recipe.max_bad_fraction:.1%} ({dict(tracker.reasons)}; "
                f"each named above). Restore the files, or tolerate more with --max-bad-fraction F") from None
        used[split], skipped[split] = used.get(split, 0) + len(x), skipped.get(split, []) + list(bad)
        return x, y

    unwritable: list[str] = []  # why the cache could not be written, once it could not

    def keep(path: Path, x: np.ndarray, y: np.ndarray, listed: np.ndarray) -> None:
        """Write a split's features into the cache; a cache that cannot be written (another user's folder, a full
        disk) is said once and the probe goes on with the features it has (the next probe extracts them again)."""
        from common.system.disk import describe_os_error

        if unwritable:
            return
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_path(path, x.nbytes + y.nbytes + listed.nbytes) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, x=x, y=y, skipped=listed)  # a killed run leaves none
        except OSError as err:
            unwritable.append(describe_os_error(err) or str(err))
            log.warning("feature cache: cannot keep the features in %s (%s); the probe goes on without the cache, "
                        "and the next one extracts them again (--cache-dir names a folder it can write)", cache,
                        unwritable[0])

    def accounts() -> dict:
        """The clips each split used and skipped (``--out``; the table's note)."""
        return {"clips": dict(used), "bad_clips": {k: len(v) for k, v in skipped.items()},
                "skipped": {k: [list(row) for row in v] for k, v in skipped.items() if v}}

    multilabel = task.metric == "mAP"
    grid = recipe.grid
    if task.folds:
        fold_data = [features([task.path(p)], f"fold{k + 1}") for k, p in enumerate(task.folds)]
        values, chosen, selection = [], [], []
        for k in range(len(fold_data)):
            others = [j for j in range(len(fold_data)) if j != k]
            x_tr = np.concatenate([fold_data[j][0] for j in others])
            y_tr = np.concatenate([fold_data[j][1] for j in others])
            groups = np.concatenate([np.full(len(fold_data[j][0]), j) for j in others])
            c, scores, on = choose_C(grid, x_tr, y_tr, task.metric, multilabel, groups=groups)
            values.append(fit_and_score(x_tr, y_tr, *fold_data[k], task.metric, multilabel, c))
            chosen.append(c)
            selection.append(scores)
        return {"task": task.name, "metric": task.metric, "value": float(np.mean(values)), "folds": values,
                "pool": pool, "C": chosen, **({"chosen_on": on, "selection": selection} if on else {}), **accounts()}
    x_tr, y_tr = features([task.path(p) for p in task.train], "train")
    test = task.test or task.valid
    valid = features([task.path(p) for p in task.valid], "valid") \
        if task.test and task.valid and len(grid) > 1 else None
    c, scores, on = choose_C(grid, x_tr, y_tr, task.metric, multilabel, valid=valid)
    x_te, y_te = features([task.path(p) for p in test], "test" if task.test else "valid")
    value = fit_and_score(x_tr, y_tr, x_te, y_te, task.metric, multilabel, c)
    return {"task": task.name, "metric": task.metric, "value": value, "train_clips": len(x_tr),
            "test_clips": len(x_te), "pool": pool, "C": c, **({"chosen_on": on, "selection": scores} if on else {}),
            **accounts()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("finetune/linear_probe.py"),
        description="Linear-probe a frozen encoder on one or several tasks and print one table.",
        epilog="example: python finetune/linear_probe.py --init runs/pretrain/ssast_fshift4 --task esc50 "
               "speechcommands",
    )
    parser.add_argument("--init", required=True,
                        help="a run directory, an export, an SSAST/AST .pth, a Hugging Face AST directory, ...")
    parser.add_argument("--task", nargs="+", default=None, help="task name(s) or task YAML file(s)")
    parser.add_argument("--recipe", type=Path, default=None, help="a probe recipe (YAML: tasks, layer, pool, C, ...)")
    parser.add_argument("--layer", default=None,
                        help="final (the default: every block and the final norm) or a block to read (1-based, "
                             "negative from the end: -1 is the last block, before the final norm)")
    parser.add_argument("--pool", choices=["auto", "mean", "prefix"], default=None,
                        help="pooling (default auto: as the init's code, e.g. prefix for AST, mean for SSAST)")
    parser.add_argument("--C", type=float, nargs="+", default=None, metavar="C",
                        help="inverse regularisation (default 1.0); several values: each task's is chosen without its "
                             "scored split (on its validation split, else by cross-validation on its training data)")
    parser.add_argument("--data-root", default=None, help="folder the manifests are under (default data)")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default runs/probe_cache)")
    parser.add_argument("--workers", type=whole_number(0, ">= 0 (0: decode in this process)"), default=None,
                        help="decoding processes (default 2; 0: this one)")
    parser.add_argument("--max-bad-fraction", type=float, default=None, metavar="F",
                        help="stop when more than this share of a split's clips is bad audio (default 0.02, as "
                             "training's data.max_bad_fraction)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the results as JSON here (with the clips used and skipped per split)")
    parser.add_argument("--device", default=None, help=f"{DEVICE_HELP}; the encoder's features are computed there")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from common.system.distributed import single_process

        single_process("the linear probe")
        from common.config.recipe import RecipeError, build, load_yaml, recipe_files, with_source
        from common.system import jsonfile
        from common.system.atomic import atomic_write_text
        from common.system.disk import output_folder
        from common.system.logger import setup_logging

        setup_logging(None)
        from common.cli import command_device
        from finetune.embedder import parse_layer

        device = command_device(args.device)  # a device this machine lacks, refused before any reading

        data = load_yaml(args.recipe) if args.recipe else {}
        if isinstance(data.get("layer"), str):  # layer: final in a recipe
            data["layer"] = parse_layer(data["layer"])
        if args.layer is not None:
            data["layer"] = parse_layer(args.layer)
        flags = {}  # recipe key -> the option that set it
        for key, flag, value in (("tasks", "--task", args.task), ("pool", "--pool", args.pool), ("C", "--C", args.C),
                                 ("data_root", "--data-root", args.data_root),
                                 ("cache_dir", "--cache-dir", args.cache_dir),
                                 ("num_workers", "--workers", args.workers),
                                 ("max_bad_fraction", "--max-bad-fraction", args.max_bad_fraction)):
            if value is not None:
                data[key], flags[key] = (value[0] if key == "C" and len(value) == 1 else value), flag
        if args.layer is not None:
            flags["layer"] = "--layer"
        try:
            recipe = build(ProbeRecipe, data)
        except RecipeError as err:  # named where the value was written: the option, or the recipe file
            key = str(err).split(":", 1)[0]
            if key in flags:
                raise RecipeError(f"{flags[key]}: {str(err).split(':', 1)[1].strip()}") from None
            raise with_source(err, (), recipe_files(args.recipe) if args.recipe else ()) from None
        if not recipe.tasks:
            raise ValueError("give --task NAME [NAME ...] or a --recipe listing tasks")
        if args.out is not None:  # refused before hours of features, not after
            if args.out.is_dir():
                raise ValueError(f"--out {args.out} is a folder; name the JSON file to write the results to")
            output_folder(args.out.parent, f"--out {args.out}: the folder")
        check_tasks(recipe)  # every task's data before the first task's features (hours, on a large corpus)
        import torch

        results = [probe_task(args.init, task, recipe, torch.device(device)) for task in recipe.tasks]
        pools = sorted({r["pool"] for r in results})
        layer = "final" if recipe.layer is None else f"block {recipe.layer}"
        grid = recipe.grid
        print(f"linear probe of {args.init} (layer {layer}, {'/'.join(pools)} pooling, C="
              + (f"{grid[0]:g})" if len(grid) == 1 else f"chosen from {', '.join(f'{c:g}' for c in grid)})"))
        chosen = [", ".join(f"{c:g}" for c in (r["C"] if isinstance(r["C"], list) else [r["C"]])) for r in results]
        wide = max([16, *map(len, chosen)])  # ESC-50: one C per fold
        print(f"| {'task':<16} | {'metric':<6} | {'value':>7} |" + (f" {'C':<{wide}} |" if len(grid) > 1 else ""))
        print(f"|{'-' * 18}|{'-' * 8}|{'-' * 9}|" + (f"{'-' * (wide + 2)}|" if len(grid) > 1 else ""))
        for r, c in zip(results, chosen):
            print(f"| {r['task']:<16} | {r['metric']:<6} | {100 * r['value']:>7.2f} |"
                  + (f" {c:<{wide}} |" if len(grid) > 1 else ""))
        for r in results if len(grid) > 1 else ():
            print(f"{r['task']}: C chosen on {r['chosen_on']}" + (" of each fold" if "folds" in r else ""))
        for r in results:  # the clips each score left out (named in the log as they were skipped)
            bad = r["bad_clips"]
            if any(bad.values()):
                print(f"{r['task']}: {sum(bad.values())} clip(s) skipped as bad audio ("
                      + ", ".join(f"{split} {n} of {n + r['clips'][split]}" for split, n in bad.items() if n)
                      + ("; listed in --out" if args.out else "") + ")")
        if args.out:
            atomic_write_text(args.out, jsonfile.dumps(results, indent=1))
        return 0

    from common.cli import run_main

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
