"""Where a task's encoder starts: loading ``--init`` and fitting its geometry to the task.

Shared by fine-tuning and linear probing. The transformer and the patch shape come from the checkpoint (the
attention heads too, but where the file does not store them, an official ``.pth`` or ImageNet weights:
``model.num_heads`` when the recipe gives it, else a guess from the width); the input length from the task; the
stride from the recipe (default: the patch, no overlap, as the paper). Model sizes a recipe writes beside an init
are a caution in the plan, not a model.

The positional embedding of the init is fitted to the first phase's grid as the code the weights come
from would fit it: official SSAST / AST checkpoints and ImageNet weights with their rule (``cut``: the
centre of the grid where the task's is smaller, e.g. ESC-50's 512 frames, bilinear where it is larger);
this package's exports with ``transfer.pos_embed`` (the paper's bilinear, antialiased when it shrinks).
Official weights trained on audio entering a time-compressed first phase (``cut_at_full``) are fitted so to
the task's full-resolution grid and then carried to the phase's grid as a phase change carries them
(``transfer.pos_embed``): a compressed phase sees the whole clip at a lower frame rate, not a shorter clip,
and its positions are the file's positions resampled (a cut would keep the middle quarter of them at x4, which
the next phase change would stretch over the whole clip). ImageNet weights, whose positions are no time, take
the rule on the phase's grid, as AST's code given the compressed input. ``transfer.init_pos_embed`` overrides
the choice.

The classifier pools the tokens as the init's code does (``head.pool: auto``, :func:`init_pool`): AST
(ImageNet / DeiT weights, official AST checkpoints) takes the mean of the prefix tokens, ``(cls + dist)
/ 2`` (the cls token with one prefix token); SSAST (its pretrained checkpoints and this package's
pretraining exports) the mean of the patch tokens, ``ft_avgtok``, which SSAST's fine-tuning recipes use
for patch and frame models alike; a fine-tuned export keeps the pooling it was trained with; a model
trained from scratch (``--init none``) pools as AST, the paper's model, whose head does not depend on
its initialisation.

A fine-tuning run records what it took from ``--init`` besides the weights (:func:`record_init`:
``RUN/init.json``, the config and the metadata that pick the defaults, the model's shape and the pooling),
so that the run resumes from its checkpoints when the init's file has gone since (:func:`recorded_init`); a
model that starts from the init (a new run, a fold not started yet) still needs the file. The record holds the
weights' digest too (:func:`init_digest`: the size and SHA-256 of the file(s) read), so that a fold started later
from a file rewritten since (a pretraining run's ``export/best.safetensors`` that is still going, an export written
again) is refused instead of mixing two inits in one cross-validation (:func:`check_init_digest`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.audio.compression import Compression
from common.config.recipe import RecipeError
from common.models.arch import architecture_for
from common.models.ast.encoder import EncoderConfig
from common.models.exports import resolve_model_file
from common.models.hf import CONFIG_FILE, is_hf_directory, weight_files
from common.models.htsat import HTSATConfig
from common.models.htsat.arch import weight_conflicts
from common.models.htsat.imagenet import OFFICIAL_START
from common.models.spec import ModelSpec
from common.models.weights import EncoderWeights, load_encoder_state
from common.phases.config import TransferConfig
from common.system.atomic import atomic_write_text

__all__ = ["InitTransferConfig", "CUT_AT_FULL", "load_init", "init_family", "INIT_FAMILIES",
           "task_encoder_config",
           "init_kind", "expected_init_note", "init_pos_mode", "init_patch_mode", "init_pool", "resolve_pool",
           "task_encoder", "INIT_RECORD", "init_digest", "record_init", "recorded_init", "check_init_digest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitTransferConfig(TransferConfig):
    """The fine-tuning recipe's ``transfer`` section: the phase changes, and the init.

    Args:
        pos_embed: see :class:`common.phases.config.TransferConfig` (phase changes).
        init_pos_embed: how ``--init``'s positional embedding is fitted to the first phase: ``auto``
            (follow the init, see the module docstring), ``bilinear``, ``cut`` (the rule of SSAST's and AST's
            code, on the first phase's grid), or ``cut_at_full`` (that rule on the task's full-resolution grid,
            then ``pos_embed`` to a compressed first phase's; what ``auto`` takes for official audio weights).
    """

    init_pos_embed: Literal["auto", "bilinear", "cut", "cut_at_full"] = "auto"


def load_init(init: str) -> EncoderWeights | None:
    """The encoder weights of ``--init``, or None for ``none``."""
    if init.lower() == "none":
        return None

    return load_encoder_state(init)


# what an encoder's weights were trained by: a task file's defaults follow the published recipe of the family
INIT_FAMILIES = {
    "ssast": "SSAST-pretrained init",
    "ast": "supervised audio init",
    "imagenet": "ImageNet init",
    "none": "from scratch",
    "htsat": "HTS-AT",
}


def init_family(init: EncoderWeights | None, arch: str = "ast") -> str:
    """The family of ``--init`` (a key of :data:`INIT_FAMILIES`).

    ``htsat`` for HTS-AT weights (or ``arch == "htsat"`` from scratch); ``ssast`` for self-supervised
    pretraining weights (SSAST's pretrained files, this package's pretraining exports); ``imagenet`` for timm
    ViT / DeiT weights; ``ast`` for weights already trained on labelled audio (official AST checkpoints, a
    Hugging Face AST directory, this package's fine-tuned exports); ``none`` from scratch.

    Args:
        init: as returned by :func:`load_init`.
        arch: the recipe's ``model.arch``, which tells a model from scratch.
    """
    if init is None:
        return "htsat" if arch == "htsat" else "none"
    if init.arch == "htsat":
        return "htsat"
    if init.meta.get("source") == "imagenet":
        return "imagenet"
    return "ssast" if init.meta.get("objective") == "ssast" else "ast"


def task_encoder_config(init: EncoderWeights | None, model: ModelSpec, num_mel_bins: int,
                        target_frames: int, keep_stride: bool = False):
    """The full-resolution model config for a task: an :class:`EncoderConfig` (AST family) or an
    ``HTSATConfig`` (``model.arch: htsat``; the init's, with the recipe's ``model.htsat`` settings on top).
    ``keep_stride``: the init's own patch stride (a frozen encoder's features, the linear probe), not
    ``model.stride``'s.

    Raises:
        ValueError: naming ``model.arch`` when the init holds the other architecture.
    """
    if init is not None and init.arch != model.arch:
        if init.arch == "htsat":
            raise ValueError("model.arch: --init holds an HTS-AT model but the recipe trains the AST family; use "
                             "HTS-AT's official recipe, its batch included: --recipe recipes/htsat_<task>.yaml "
                             "(audioset, vggsound, esc50), or recipes/ft_htsat_<task>_fshift4.yaml coarse to fine")
        raise ValueError(f"model.arch: --init holds an {init.arch} model (the AST family) but the recipe trains "
                         f"{model.arch}; leave out the HTS-AT recipe or --set model.arch={init.arch}")
    if model.arch == "htsat":
        cfg = model.htsat_config if init is None else init.config.replace(**model.htsat.given())
        changed = [] if init is None else weight_conflicts(init, cfg)
        if changed:  # as the weights' load would refuse them, before any run directory or compute
            imagenet = init.meta.get("source") == "imagenet"
            kind = "an ImageNet Swin, whose sizes" if imagenet else "HTS-AT weights, whose config"
            raise ValueError(f"model.htsat: --init {init.meta.get('file', '')} holds {kind} the model keeps; the "
                             f"recipe changes {', '.join(changed)}: leave these keys out, or start from scratch "
                             f"(--init none)")
        _check_filterbank(init, cfg)
        if init is not None and init.meta.get("source") == "imagenet":
            _say_swin_start(init, cfg)
        return cfg
    if init is None:
        return model.encoder_config(num_mel_bins, target_frames)
    cfg = init.config
    if model.num_heads is not None and init.meta.get("source") not in ("export", "hf"):
        cfg = cfg.replace(num_heads=model.num_heads)  # the file does not store its heads (a guess): the recipe's
    written = init.written_in
    if written.method == "patch":  # an export of a p x Cp phase: full resolution is its p x p (paper section 2.3)
        cfg = cfg.replace(tshape=cfg.tshape // written.factor, tstride=cfg.tstride // written.factor)
    fstride, tstride = (cfg.fstride, cfg.tstride) if keep_stride else model.stride or (cfg.fshape, cfg.tshape)
    if init.meta.get("source") in ("hf", "export", "official") and (fstride, tstride) != (cfg.fstride, cfg.tstride):
        log.warning("the init was trained with patch stride %dx%d; this run uses %dx%d (model.stride; default: the "
                    "patch, no overlap); --set model.stride=[%d,%d] keeps it", cfg.fstride, cfg.tstride, fstride,
                    tstride, cfg.fstride, cfg.tstride)
    mel = num_mel_bins if init.meta.get("source") == "imagenet" else cfg.num_mel_bins
    return cfg.replace(num_mel_bins=mel, input_tdim=target_frames, fstride=fstride, tstride=tstride,
                       drop_path_rate=model.drop_path_rate)


_FILTERBANK = ("sample_rate", "n_fft", "mel_bins", "fmin", "fmax")


def _check_filterbank(init: EncoderWeights | None, cfg: HTSATConfig) -> None:
    """Refuse an HTS-AT ``fmax`` above the Nyquist frequency (empty top filters) unless the init's weights were
    trained with that very filterbank (an official Speech Commands checkpoint, or a model fine-tuned from one)."""
    if not cfg.empty_filters:
        return
    own = init is not None and isinstance(init.config, HTSATConfig) and init.meta.get("source") != "imagenet" and \
        all(getattr(init.config, key) == getattr(cfg, key) for key in _FILTERBANK)
    if not own:
        raise ValueError(f"model.htsat.fmax: {cfg.fmax:g} Hz lies above the Nyquist frequency of sample_rate "
                         f"{cfg.sample_rate} ({cfg.sample_rate / 2:g} Hz), so the top mel filters would be empty; only "
                         f"weights trained with such a filterbank (an official Speech Commands checkpoint) keep it: "
                         f"give model.htsat.fmax <= {cfg.sample_rate / 2:g}")


def _say_swin_start(init: EncoderWeights, cfg) -> None:
    """Warn when an ImageNet Swin is not the official HTS-AT's start (Swin-T/C24: heads 4-8-16-32, window 8). The
    model (``cfg``, with the recipe's ``model.htsat`` on top) has the file's sizes, heads included (a recipe changing
    them was refused: :func:`~common.models.htsat.arch.weight_conflicts`), and the run's window."""
    official = HTSATConfig()
    windows = sorted(set(init.meta.get("swin_windows", [])))
    heads = init.config.num_heads
    if tuple(heads) != official.num_heads or windows != [official.window_size]:
        log.warning("--init %s is a Swin with heads %s and window %s; the official HTS-AT (and the paper's "
                    "Table 6) starts from Swin-T/C24 (%s: heads %s, window %d). The model keeps the file's sizes "
                    "(heads %s) and takes the run's window %d (model.htsat.window_size), to which the file's "
                    "relative-position tables are resized", init.meta.get("file"), list(heads),
                    "/".join(map(str, windows)), OFFICIAL_START, list(official.num_heads), official.window_size,
                    list(cfg.num_heads), cfg.window_size)


def init_kind(init: EncoderWeights | None) -> str:
    """What ``--init`` is, in the terms of a recipe's ``expected_init``: ``none`` (from scratch), ``imagenet``
    (ImageNet ViT / DeiT / Swin weights) or ``audio`` (weights trained on audio: a run or export of this
    package, an official SSAST / AST / HTS-AT checkpoint, a Hugging Face AST)."""
    if init is None:
        return "none"
    return "imagenet" if init.meta.get("source") == "imagenet" else "audio"


def expected_init_note(expected: str, init: EncoderWeights | None, init_arg: str) -> str | None:
    """A warning when ``--init`` is not of the kind the recipe's ``expected_init`` names (None when it is,
    or for ``any``)."""
    kind = init_kind(init)
    if expected == "any" or kind == expected:
        return None
    wanted = {"none": "no weights (--init none)",
              "imagenet": "ImageNet weights (for HTS-AT the official Swin-T/C24, swin_tiny_c24_patch4_window8_256.pth)",
              "audio": "weights trained on audio (e.g. an AudioSet checkpoint or run)"}[expected]
    given = {"none": "no weights", "imagenet": "ImageNet weights", "audio": "weights trained on audio"}[kind]
    return (f"expected_init: this recipe starts from {wanted}, as the paper's run did; --init {init_arg} is "
            f"{given}, so this run does not start as the paper's (--set expected_init=any silences this)")


CUT_AT_FULL = "cut_at_full"  # the file's rule on the full-resolution grid, then the phase change's transfer


def init_pos_mode(init: EncoderWeights | None, default: str, choice: str = "auto", compressed: bool = False) -> str:
    """How ``init``'s positional embedding is fitted to the task's grid.

    Args:
        init: as returned by :func:`load_init`.
        default: the mode for this package's exports (``transfer.pos_embed``).
        choice: ``auto`` (official SSAST / AST checkpoints, in their own files or as Hugging Face directories
            such as MIT's AST or an official checkpoint this package exported: ``cut``, the rule of SSAST's and
            AST's fine-tuning code, applied at full resolution (:data:`CUT_AT_FULL` for a compressed first
            phase); ImageNet weights: ``cut`` on the first phase's grid; this package's exports, its Hugging Face
            exports of them included: ``default``), or the mode to use.
        compressed: whether the first phase is time-compressed (else :data:`CUT_AT_FULL` is plain ``cut``, as for
            HTS-AT, which has no absolute positional embedding: its tables are fitted to the phase's windows).
    """
    mode = choice
    if choice == "auto":
        source = init.meta.get("source") if init is not None else None
        official = source == "official" or (source == "hf" and (
            not init.meta.get("own_export") or init.meta.get("origin") == "official"))
        mode = CUT_AT_FULL if official else "cut" if source == "imagenet" else default
    positional = init is None or init.arch == "ast"  # HTS-AT has no positional embedding to fit in two steps
    return mode if mode != CUT_AT_FULL or (compressed and positional) else "cut"


def init_pool(init: EncoderWeights | None, cfg) -> str:
    """The pooling of the code ``init`` comes from (see the module docstring); ``cfg`` is the task's
    full-resolution model config (it picks the architecture)."""
    return architecture_for(cfg).resolve_pool("auto", init)


def resolve_pool(pool: str, init: EncoderWeights | None, cfg) -> str:
    """``pool`` itself (checked against the architecture), or for ``auto`` :func:`init_pool`."""
    return architecture_for(cfg).resolve_pool(pool, init)


def init_patch_mode(init: EncoderWeights | None, phase=None) -> str:
    """How ``init``'s patch kernel is fitted to a first phase ``phase`` (a :class:`PhaseConfig`; None: full
    resolution): a patch phase's own transfer; else, for weights written in a patch phase, that phase's transfer
    (the kernel leaves it as the run's own phase change would have); else PI-resize."""
    if phase is not None and phase.compression == "patch":
        return phase.patch_transfer
    written = init.written_in if init is not None else Compression()
    return written.patch_transfer if written.method == "patch" else "pi"


def task_encoder(init: EncoderWeights | None, cfg, pos_mode: str = "bilinear"):
    """An encoder laid out as ``cfg`` (full resolution) carrying ``init``'s weights, for a frozen use such as
    probing (AST family: an :class:`ASTEncoder`; HTS-AT: the model with its head)."""
    if init is None:
        raise ValueError("a frozen encoder needs weights: --init none gives a random encoder")
    arch = architecture_for(cfg)
    geometry = arch.geometry(Compression())
    encoder = arch.build_encoder(geometry)
    arch.load_weights(encoder, init, geometry, init_pos_mode(init, pos_mode), init_patch_mode(init))
    return encoder.eval()


INIT_RECORD = "init.json"


def init_digest(init_arg: str) -> dict | None:
    """Which weights ``--init init_arg`` holds, by content: ``{"files": [...], "size": bytes, "sha256": hex}`` over
    the file(s) :func:`load_init` reads (the file; a run directory's final export; a Hugging Face directory's
    ``config.json`` and weight files, in that order), None for ``none``. Reads every byte (seconds for a file of
    several GB): a command takes it once, when it has read the weights."""
    if init_arg.lower() == "none":
        return None
    path = Path(init_arg)
    files = [path / CONFIG_FILE, *weight_files(path)] if is_hf_directory(path) else [resolve_model_file(path)]
    digest, size = hashlib.sha256(), 0
    for file in files:
        if len(files) > 1:
            digest.update(f"{file.name}\0".encode())
        with open(file, "rb") as handle:
            size += os.fstat(handle.fileno()).st_size
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return {"files": [str(f) for f in files], "size": size, "sha256": digest.hexdigest()}


def record_init(run_dir: Path, init_arg: str, init: EncoderWeights | None, digest: dict | None = None) -> None:
    """Write ``RUN/init.json``: what the run took from ``--init init_arg`` besides its weights, and which weights
    they were (``digest``, :func:`init_digest`, as ``weights``; nothing for ``--init none``, which needs no
    file)."""
    if init is None or "recorded" in init.meta:  # from scratch, or already a record
        return
    atomic_write_text(Path(run_dir) / INIT_RECORD, json.dumps(
        {"init": init_arg, "arch": init.arch, "config": init.config.to_dict(), "meta": init.meta,
         **({"weights": digest} if digest else {})}, indent=1))


def _words(digest: dict) -> str:
    return f"sha256 {str(digest.get('sha256'))[:12]}, {digest.get('size')} bytes"


def check_init_digest(run_dir: Path, init_arg: str, init: EncoderWeights, digest: dict,
                      starting: list[Path], say: bool = True) -> EncoderWeights:
    """``init``, read from ``--init init_arg`` now, for a run in ``run_dir`` that has trained: where its
    ``init.json`` records other weights (:func:`record_init`), a model that would start from the file now
    (``starting``: the folds not started yet) is refused; a run whose every model resumes from its checkpoints goes
    on with what it recorded of the init (:func:`recorded_init`, as when the file has gone), said in a warning. A
    record without a digest (written before it was recorded) accepts the file, as it always did.

    Raises:
        RecipeError: naming the file, both digests and what to do.
    """
    path = Path(run_dir) / INIT_RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return init
    recorded = data.get("weights") if isinstance(data, dict) and data.get("init") == init_arg else None
    if not isinstance(recorded, dict) or recorded.get("sha256") == digest["sha256"]:
        return init
    file = digest["files"][0] if len(digest["files"]) == 1 else init_arg
    if starting:
        raise RecipeError(
            f"--init {init_arg}: {file} is not the file {run_dir} started from ({_words(recorded)} in {path}; now "
            f"{_words(digest)}): {', '.join(p.name for p in starting)} would start from other weights than the run's "
            f"other folds. Restore the file the run started from, or start over with --restart (the earlier attempt "
            f"is moved aside) or in a new --run-dir")
    if say:  # (rank 0 of several: the same file on every rank)
        log.warning("--init %s: %s is not the file %s started from (%s in %s; now %s): the run resumes from its "
                    "checkpoints with what it recorded of its init", init_arg, file, run_dir, _words(recorded), path,
                    _words(digest))
    return recorded_init(run_dir, init_arg)


def recorded_init(run_dir: Path, init_arg: str) -> EncoderWeights | None:
    """The init ``run_dir`` recorded (:func:`record_init`) as an :class:`EncoderWeights` without weights, or
    None when it recorded none or another init. Read only for a run that resumes: its model comes from its
    checkpoints; a model that would start from it stops, naming the missing file
    (``common.training.loop``)."""
    path = Path(run_dir) / INIT_RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data["init"] != init_arg:
            return None
        config = (HTSATConfig.from_dict(data["config"], prefix="init.json config") if data["arch"] == "htsat"
                  else EncoderConfig.from_dict(data["config"]))
        meta = dict(data["meta"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a readable init record ({type(err).__name__}: {err}); the run needs "
                         f"--init {init_arg} itself") from None
    return EncoderWeights(config, {}, {**meta, "recorded": str(path)})
