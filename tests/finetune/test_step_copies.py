"""No host waits in a fine-tuning step: the augmentations draw on the host's generator (a resumed run draws what
an uninterrupted one does) and reach the device without a blocking copy (pinned, ``non_blocking``, on a GPU;
``common.system.device.to_device``): mixup on the waveform (AST) or the spectrogram (HTS-AT), SpecAugment, SSAST's
fbank noise and roll, HTS-AT's stripes."""

from __future__ import annotations

import pytest

from finetune.run import main as finetune
from tests.helpers import TINY, TINY_HTSAT, _synth_root, blocking_copies, sets

pytestmark = pytest.mark.slow  # each case fine-tunes


@pytest.mark.parametrize("family", ["ast", "htsat"])
def test_an_augmented_fine_tuning_step_makes_no_blocking_copy(tmp_path, synth_corpus, monkeypatch, family):
    from common.training.loop import Trainer

    data = _synth_root(tmp_path, synth_corpus)
    model = TINY if family == "ast" else [*TINY_HTSAT]
    augment = (["augment.freqm=8", "augment.timem=16", "augment.mixup=1.0", "augment.noise=true"]
               if family == "ast" else
               ["augment.mixup=1.0", "augment.mixup_on=spectrogram", "augment.mixup_targets=unmixed"])
    argv = ["--init", "none", "--task", "synth", "--data-root", str(data), "--run-dir", str(tmp_path / "run"),
            "--stop-after-steps", "3", *sets(*model, *augment, "phases=[{compression: none, epochs: 1}]")]
    with blocking_copies(monkeypatch, (Trainer, "_micro_step")) as found:
        assert finetune(argv) == 0
    assert found["calls"] == 3 and found["copies"] == []


def test_a_host_tensor_goes_to_a_cuda_device_pinned_and_non_blocking(monkeypatch):
    """What makes the copies above wait for nothing on a GPU (no GPU here: the calls are recorded): pinned host
    memory, then ``non_blocking``; nothing is pinned for a CPU device."""
    import torch

    from common.system.device import to_device

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: calls.append(kw) or self)
    to_device(torch.zeros(3), "cuda", torch.float16)
    assert calls == ["pin", {"device": torch.device("cuda"), "dtype": torch.float16, "non_blocking": True}]
    calls.clear()
    to_device(torch.zeros(3), "cpu")
    assert calls == [{"device": torch.device("cpu"), "dtype": None, "non_blocking": True}]
