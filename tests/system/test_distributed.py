"""A one-process run joins its process group without a port picked ahead (the store lives in the process);
several processes still meet at MASTER_ADDR:MASTER_PORT."""

from __future__ import annotations

import os

import torch

from common.system.distributed import init_distributed


def _store():
    """The default group's store under its prefixes."""
    store = torch.distributed.distributed_c10d._get_default_store()
    while isinstance(store, torch.distributed.PrefixStore):
        store = store.underlying_store
    return store


def test_one_process_on_the_cpu_uses_a_store_in_the_process_and_no_master_port(monkeypatch):
    for key in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for _ in range(2):  # a second run in the same process (a notebook, the demo) joins afresh
        dist = init_distributed()
        try:
            store = _store()
            assert isinstance(store, torch.distributed.HashStore), type(store)
            assert "MASTER_PORT" not in os.environ
            assert (dist.rank, dist.world_size) == (0, 1)
            assert dist.all_reduce_sum(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]
            assert dist.broadcast_object({"a": 1}) == {"a": 1}
        finally:
            dist.teardown()
        assert not torch.distributed.is_initialized()


def test_a_given_master_port_is_used(monkeypatch):
    from tests.helpers import _free_port

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist = init_distributed()
    try:
        store = _store()
        assert isinstance(store, torch.distributed.TCPStore), type(store)
        assert store.port == int(os.environ["MASTER_PORT"])
    finally:
        dist.teardown()


def test_several_ranks_without_a_rendezvous_are_refused_at_once(monkeypatch):
    """Each rank would pick a port of its own and wait for the others until the group's timeout (30 minutes)."""
    import pytest

    for key in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set: start several ranks "
                                         "with a launcher"):
        init_distributed()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but MASTER_PORT not set"):
        init_distributed()
    assert not torch.distributed.is_initialized()
