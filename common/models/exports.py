"""This package's model files: one safetensors file per model, its config in the metadata.

An export holds the weights and, in its metadata, the JSON config needed to rebuild the model
(``encoder_config``) plus whatever the writer adds (front end, labels, head, phase). Pretraining writes
encoders (:func:`save_encoder`), fine-tuning writes classifiers (``finetune.classifier.save_classifier``);
both are written atomically. A run directory's final model is ``RUN/model.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from common.audio.compression import Compression
from common.models.arch import architecture_from_meta
from common.models.ast.encoder import ASTEncoder
from common.system.atomic import atomic_path

__all__ = ["EXPORT_FORMAT", "RUN_EXPORT", "save_weights", "read_weights", "is_export", "save_encoder",
           "resolve_model_file", "fold_dirs", "unreadable", "check_export_meta"]

EXPORT_FORMAT = "coarse2fine-ast/1"
RUN_EXPORT = "model.safetensors"
_FOLD = re.compile(r"fold(\d+)")


def save_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically write ``tensors`` and JSON-serialisable ``meta`` into one safetensors file."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": EXPORT_FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    size = sum(t.numel() * t.element_size() for t in tensors.values())  # the header adds a few KiB
    with atomic_path(path, size=size) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)  # looked up at the call: patchable
        _sort_metadata(tmp)
    return Path(path)


def _sort_metadata(path: Path) -> None:
    """Rewrite the header of the safetensors file ``path`` with its metadata and tensors in key order, in place.

    safetensors' writer keeps the metadata in a hash map whose order changes from one process (or call) to the
    next, so two exports of the same weights differed in their bytes, and a check of a resume or a rerun by
    checksum failed. The header is the same JSON reordered, so of the same length (compact, as the writer writes
    it, padded with spaces); a header that would not be is left as written."""
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        meta = header.pop("__metadata__", None)
        if meta is None:
            return
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **dict(sorted(header.items()))},
                          separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            return
        handle.seek(8)
        handle.write(text + b" " * (size - len(text)))


def unreadable(path: str | os.PathLike, err: Exception) -> ValueError:
    """The error for a ``.safetensors`` file that does not parse: a truncated copy or another kind of file."""
    if isinstance(err, OSError):
        return ValueError(f"{path} cannot be read ({err.strerror or err})")
    try:
        size = f"{os.path.getsize(path)} bytes"
    except OSError:
        size = "size unknown"
    return ValueError(f"{path} is not a readable safetensors file ({size}; truncated, or not a safetensors file: "
                      f"{str(err).strip() or type(err).__name__})")


def is_export(path: str | os.PathLike) -> bool:
    """Whether a safetensors file was written by :func:`save_weights` (reads the header only).

    Raises:
        ValueError: the file is not a readable safetensors file (naming it).
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == EXPORT_FORMAT
    except (SafetensorError, OSError) as err:
        raise unreadable(path, err) from err


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_weights`: ``(tensors, meta)``."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise unreadable(path, err) from err
    if raw.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not an export of this package (format={raw.get('format')!r}, "
            f"expected {EXPORT_FORMAT!r})"
        )
    meta = {}
    for key, value in raw.items():
        if key == "format":
            continue
        try:
            meta[key] = json.loads(value)
        except ValueError as err:
            raise ValueError(f"{path}: metadata {key!r} is not JSON ({err}): not an export as this package writes "
                             f"them, or a damaged one") from None
    check_export_meta(path, meta)
    return tensors, meta


# the metadata keys whose values have one type, where an export has them (their contents are checked below)
_META_TYPES = {"arch": (str, "a string"), "encoder_prefix": (str, "a string"), "loss": (str, "a string"),
               "encoder_config": (dict, "a mapping"), "audio": (dict, "a mapping"), "phase": (dict, "a mapping"),
               "classifier": (dict, "a mapping"), "class_names": (dict, "a mapping")}


def check_export_meta(path: str | os.PathLike, meta: dict) -> None:
    """Refuse an export's metadata that the readers would trip on (a TypeError or AttributeError deep inside):
    a value of the wrong type, a model config (``encoder_config``, ``audio``) that does not build, a ``phase``
    that is no compression, a ``classifier`` without its class list or pooling.

    Raises:
        ValueError: naming ``path`` and the key (``encoder_config.depth: expected an integer, got 'four'``).
    """
    for key, (kind, what) in _META_TYPES.items():
        if key in meta and not isinstance(meta[key], kind):
            raise ValueError(f"{path}: metadata {key} must be {what}, got {meta[key]!r}")
    phase = meta.get("phase", {})
    try:
        Compression(phase.get("compression", "none"), phase.get("factor", 1), phase.get("patch_transfer", "pi"))
    except ValueError as err:
        raise ValueError(f"{path}: metadata phase.{err}") from None
    info = meta.get("classifier")
    if info is not None:
        classes = info.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{path}: metadata classifier.classes must be a non-empty list of class names, got "
                             f"{classes!r}")
        if not isinstance(info.get("pool"), str):
            raise ValueError(f"{path}: metadata classifier.pool must be a string, got {info.get('pool')!r}")
    if "encoder_config" in meta:
        try:
            architecture_from_meta(meta)
        except ValueError as err:
            raise ValueError(f"{path}: metadata {err}") from None


def save_encoder(encoder: ASTEncoder, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Export an encoder: weights + its config (+ ``meta``, e.g. the front end) in one safetensors file."""
    return save_weights(path, encoder.state_dict(), {"encoder_config": encoder.cfg.to_dict(),
                                                     "encoder_prefix": "", **(meta or {})})


def fold_dirs(path: str | os.PathLike) -> list[Path]:
    """The fold directories with a ledger under a cross-validation run's root (``finetune/run.py`` trains a k-fold
    task in ``<run>/fold1`` ... ``<run>/foldK``), in fold order (``fold10`` after ``fold9``); empty for anything
    else."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in path.iterdir()
             if (m := _FOLD.fullmatch(d.name)) and (d / "ledger.json").is_file()]
    return [d for _, d in sorted(found)]


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The model file behind ``path``: the file itself, or a run directory's final export."""
    path = Path(path)
    if path.is_dir():
        final = path / RUN_EXPORT
        if final.is_file():
            return final
        folds = fold_dirs(path)
        if folds:  # a cross-validation run: a model per fold, none for the whole
            raise FileNotFoundError(f"{path} is a {len(folds)}-fold cross-validation run, with a model per fold: "
                                    f"name one fold's directory ({folds[0]} ... {folds[-1].name})")
        if path.parent.name == "checkpoints":  # RUN/checkpoints/phase01-step...: DeepSpeed's files, no model file
            run = path.parent.parent
            raise FileNotFoundError(f"{path} is a training checkpoint of {run}, not a model: name one of the run's "
                                    f"exports in {run / 'export'} (each phase's end, the best validation), written "
                                    f"while it trains")
        held = sorted(path.glob("*.safetensors"))
        if held:  # RUN/export: a model per phase's end and the best validation's, no final one
            best = [p for p in held if p.stem == "best"]
            names = ", ".join(p.name for p in held)
            raise FileNotFoundError(f"{path} is a folder of {len(held)} models ({names}), not one: name one file, "
                                    f"e.g. {(best or held)[-1]}" + (" (the best validation's)" if best else ""))
        exports = sorted((path / "export").glob("*.safetensors")) if (path / "export").is_dir() else []
        hint = (f"; phase exports present: {', '.join(str(p) for p in exports)}" if exports
                else "; it holds no exports (is it a run directory?)")
        raise FileNotFoundError(f"run directory {path} has no final export {RUN_EXPORT} (run not finished?){hint}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path
