"""Shared fixtures: tiny models and generated signals, CPU only, deterministic."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)


def real_looking_signals(batch: int = 3, seconds: float = 2.0, sr: int = 16000, seed: int = 0) -> torch.Tensor:
    """Different signals per row: a harmonic tone with vibrato, noise bursts, a chirp, speech-like AM noise."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sr)
    t = torch.arange(n) / sr
    out = []
    for i in range(batch):
        kind = i % 4
        if kind == 0:
            f0 = 220 + 30 * torch.sin(2 * math.pi * 5 * t)
            phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
            x = sum(0.3 / k * torch.sin(k * phase) for k in range(1, 6))
        elif kind == 1:
            env = (torch.sin(2 * math.pi * 3 * t) > 0.3).float()
            x = 0.2 * env * torch.randn(n, generator=g)
        elif kind == 2:
            x = 0.4 * torch.sin(2 * math.pi * (100 + 1500 * t / seconds) * t)
        else:
            x = 0.3 * torch.randn(n, generator=g) * (0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t))
        out.append(x + 0.01 * torch.randn(n, generator=g))
    return torch.stack(out).float()


@pytest.fixture
def signals() -> torch.Tensor:
    return real_looking_signals()


@pytest.fixture
def tiny_cfg():
    from common.models.ast.encoder import EncoderConfig

    return EncoderConfig(embed_dim=32, depth=2, num_heads=2, num_mel_bins=32, input_tdim=64,
                         fshape=8, tshape=8, fstride=8, tstride=8)


@pytest.fixture(autouse=True)
def _root_logging():
    """Each test starts with the root logger as it found it: an entry point run in-process installs its
    console handler and level (common.system.logger.setup_logging), which must not leak into the next test."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory):
    """The built-in corpus at its test size (24 pool clips, 2/1/1 labeled clips per class)."""
    from common.data.corpora import get_corpus

    out = tmp_path_factory.mktemp("synth")
    get_corpus("synth").prepare(None, out, size="test", seed=0)
    return out
