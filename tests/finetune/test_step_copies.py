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
