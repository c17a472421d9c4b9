"""ONNX export of a fine-tuned classifier: waveforms in, class scores out, runnable without PyTorch.

    python -m finetune.onnx_export runs/finetune/esc50-baseline/fold1 --out esc50.onnx    # (or: c2f-onnx ...)
    python examples/onnx_classify.py esc50.onnx dog.wav                          # numpy + onnxruntime only

Any classifier that ``finetune/predict.py --ckpt`` loads is exported (a run directory, a classifier export
of any phase, an official HTS-AT checkpoint, a Hugging Face AST directory): the AST family (AST and SSAST
encoders with their pooled LayerNorm + Linear head) and HTS-AT (its token-semantic head). The graph is::

    waveforms [batch, clip_samples] float32, lengths [batch] int64  ->  scores [batch, classes] float32

- the front end is inside the graph, for every architecture and phase: the AST family's Kaldi fbank
  (centred on each clip's own mean, frames past ``lengths`` zeroed, cut / padded to the model's frames,
  ``(x - mean) / (2 std)``, the phase's frame shift or pooling) and HTS-AT's STFT + slaney mel in dB;
  so a caller feeds audio at ``sample_rate``, each row zero-padded to ``clip_samples`` with its valid
  samples in ``lengths``, exactly as ``finetune/predict.py`` batches its windows;
- ``scores`` are sigmoid outputs for models trained with BCE (multi-label) and softmax otherwise, the
  scores ``predict.py --json`` prints; the batch axis is dynamic, ``clip_samples`` is fixed;
- the model's metadata (ONNX ``metadata_props``, key :data:`META_KEY`, a JSON object) holds the class ids
  and display names, the sample rate, the clip length, how a long file's windows aggregate (``max`` for
  BCE, ``mean`` for softmax) and a description of the front end in the graph (its settings and
  normalisation statistics), so a reader needs nothing else (``examples/onnx_classify.py``).

The exporter is ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript): the TorchScript exporter
(``dynamo=False``) stops at both front ends (no translation of ``aten::fft_rfft``, the Kaldi fbank's FFT; its
``stft`` rejects the complex STFT HTS-AT takes), so with it the front end could not be in the graph; the dynamo
graph gives the same scores as PyTorch to about 1e-7. Before anything is written the graph is run with
onnxruntime (when installed) on a batch of two clips, one of them padded, and refused if a score differs from
PyTorch's by more than :data:`TOLERANCE`; the file is written atomically. What cannot be exported (an encoder
without a classification head, a model the exporter cannot trace) is refused with the reason in one line.
Needs ``pip install 'coarse2fine-ast[onnx]'`` (onnx, onnxruntime, onnxscript).

Measured on 2 shared CPU cores (torch 2.11, onnxruntime 1.32): the AudioSet-size AST (527 classes, 1024
frames) exports in about 2 minutes to 332 MiB, the official-size HTS-AT in about 3 minutes to 120 MiB, both
with onnxruntime = PyTorch within 3e-7 on the check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from common.system.logger import process_logging
from common.system.prog import error_line, prog, whole_number
from common.system.signals import piped

if TYPE_CHECKING:
    import torch
    from torch import nn

# Imports the command alone needs are inside its functions: --help answers without loading torch.

__all__ = ["INSTALL_HINT", "META_KEY", "META_FORMAT", "OPSET", "TOLERANCE", "OnnxExportError", "scoring_graph",
           "onnx_metadata", "export_onnx", "read_onnx_metadata", "main"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'coarse2fine-ast[onnx]' (in a checkout: pip install -e '.[onnx]')"
META_KEY = "coarse2fine_ast"
META_FORMAT = "coarse2fine-ast-onnx/1"
OPSET = 18
TOLERANCE = 1e-4  # largest score difference between the graph (onnxruntime) and PyTorch that is accepted
INPUTS = ("waveforms", "lengths")
OUTPUTS = ("scores",)


class OnnxExportError(ValueError):
    """A model that cannot be exported to ONNX (the message says why, in one line), or missing packages."""


def scoring_graph(model: nn.Module, meta: dict) -> nn.Module:
    """What the ONNX graph computes: ``(waveforms [B, S], lengths [B]) -> scores [B, K]``.

    The evaluation front end the export was trained with (``finetune.inference.pipeline_for_export``), the
    classifier and its score function (``finetune.classifier.class_scores``), as ``predict.py`` chains them.
    (A module made here, not at the top: the command's --help answers without loading torch.)
    """
    from torch import nn

    from finetune.classifier import class_scores
    from finetune.inference import pipeline_for_export

    class ScoringGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pipeline = pipeline_for_export(meta)
            self.model = model
            self.loss = meta.get("loss", "ce")

        def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return class_scores(self.model(self.pipeline(waveforms, lengths)), self.loss)

    return ScoringGraph()


def _front_end(meta: dict, pipeline: nn.Module) -> dict:
    """The front end inside the graph, in words a reader can check (settings and statistics)."""
    phase = {"compression": meta.get("phase", {}).get("compression", "none"),
             "factor": meta.get("phase", {}).get("factor", 1)}
    if meta.get("arch", "ast") == "htsat":
        front = pipeline.frontend
        cfg = front.cfg
        return {"kind": "htsat_logmel", "in_graph": True, "n_fft": cfg.n_fft, "hop_length": front.geom.hop_length,
                "window": "periodic hann", "center": True, "pad_mode": "reflect", "mel_bins": cfg.mel_bins,
                "fmin": cfg.fmin, "fmax": cfg.fmax, "mel_scale": "slaney", "output": "10 log10(max(mel power, 1e-10))",
                "frames": front.geom.stft_frames, "phase": phase}
    fbank = pipeline.fbank
    return {"kind": "kaldi_fbank", "in_graph": True, "frame_length_ms": fbank.frame_length_ms,
            "frame_shift_ms": fbank.frame_shift_ms, "num_mel_bins": fbank.num_mel_bins, "window": "hanning",
            "dither": 0.0, "htk_compat": True, "use_energy": False, "frames": pipeline.frames,
            "norm": {"name": pipeline.audio.norm, "mean": pipeline.stats.mean, "std": pipeline.stats.std,
                     "formula": "(fbank - mean) / (2 * std)"},
            "phase": phase}


def onnx_metadata(meta: dict, graph: nn.Module, source: str) -> dict:
    """The JSON object stored under :data:`META_KEY`: labels, audio settings, aggregation, front end."""
    from finetune.inference import clip_for_export, clip_handling
    from finetune.predict import aggregate_rule

    rate, clip = clip_for_export(meta)
    loss = meta.get("loss", "ce")
    handling = clip_handling(meta)
    pad = handling["pad"]
    return {"format": META_FORMAT, "source": source, "arch": meta.get("arch", "ast"),
            "classes": list(meta["classifier"]["classes"]), "class_names": dict(meta.get("class_names", {})),
            "sample_rate": rate, "clip_samples": clip, "loss": loss,
            "scores": "sigmoid" if loss == "bce" else "softmax", "aggregate": aggregate_rule(meta), "pad": pad,
            "channels": handling["channels"],
            "inputs": {"waveforms": f"[batch, {clip}] float32 at {rate} Hz, each row zero-padded to {clip} samples"
                                    + (" (a clip shorter than that repeated to it first, as the model was "
                                       "validated: pad 'repeat')" if pad == "repeat" else ""),
                       "lengths": "[batch] int64, the valid samples of each row"},
            "outputs": {"scores": f"[batch, {len(meta['classifier']['classes'])}] float32, one column per class"},
            "front_end": _front_end(meta, graph.pipeline)}


def _require(name: str):
    try:
        return __import__(name)
    except ImportError as err:
        raise OnnxExportError(f"ONNX export needs {name}, which is not installed: {INSTALL_HINT}") from err


def _probe(clip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two deterministic clips: noise with a tone, and the same padded after a third (``lengths`` below)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    waves = 0.05 * torch.randn(2, clip, generator=gen) + 0.3 * torch.sin(0.17 * torch.arange(clip))
    lengths = torch.tensor([clip, max(1, clip // 3)])
    waves[1, lengths[1]:] = 0.0
    return waves.float(), lengths


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _trace(graph: nn.Module, example: tuple[torch.Tensor, torch.Tensor], opset: int):
    """The ONNX ModelProto of ``graph`` with a dynamic batch axis (the exporter's chatter silenced)."""
    import torch

    # dynamo=True: the TorchScript exporter cannot translate the front ends' FFT / complex STFT (module docstring)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, example, dynamo=True, opset_version=opset, input_names=list(INPUTS),
                                    output_names=list(OUTPUTS), dynamic_shapes=({0: batch}, {0: batch}),
                                    external_data=False, verbose=False)
    return program.model_proto


def _check(data: bytes, graph: nn.Module, example: tuple[torch.Tensor, torch.Tensor]) -> float | None:
    """Largest difference between onnxruntime's and PyTorch's scores on ``example`` (None without onnxruntime)."""
    import torch

    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: the graph was not run before writing it (%s)", INSTALL_HINT)
        return None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    waves, lengths = example
    ours = session.run(None, {"waveforms": waves.numpy(), "lengths": lengths.numpy()})[0]
    with torch.no_grad():
        ref = graph(waves, lengths).numpy()
    if ours.shape != ref.shape:
        raise OnnxExportError(f"the ONNX graph gives scores of shape {ours.shape}, PyTorch {ref.shape}")
    return float(abs(ours - ref).max())


def export_onnx(src: str | os.PathLike, out: str | os.PathLike, opset: int = OPSET) -> tuple[Path, dict]:
    """Export the classifier ``src`` (anything ``finetune.classifier.load_classifier`` loads) to ``out``.

    Returns:
        ``(out, metadata)``; ``metadata["check"]`` is the largest score difference to PyTorch on the probe
        batch (None when onnxruntime is not installed).

    Raises:
        OnnxExportError: one line saying what cannot be exported and why (nothing is written then).
    """
    from finetune.classifier import load_classifier
    from finetune.inference import clip_for_export

    out = Path(out)
    if out.is_dir():
        raise OnnxExportError(f"--out {out} is a directory; name the .onnx file to write")
    if opset < OPSET:  # torch's converter to older opsets fails on these graphs and leaves them at 18 unsaid
        raise OnnxExportError(f"--opset {opset}: the exporter writes these graphs at opset {OPSET} or higher")
    onnx = _require("onnx")
    _require("onnxscript")
    try:
        model, meta = load_classifier(src)
    except (ValueError, KeyError, TypeError) as err:
        raise OnnxExportError(f"cannot export {src} to ONNX: {str(err).splitlines()[0] if str(err) else err!r}") \
            from err
    graph = scoring_graph(model, meta).eval()
    _, clip = clip_for_export(meta)
    example = _probe(clip)
    try:
        proto = _trace(graph, example, opset)
    except Exception as err:  # noqa: BLE001 - whatever the tracer or a translation rejects
        log.debug("ONNX export of %s failed", src, exc_info=True)
        raise OnnxExportError(f"cannot export {src} to ONNX: the exporter failed: {_one_line(err)}") from err
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise OnnxExportError(f"--opset {opset}: the exporter wrote opset {written} instead; use --opset {written}")
    info = onnx_metadata(meta, graph, str(src))
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(info)
    proto.producer_name = "coarse2fine-ast"
    proto.doc_string = (f"{info['arch']} classifier of {len(info['classes'])} classes: waveforms "
                        f"[batch, {clip}] at {info['sample_rate']} Hz + lengths -> {info['scores']} scores; "
                        f"metadata key {META_KEY!r}")
    if proto.ByteSize() >= 2**31:
        raise OnnxExportError(f"cannot export {src} to ONNX: the model takes {proto.ByteSize() / 2**30:.1f} GiB, "
                              "more than one ONNX file holds (2 GiB)")
    data = proto.SerializeToString()
    diff = _check(data, graph, example)
    if diff is not None and not diff <= TOLERANCE:
        raise OnnxExportError(f"cannot export {src} to ONNX: the graph's scores differ from PyTorch's by {diff:.2e} "
                              f"(more than {TOLERANCE:g}); nothing written")
    onnx.checker.check_model(proto)
    from common.system.atomic import atomic_path, remove_orphans

    for left in remove_orphans(Path(out).parent, names=re.escape(Path(out).name)):  # a killed export of this file
        log.warning("removed %s, left by an export of %s that did not finish", left.name, out)
    with atomic_path(out, size=len(data)) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return out, {**info, "check": diff}


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The metadata :func:`export_onnx` stored in ``path`` (``ValueError`` naming the file if there is none)."""
    onnx = _require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.metadata_props:
        if entry.key == META_KEY:
            return json.loads(entry.value)
    raise ValueError(f"{path} is an ONNX model without this package's metadata ({META_KEY!r}); export it with "
                     "python -m finetune.onnx_export RUN --out FILE.onnx")


# ------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("python -m finetune.onnx_export"),
        description="Write a fine-tuned classifier (AST / SSAST with their head, or HTS-AT) as one ONNX file: "
                    "waveforms [batch, clip samples] + lengths [batch] -> class scores [batch, classes], the front "
                    "end inside the graph, a dynamic batch axis, the labels and audio settings in its metadata. "
                    "The graph is checked against PyTorch with onnxruntime before it is written.",
        epilog="example: python -m finetune.onnx_export runs/finetune/esc50-baseline/fold1 --out esc50.onnx && "
               "python examples/onnx_classify.py esc50.onnx dog.wav")
    parser.add_argument("src", help="a fine-tuning run directory, a classifier export, an official HTS-AT "
                                    "checkpoint or a Hugging Face AST directory")
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    opset = whole_number(OPSET, f">= {OPSET}, the lowest opset the exporter writes these graphs at")
    parser.add_argument("--opset", type=opset, default=OPSET, help=f"ONNX opset, {OPSET} or higher (default {OPSET})")
    return parser


def _example() -> str:
    """The torch-free example's path: ``examples/onnx_classify.py`` of a clone, or the copy an installed wheel carries
    beside its recipes (``share/coarse2fine-ast/examples``)."""
    from common.config.recipe import bundled_recipes  # lazy: read once, after an export

    recipes = bundled_recipes()
    found = recipes.parent / "examples" / "onnx_classify.py" if recipes is not None else None
    return str(found) if found is not None and found.is_file() else "examples/onnx_classify.py"


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 on bad input, 141 when the output's reader went away)."""
    args = build_parser().parse_args(argv)
    with process_logging():  # its basicConfig is the command's: a caller's logging is given back as it was
        return piped(lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        out, info = export_onnx(args.src, args.out, args.opset)
    except (OnnxExportError, FileNotFoundError, OSError) as err:
        from common.cli import describe_os_error

        message = str(err) if not isinstance(err, OSError) or isinstance(err, FileNotFoundError) \
            else describe_os_error(err)
        if message is None:
            raise
        print(f"error: {error_line(message)}", file=sys.stderr)
        return 2
    check = "" if info["check"] is None else f"; onnxruntime = PyTorch within {info['check']:.1e}"
    print(f"exported {info['arch']} classifier with {len(info['classes'])} classes to {out} "
          f"({out.stat().st_size / 2**20:.1f} MiB; input: {info['clip_samples']} samples at {info['sample_rate']} Hz, "
          f"front end in the graph; {info['scores']} scores{check})")
    print(f"use: python {_example()} {out} FILE.wav   (numpy + onnxruntime, no PyTorch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
