"""Hugging Face ``transformers`` interop, written: export this package's AST models as HF directories and
classify with ``transformers``' AST classes (reading a directory is :mod:`common.models.hf`).

    python -m common.models.hf_export export runs/finetune/esc50-baseline/fold1 --out esc50_ast_hf
        # -> ASTForAudioClassification (a cross-validation run: one fold's model)
    python -m common.models.hf_export export runs/pretrain/ssast_fshift4 --out ssast_hf        # -> ASTModel (encoder)

What the format holds, and how this package's models map onto it, is described in :mod:`common.models.hf`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from common.audio.fbank import check_waveforms, resolve_norm_stats
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.exports import unreadable
from common.models.fit import misfit
from common.models.hf import (
    _HEAD_NAMES,
    _TOP_NAMES,
    BASE_PREFIX,
    CONFIG_FILE,
    HF_FRAME_LENGTH_MS,
    HF_FRAME_SHIFT_MS,
    LAYER_NORM_EPS,
    PREPROCESSOR_FILE,
    WEIGHTS_FILE,
    ASTWeights,
    FrontEnd,
    HFFormatError,
    TransformersMissing,
    _transformers,
    is_hf_directory,
    provenance,
    read_hf_directory,
)
from common.models.weights import load_encoder_state
from common.system.atomic import file_mode
from common.system.disk import NoSpace, ensure_space, free_bytes, out_of_space
from common.system.logger import process_logging
from common.system.prog import error_line, prog
from common.system.signals import piped

if TYPE_CHECKING:
    import numpy as np

# Imports the command alone needs are inside its functions, but --help loads torch: this module is a library first
# (the export that finetune's demo and the tests call), whose top imports torch.

__all__ = [
    "read_ast",
    "export_hf",
    "write_hf_directory",
    "classify",
    "main",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- exporting
def _front_end_from_audio(meta: dict, norm: str | None):
    """``(FrontEnd, AudioConfig)`` of an export's ``audio`` metadata and the statistics it recorded (``norm``
    replaces them)."""
    from common.audio.pipeline import AudioConfig
    from common.models.arch import export_norm_stats

    a = AudioConfig(**meta["audio"])
    spec = norm or a.norm
    stats = resolve_norm_stats(norm) if norm else export_norm_stats(meta) or resolve_norm_stats(a.norm)
    return FrontEnd(a.sample_rate, a.num_mel_bins, a.target_frames, stats.mean, stats.std, spec), a


def _not_ast(file: Path, arch: str) -> str:
    return (f"{file} holds a {arch!r} model{' (HTS-AT, a Swin transformer)' if arch == 'htsat' else ''}: the "
            f"Hugging Face AST format holds only ViT-style audio spectrogram transformers")


def read_ast(src: str | os.PathLike, norm: str | None = None) -> tuple[ASTWeights, list[str]]:
    """Read anything ``--init`` takes that holds an AST-family model, for export.

    Args:
        src: a fine-tuning or pretraining run directory or export, an official SSAST / AST ``.pth``, or an
            HF AST directory.
        norm: normalisation statistics (a ``NORM_STATS`` name or a stats JSON file) replacing the source's;
            required for official ``.pth`` files, which do not record theirs.

    Returns:
        ``(model, problems)``: ``problems`` lists what the HF format cannot hold (empty: exportable).

    Raises:
        HFFormatError: sources that are not an AST at all (HTS-AT, ImageNet weights, no ``encoder_config``).
    """
    from common.models.exports import EXPORT_FORMAT, read_weights, resolve_model_file

    problems: list[str] = []
    if is_hf_directory(src):
        model = read_hf_directory(src)
        if norm is not None:
            stats = resolve_norm_stats(norm)
            base = model.front_end or FrontEnd(16000, model.cfg.num_mel_bins, model.cfg.input_tdim, 0.0, 1.0)
            model = replace(model, front_end=FrontEnd(base.sample_rate, base.num_mel_bins, base.max_length,
                                                       stats.mean, stats.std, norm))
        elif model.front_end is None:
            problems.append(f"no {PREPROCESSOR_FILE}: pass --norm NAME|FILE to give the normalisation statistics")
        return model, problems
    file = resolve_model_file(src)
    own = False
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                header = handle.metadata() or {}
        except Exception as err:  # noqa: BLE001
            raise HFFormatError(str(unreadable(file, err))) from err
        own = header.get("format") == EXPORT_FORMAT
        if own and header.get("arch", '"ast"') != '"ast"':  # said before the metadata is read (HTS-AT's is other)
            raise HFFormatError(_not_ast(file, header["arch"].strip('"')))
    if not own:
        cfg, state, meta = load_encoder_state(file)
        if meta.get("arch", "ast") != "ast":  # an official HTS-AT checkpoint, an ImageNet Swin
            raise HFFormatError(_not_ast(file, meta["arch"]))
        if meta["source"] == "imagenet":
            raise HFFormatError(f"{file} holds ImageNet ViT/DeiT weights, not an audio model: fine-tune it first "
                                f"(python finetune/run.py --init {src} --task NAME) and export the result")
        if norm is None:
            problems.append(f"{file} (an official SSAST/AST checkpoint) does not record its normalisation statistics: "
                            f"pass --norm NAME|FILE (e.g. --norm audioset)")
            fe = None
        else:
            stats = resolve_norm_stats(norm)
            fe = FrontEnd(16000, cfg.num_mel_bins, cfg.input_tdim, stats.mean, stats.std, norm)
        return ASTWeights(cfg, state, front_end=fe, source=str(file), provenance=provenance(meta)), problems
    tensors, meta = read_weights(file)
    arch = meta.get("arch", "ast")
    if arch != "ast":
        raise HFFormatError(_not_ast(file, arch))
    if "encoder_config" not in meta:
        raise HFFormatError(f"{file} has no encoder_config: not an AST-family model (HTS-AT models cannot be "
                            f"exported to the Hugging Face AST format)")
    cfg = EncoderConfig.from_dict(meta["encoder_config"])
    phase = meta.get("phase") or {}
    clips = meta.get("clips") if isinstance(meta.get("clips"), dict) else {}
    if clips.get("pad", "zeros") != "zeros":
        problems.append(f"it fills a short clip by {clips['pad']} (data.pad), and ASTFeatureExtractor pads with "
                        f"zeros: its scores would differ from predict.py's; fine-tune with data.pad: zeros to export")
    if phase.get("compression", "none") != "none" or phase.get("factor", 1) != 1:
        problems.append(f"it was exported at phase {phase.get('index', '?')}/{phase.get('of', '?')} "
                        f"({phase.get('compression')} x{phase.get('factor')}), whose front end is not HF's "
                        f"full-resolution fbank; export a model whose last phase is at full resolution (a run whose "
                        f"final phase is compressed has none: train one more phase at full resolution)")
    fe = None
    if "audio" in meta:
        fe, audio = _front_end_from_audio(meta, norm)
        if (audio.frame_shift_ms, audio.frame_length_ms) != (HF_FRAME_SHIFT_MS, HF_FRAME_LENGTH_MS):
            problems.append(f"its fbank uses {audio.frame_length_ms:g} ms windows every {audio.frame_shift_ms:g} ms; "
                            f"ASTFeatureExtractor computes 25 ms every 10 ms")
    elif norm is not None:
        stats = resolve_norm_stats(norm)
        fe = FrontEnd(16000, cfg.num_mel_bins, cfg.input_tdim, stats.mean, stats.std, norm)
    else:
        problems.append("it records no front end (audio settings): pass --norm NAME|FILE")
    prefix = meta.get("encoder_prefix", "")
    encoder = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    origin = provenance(meta)
    if "classifier" not in meta:
        return ASTWeights(cfg, encoder, front_end=fe, source=str(file), provenance=origin), problems
    info = meta["classifier"]
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    return ASTWeights(cfg, encoder, head, info.get("pool", "mean"), list(info["classes"]),
                      dict(meta.get("class_names") or {}), meta.get("loss", "ce"), fe, str(file),
                      provenance=origin), problems



def _check_fit(model: ASTWeights) -> None:
    """Refuse weights that do not fit their own config (a tensor of another shape, a missing or an extra one):
    the directory written would hold a model no reader takes.

    Raises:
        HFFormatError: naming the source and the first mismatching tensors.
    """
    with torch.device("meta"):  # shapes only, no memory
        own = ASTEncoder(model.cfg).state_dict()
    problem = misfit(own, model.encoder)
    if problem is None and model.head is not None:
        dim, outputs = model.cfg.embed_dim, len(model.classes or [])
        head = {k: torch.empty(shape, device="meta") for k, shape in
                (("0.weight", (dim,)), ("0.bias", (dim,)), ("1.weight", (outputs, dim)), ("1.bias", (outputs,)))}
        problem = misfit(head, model.head)
        problem = None if problem is None else f"head: {problem} (for {outputs} classes)"
    if problem is not None:
        raise HFFormatError(f"cannot export {model.source}: the weights do not fit the model its config describes: "
                            f"{problem}")


def _format_problems(model: ASTWeights) -> list[str]:
    """What the HF AST format cannot hold in ``model`` (front end and geometry)."""
    cfg, problems = model.cfg, []
    if cfg.num_prefix_tokens != 2:
        problems.append(f"it has {cfg.num_prefix_tokens} prefix token(s); an HF AST has exactly 2 (cls + distillation)")
    if cfg.fshape != cfg.tshape:
        problems.append(f"its patches are {cfg.fshape}x{cfg.tshape}; HF's patch_size is one int (square kernels only)")
    if (cfg.embed_dim * cfg.mlp_ratio) != int(round(cfg.embed_dim * cfg.mlp_ratio)):
        problems.append(f"mlp_ratio {cfg.mlp_ratio} x {cfg.embed_dim} is not a whole intermediate_size")
    if model.head is not None and model.pool != "prefix":
        problems.append(f"it is a {model.pool}-pooled classifier; HF pools (cls + dist) / 2, which no mean over the "
                        f"patch tokens equals: fine-tune with --set head.pool=prefix to get an exportable model")
    fe = model.front_end
    if fe is not None:
        if fe.num_mel_bins != cfg.num_mel_bins:
            problems.append(f"its front end has {fe.num_mel_bins} mel bins, the encoder {cfg.num_mel_bins}")
        t_grid = (fe.max_length - cfg.tshape) // cfg.tstride + 1 if fe.max_length >= cfg.tshape else 0
        if t_grid != cfg.grid[1]:
            problems.append(f"its {fe.max_length} frames give {t_grid} time patches at patch {cfg.tshape}, stride "
                            f"{cfg.tstride}, but the positional embedding has {cfg.grid[1]}")
    return problems


_LAYER_OUT = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
              "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def _to_hf_state(model: ASTWeights) -> dict[str, torch.Tensor]:
    """This package's state dicts -> HF AST tensors under the names ``save_pretrained`` writes."""
    enc, cfg = model.encoder, model.cfg
    base = BASE_PREFIX if model.head is not None else ""

    def put(name: str, value: torch.Tensor) -> None:
        out[base + name] = value.detach().to("cpu").contiguous().clone()

    out: dict[str, torch.Tensor] = {}
    put("embeddings.cls_token", enc["prefix_tokens"][:, 0:1])
    put("embeddings.distillation_token", enc["prefix_tokens"][:, 1:2])
    for hf, ours in _TOP_NAMES.items():
        put(hf, enc[ours])
    for i in range(cfg.depth):
        for kind in ("weight", "bias"):
            for ours, hf in _LAYER_OUT.items():
                put(f"encoder.layer.{i}.{hf}.{kind}", enc[f"blocks.{i}.{ours}.{kind}"])
            if f"blocks.{i}.attn.qkv.{kind}" in enc:
                q, k, v = enc[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)
                for name, part in (("query", q), ("key", k), ("value", v)):
                    put(f"encoder.layer.{i}.attention.attention.{name}.{kind}", part)
    if model.head is not None:
        for hf, ours in _HEAD_NAMES.items():
            out[hf] = model.head[ours].detach().to("cpu").contiguous().clone()
    return out


