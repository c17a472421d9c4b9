"""Evaluating exported classifiers; as a command, a model's scores on labelled manifests.

An export carries its architecture and the front end it was trained with (audio settings and the
compression of its last phase), so the features are made exactly as in training: the same clips, crop and
padding as its validation, every clip once, in float32.

    python finetune/evaluate.py --ckpt runs/finetune/voxceleb-baseline data/voxceleb/voxceleb_test.jsonl.gz
    python finetune/evaluate.py --ckpt runs/finetune/esc50-baseline/fold1 data/esc50/esc50_fold1.jsonl.gz --json

It prints ``acc``, ``mAP`` and ``mAUC`` and the clips scored; unreadable clips are skipped, named and counted
(exit status 1 when some were). The front end and the scores are ``finetune/inference.py``'s, which predict, embed
and the ONNX export share. Its imports wait in the functions that need them: --help answers without loading torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from common.cli import command_device, run_main
from common.system import jsonfile
from common.system.logger import progress, setup_logging
from common.system.prog import DEVICE_HELP, prog, whole_number

if TYPE_CHECKING:
    import torch
    from torch import nn

    from common.system.distributed import Dist

__all__ = ["evaluate_export"]


def evaluate_export(path: str | Path, manifests: Sequence[str], classes: Sequence[str] | None = None,
                    batch_size: int = 32, num_workers: int = 2, device: str | torch.device = "cpu", tracker=None,
                    show_progress: bool = False, loaded: tuple[nn.Module, dict] | None = None,
                    dist: Dist | None = None) -> dict[str, float]:
    """mAP / accuracy of an exported classifier on ``manifests``; ``classes``: the task's class list, which must be
    the export's (None: the export's own); ``tracker`` counts bad and resampled clips (a run's
    :class:`~common.data.bad_audio.BadAudioTracker` split, or a fresh one without a limit); ``loaded``: what
    :func:`~finetune.classifier.load_classifier` gave for ``path`` (not read again); ``dist``: the ranks of a
    training job, which score a share of the clips each (every clip once, as validation spreads them) and all
    return the metrics of the whole set (None: this process alone).

    The metrics end with ``clips`` (scored) and ``bad_clips`` (skipped as bad audio in this pass, every rank's),
    which ``c2f-evaluate`` and a fine-tuning run's ``test_metrics.json`` give alike; ``tracker`` judges the share
    skipped with its limit at the end of the pass (:class:`~common.data.bad_audio.TooMuchBadAudio`)."""
    import torch

    from common.data.bad_audio import BadAudioTracker
    from common.data.loader import eval_loader
    from common.metrics import compute_metrics
    from finetune.classifier import load_classifier, metric_scores
    from finetune.inference import clip_for_export, clip_handling, predict_logits

    model, meta = loaded or load_classifier(path)
    classes = list(meta["classifier"]["classes"]) if classes is None else classes
    if list(meta["classifier"]["classes"]) != list(classes):
        raise ValueError(f"{path} was trained on other classes than the task's class list")
    model.to(device)
    sample_rate, clip_samples = clip_for_export(meta)
    clips = clip_handling(meta)
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    tracker = tracker if tracker is not None else BadAudioTracker(1.0, split="eval")
    bad_before = tracker.bad  # a run's tracker may have counted this split before (a test scored again)
    loader = eval_loader(manifests, classes, clip_samples, sample_rate, batch_size, num_workers, crop=clips["crop"],
                         pad=clips["pad"], tracker=tracker, channels=clips["channels"], rank=rank,
                         world_size=world_size)
    scores, targets = [], []
    bar = progress(loader.estimated_batches_per_epoch(), 0, f"scoring {Path(manifests[0]).name}", show_progress,
                   unit="batch")
    for batch in loader.batches(epochs=1):
        bar.update(1)
        if len(batch):
            logits = predict_logits(model, meta, batch.waveforms.to(device), batch.lengths.to(device))
            scores.append(metric_scores(logits).cpu())  # as validation scores them
            targets.append(batch.targets.clone())  # not the batch's own: it would keep the batch to the end
    bar.close()
    parts = dist.gather_objects((scores, targets)) if dist is not None else [(scores, targets)]
    scores, targets = [s for p in parts for s in p[0]], [t for p in parts for t in p[1]]
    if not scores:
        raise ValueError(f"no usable clip in {', '.join(map(str, manifests))}")
    metrics = compute_metrics(torch.cat(targets).numpy(), torch.cat(scores).numpy())
    metrics["clips"] = sum(len(t) for t in targets)
    metrics["bad_clips"] = tracker.bad - bad_before  # every rank's: settled at the end of the pass (tracker.check)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("finetune/evaluate.py"),
        description="Score a fine-tuned model on labelled manifests (the clips, crop and padding of its own "
                    "validation; every clip once): accuracy, mAP and mAUC. Unreadable clips are skipped and "
                    "named; the exit status is then 1.",
        epilog="example: python finetune/evaluate.py --ckpt runs/finetune/synth-baseline "
               "data/synth/synth_test.jsonl.gz")
    parser.add_argument("--ckpt", required=True,
                        help="a fine-tuning run directory (its model.safetensors: the final or weight-averaged "
                             "model; RUN/export/best.safetensors is the best epoch), a classifier export, or a "
                             "Hugging Face AST directory")
    parser.add_argument("manifests", nargs="+", metavar="MANIFEST",
                        help="Lhotse cut manifests whose clips carry labels of the model's classes "
                             "(c2f-corpora prepare writes them)")
    parser.add_argument("--batch-size", type=whole_number(1, "of clips >= 1"), default=32,
                        help="clips per forward pass (default 32)")
    parser.add_argument("--workers", type=whole_number(0, ">= 0 (0: decode in this process)"), default=2,
                        help="decoding processes (default 2; 0: this one)")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from common.data.bad_audio import BadAudioTracker
        from common.data.preflight import check_labels
        from common.models.exports import resolve_model_file
        from common.models.hf import is_hf_directory
        from common.system.distributed import single_process
        from finetune.classifier import load_classifier

        single_process("c2f-evaluate")
        setup_logging(None)
        device = command_device(args.device)
        model = args.ckpt if is_hf_directory(args.ckpt) else resolve_model_file(args.ckpt)
        loaded = load_classifier(model)
        meta = loaded[1]
        # one label per clip where accuracy scores it (it counts an unlabeled clip as class 0), as fine-tuning asks:
        # a cross-entropy model, or one trained with BCE for accuracy (VGGSound's, SpeechCommands' defaults)
        single_label = meta.get("metric") == "acc" or meta.get("loss", "ce") == "ce"
        for manifest in args.manifests:  # every clip's labels among the model's classes, before any decoding
            if not Path(manifest).is_file():
                raise FileNotFoundError(f"no manifest at {manifest}")
            check_labels(manifest, manifest, list(meta["classifier"]["classes"]), single_label)
        tracker = BadAudioTracker(1.0, split="eval", source=args.manifests)
        metrics = evaluate_export(model, args.manifests, None, args.batch_size, args.workers, device, tracker,
                                  show_progress=True, loaded=loaded)
        if args.json:
            print(jsonfile.dumps({"model": str(model), "manifests": list(args.manifests), **metrics}, indent=1))
        else:
            print(f"{model} on {', '.join(args.manifests)}: acc={metrics['acc']:.4f} mAP={metrics['mAP']:.4f} "
                  f"mAUC={metrics['mAUC']:.4f} ({int(metrics['clips'])} clips)")
        if metrics["bad_clips"]:  # each one was named as it was skipped
            print(f"error: {metrics['bad_clips']} clips could not be read and were skipped", file=sys.stderr)
        return 1 if metrics["bad_clips"] else 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
