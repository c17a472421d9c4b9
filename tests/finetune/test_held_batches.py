"""A pass over an evaluation set keeps none of its batches. A kept view of a batch's targets held the batch's
shared memory (with loader workers, one open file per batch until the pass ended: a validation of AudioSet's 20,371
clips stopped at the 1,024 open files a machine commonly allows; without workers, the batch's memory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from common.data.clips import Batch
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.system.distributed import Dist
from finetune.classifier import AugmentConfig, Classifier, ClassifierObjective, load_classifier
from tests.helpers import tiny_classifier_file

BATCHES = 40
pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc/self/fd")


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


class SharedLoader:
    """Batches as the loader's workers hand them over: each batch's tensors in shared memory of their own (an open
    file each); ``grown``: the files still open at the end of the pass, over those at its start."""

    def __init__(self, samples: int, classes: int = 3) -> None:
        self.samples, self.classes, self.grown = samples, classes, None

    def estimated_batches_per_epoch(self) -> int:
        return BATCHES

    def batches(self, epochs: int = 1):
        start = _open_files()
        for i in range(BATCHES):
            targets = torch.zeros(2, self.classes)
            targets[:, i % self.classes] = 1
            yield Batch(torch.randn(2, self.samples).share_memory_(), torch.full((2,), self.samples),
                        targets.share_memory_(), [f"c{i}-0", f"c{i}-1"])
        self.grown = _open_files() - start


def test_validation_keeps_no_batch():
    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=64)
    objective = ClassifierObjective(["a", "b", "c"], "acc", "ce", AugmentConfig())
    loader = SharedLoader(16)
    with torch.no_grad():  # as the trainer validates
        metrics = objective.evaluate(Classifier(ASTEncoder(cfg), 3).eval(), loader.batches(),
                                     lambda w, n: torch.randn(len(w), 64, 128), Dist(0, 1, 0, torch.device("cpu")),
                                     torch.Generator().manual_seed(0))
    assert metrics["clips"] == 2 * BATCHES
    assert loader.grown < BATCHES // 4  # one per batch while the targets' views were kept


def test_scoring_an_export_keeps_no_batch(tmp_path, monkeypatch):
    import finetune.evaluate
    import finetune.inference

    path = tiny_classifier_file(tmp_path, "ce")
    loaded = load_classifier(path)
    loader = SharedLoader(finetune.inference.clip_for_export(loaded[1])[1])
    monkeypatch.setattr("common.data.loader.eval_loader", lambda *a, **k: loader)
    metrics = finetune.evaluate.evaluate_export(path, ["unused.jsonl.gz"], ["a", "b", "c"], loaded=loaded)
    assert metrics["clips"] == 2 * BATCHES
    assert loader.grown < BATCHES // 4


def test_the_probes_features_keep_no_batch(monkeypatch):
    import common.data.loader
    from common.models.arch import architecture_for
    from finetune.linear_probe import extract_features

    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=64)
    arch = architecture_for(cfg)
    loader = SharedLoader(arch.clip_samples)
    monkeypatch.setattr(common.data.loader, "eval_loader", lambda *a, **k: loader)
    monkeypatch.setattr("common.data.manifests.count_clips", lambda manifest: BATCHES)
    features, targets = extract_features(ASTEncoder(cfg).eval(), arch, ["unused.jsonl.gz"], ["a", "b", "c"])
    assert features.shape == (2 * BATCHES, 32) and targets.shape == (2 * BATCHES, 3)
    assert loader.grown < BATCHES // 4
