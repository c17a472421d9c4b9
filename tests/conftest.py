"""Shared fixtures: tiny models and generated signals, CPU only, deterministic."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.helpers import real_looking_signals, tiny_classifier_file  # noqa: F401

# `make test` runs two pytest workers (pytest-xdist) on the 2-core machine: one thread each, or their OpenMP
# threads spin against each other; a single pytest process uses both cores.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)


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
    from common.system.logger import process_logging  # lazy: as the fixtures above import what they use

    with process_logging():  # what an entry point called from Python does itself, for the helpers that do not
        yield


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """A test that joins the process group without leaving it (init_distributed() to build an engine) must not hand
    it to the next test of the worker: a run adopts a group it finds and leaves it to its maker (Dist.owned), so the
    next tests would run in this one's."""
    yield
    import torch  # lazy: as the fixtures above import what they use

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from common.system.distributed import Dist  # lazy: as above

        Dist(0, 1, 0, torch.device("cpu")).teardown(synchronise=False)


@pytest.fixture(autouse=True)
def _clip_cache_without_reserve(monkeypatch):
    """The disk clip cache leaves 10 % of its file system free (common.data.cache); a test machine whose disk is
    fuller would otherwise cache nothing. The test of the reserve sets it again."""
    monkeypatch.setattr("common.data.cache.RESERVE_MAX", 0)


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


@pytest.fixture
def model_file(tmp_path):
    """``model_file(loss)``: a tiny AST classifier export with 3 classes."""
    return lambda loss: tiny_classifier_file(tmp_path, loss)