def write_hf_directory(model: ASTWeights, out: str | os.PathLike) -> Path:
    """Write ``model`` as an HF AST directory (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).

    ``ASTForAudioClassification`` when the model has a head (``id2label`` = the display names; the class
    ids are kept under ``coarse2fine.classes`` for the way back), ``ASTModel`` otherwise. Weights that do not
    fit their config are refused first. The three files are written into a temporary folder, read back there
    (:func:`read_hf_directory`: what is published is what the reader takes) and moved into ``out`` at the end,
    ``config.json`` last after the old one is removed: a failure while writing leaves no half-written file
    behind, and a kill while publishing never a ``config.json`` beside weights it does not describe.

    Raises:
        HFFormatError: what the format cannot hold (see :func:`read_ast`).
        TransformersMissing: without ``transformers``.
    """
    _check_fit(model)
    problems = _format_problems(model)
    if model.front_end is None:
        problems.append("its front end (sampling rate, normalisation) is unknown: pass --norm NAME|FILE")
    if problems:
        raise HFFormatError(f"cannot export {model.source} to the Hugging Face AST format: {'; '.join(problems)}")
    _transformers()
    from safetensors.torch import save_file
    from transformers import ASTConfig, ASTFeatureExtractor

    cfg, fe = model.cfg, model.front_end
    fields = dict(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                  intermediate_size=int(round(cfg.embed_dim * cfg.mlp_ratio)), hidden_act="gelu",
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=LAYER_NORM_EPS,
                  patch_size=cfg.fshape, qkv_bias=cfg.qkv_bias, frequency_stride=cfg.fstride, time_stride=cfg.tstride,
                  max_length=cfg.input_tdim, num_mel_bins=cfg.num_mel_bins)
    if model.head is not None:
        labels = model.labels
        if len(set(labels)) != len(labels):  # display names must identify the classes: fall back to the ids
            labels = list(model.classes)
        fields.update(architectures=["ASTForAudioClassification"], id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)},
                      problem_type="multi_label_classification" if model.loss == "bce"
                      else "single_label_classification",
                      coarse2fine={**model.provenance, "classes": list(model.classes)})
    else:  # the key marks this package's export
        fields.update(architectures=["ASTModel"], coarse2fine=dict(model.provenance))
    extractor = ASTFeatureExtractor(sampling_rate=fe.sample_rate, num_mel_bins=fe.num_mel_bins,
                                    max_length=fe.max_length, mean=fe.mean, std=fe.std, do_normalize=True,
                                    padding_value=0.0, return_attention_mask=False)
    out = Path(out)
    stale = [f for f in ("pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
             if (out / f).exists()]
    if stale:
        raise HFFormatError(f"{out} already holds other weights ({', '.join(stale)}); export into an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".export.*"):  # what an interrupted export into this folder left
        log.info("removing %s, left by an interrupted export", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    state = _to_hf_state(model)
    size = sum(t.numel() * t.element_size() for t in state.values())
    ensure_space(out / WEIGHTS_FILE, size)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".export."))
    try:
        ASTConfig(**fields).save_pretrained(tmp)
        extractor.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        try:  # what is published must be what this package's reader takes back
            read_hf_directory(tmp)
        except HFFormatError as err:
            raise HFFormatError(f"cannot export {model.source}: the directory written does not read back "
                                f"({err}); nothing was published") from None
        for name in (CONFIG_FILE, PREPROCESSOR_FILE, WEIGHTS_FILE):
            os.chmod(tmp / name, file_mode())  # safetensors creates its file 0600: readable as the umask allows
        # config.json makes the folder an HF directory: the old one goes first and the new one comes last, so that a
        # kill while publishing leaves no config.json beside weights it does not describe (the folder is then no
        # model, and the next export completes it)
        (out / CONFIG_FILE).unlink(missing_ok=True)
        for name in (WEIGHTS_FILE, PREPROCESSOR_FILE, CONFIG_FILE):
            os.replace(tmp / name, out / name)
    except Exception as err:
        if isinstance(err, NoSpace) or not out_of_space(err, out):
            raise
        raise NoSpace(out / WEIGHTS_FILE, size, free_bytes(out)) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _hf_weights(file: Path) -> bool:
    """Whether ``file`` holds weights as :func:`write_hf_directory` writes them (safetensors marked ``format: pt``,
    not an export of this package): what an export killed while publishing left without its ``config.json``."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == "pt"
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not ours to replace
        return False


def export_hf(src: str | os.PathLike, out: str | os.PathLike, norm: str | None = None) -> Path:
    """Export ``src`` (anything :func:`read_ast` reads) as a Hugging Face AST directory ``out``.

    A fine-tuned classifier becomes an ``ASTForAudioClassification`` (loadable with
    ``ASTForAudioClassification.from_pretrained(out)`` and ``pipeline("audio-classification", model=out)``),
    an encoder (SSAST pretraining, official checkpoints) an ``ASTModel``.

    Raises:
        HFFormatError: naming everything the format cannot hold (see the module docstring).
    """
    if Path(out).exists() and not Path(out).is_dir():
        raise HFFormatError(f"--out {out} is a file, not a directory: an HF model is a folder (config.json, "
                            f"model.safetensors, ...); name a new or an empty folder")
    weights = Path(out) / WEIGHTS_FILE
    if weights.exists() and not is_hf_directory(out) and not _hf_weights(weights):  # e.g. --out the run directory
        raise HFFormatError(f"--out {out} holds a {WEIGHTS_FILE} that is no Hugging Face model's (a run's or an "
                            f"export's of this package), which the export would replace; name a new or an empty "
                            f"folder")
    model, problems = read_ast(src, norm)
    problems += _format_problems(model)
    if problems:
        raise HFFormatError(f"cannot export {model.source} to the Hugging Face AST format: {'; '.join(problems)}")
    return write_hf_directory(model, out)


def classify(model_dir: str | os.PathLike, waveform: np.ndarray | torch.Tensor | Sequence[float], sample_rate: int,
             top_k: int = 5) -> list[dict]:
    """Top labels of one waveform through ``transformers``' ``audio-classification`` pipeline.

    Args:
        model_dir: an ``ASTForAudioClassification`` directory (e.g. written by :func:`export_hf`).
        waveform: 1-D float samples in [-1, 1] (a numpy array, a tensor or a list); resampled by the pipeline when
            ``sample_rate`` differs.
        sample_rate: Hz of ``waveform``.
        top_k: labels to return.

    Returns:
        ``[{"label": ..., "score": ...}]``, best first (the pipeline's answer).

    Raises:
        ValueError: integer samples (scale them to [-1, 1]), complex ones, or not one channel.
        FileNotFoundError: ``model_dir`` is no folder with a ``config.json``: ``transformers`` would take the
            name for a Hub repository and download it (``runs/xyz`` from the account ``runs``); only a local
            folder is read.
    """
    import inspect

    samples = check_waveforms(waveform.detach().cpu() if isinstance(waveform, torch.Tensor) else waveform, "classify")
    if samples.dim() != 1:
        raise ValueError(f"classify takes one waveform [S], got shape {tuple(samples.shape)}; pass one clip's "
                         f"channel, w[0], or w.mean(0)")
    if not is_hf_directory(model_dir):
        what = "holds no config.json" if Path(model_dir).is_dir() else "does not exist"
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model folder ({what}); classify reads a local "
                                f"folder (c2f-hf export writes one), never a Hub repository")
    transformers = _transformers()
    classifier = transformers.pipeline("audio-classification", model=str(model_dir), device="cpu")
    multi_label = classifier.model.config.problem_type == "multi_label_classification"
    if multi_label and "function_to_apply" not in inspect.signature(classifier.postprocess).parameters:
        raise TransformersMissing(f"transformers {transformers.__version__}'s audio-classification pipeline scores "
                                  f"every model with a softmax; {model_dir} is multi-label (sigmoid scores): "
                                  f"pip install -U transformers")
    return classifier({"raw": samples.float().numpy(), "sampling_rate": int(sample_rate)},
                      top_k=top_k)


# ------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("c2f-hf"), description="Hugging Face transformers interop for AST models (also: python -m "
                                   "common.models.hf_export).",
        epilog="example: c2f-hf export runs/finetune/esc50-baseline/fold1 --out esc50_ast_hf  "
               "(start from an HF directory with: python finetune/run.py --init DIR --task NAME)")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser(
        "export", help="write a model as an HF AST directory",
        description="Write a fine-tuned classifier as an ASTForAudioClassification directory, or an encoder "
                    "(SSAST pretraining, official .pth) as an ASTModel directory: config.json, model.safetensors, "
                    "preprocessor_config.json (the run's normalisation statistics, sampling rate, mel bins, "
                    "max_length). Mean-pooled classifiers, compressed phases, non-square patches, models without "
                    "exactly 2 prefix tokens and HTS-AT models are refused with the reason.")
    export.add_argument("src", help="a run directory, an export, an official SSAST/AST .pth, or an HF AST directory")
    export.add_argument("--out", required=True, type=Path, help="the HF model directory to write")
    export.add_argument("--norm", default=None,
                        help="normalisation statistics (a name such as audioset, or a stats JSON file); needed for "
                             "official .pth files, replaces the run's otherwise")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 on bad input, 141 when the output's reader went away)."""
    args = build_parser().parse_args(argv)
    with process_logging():  # its basicConfig is the command's: a caller's logging is given back as it was
        return piped(lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        out = export_hf(args.src, args.out, args.norm)
    except (TransformersMissing, ValueError, OSError) as err:
        from common.system.disk import describe_os_error

        message = describe_os_error(err) if isinstance(err, OSError) else str(err)
        if message is None:
            raise
        print(f"error: {error_line(message)}", file=sys.stderr)
        return 2
    config = json.loads((out / CONFIG_FILE).read_text())
    kind = config["architectures"][0]
    labels = f" with {len(config['id2label'])} labels" if kind == "ASTForAudioClassification" else ""
    print(f"exported {kind}{labels} to {out}/ ({CONFIG_FILE}, {WEIGHTS_FILE}, {PREPROCESSOR_FILE})")
    if labels:
        print(f'use: transformers.pipeline("audio-classification", model="{out}")({{"raw": wave, '
              f'"sampling_rate": sr}})')
    return 0


if __name__ == "__main__":
    sys.exit(main())
