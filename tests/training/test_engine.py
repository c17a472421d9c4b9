"""The DeepSpeed engine as the trainer builds it: ``train.precision: bf16`` computes the training forward in
bf16, and a step does not wait for the device.

DeepSpeed's forward turns off an autocast its config does not name; before the engine named it, a bf16 run
trained in fp32 (found by ``bench.gpu_check`` on an H200: 6x slower, 1.6x the memory). The CPU has bf16
autocast too, so the path is tested here; DeepSpeed looks for an outer autocast with
``torch.is_autocast_enabled()``, which without an argument asks about CUDA, so on the CPU the fixture below
makes it ask about the CPU, as it asks about the GPU on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.system.distributed import init_distributed
from common.training.optim import OptimConfig, build_engine
from tests.helpers import TINY, _synth_root, sets


@pytest.fixture(autouse=True)
def autocast_seen_as_on_a_gpu(monkeypatch):
    real = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: real(device_type or "cpu"))


def _linear_output_dtypes(model: nn.Module, seen: list[torch.dtype]) -> None:
    def hook(module, args, output):
        if module.training:
            seen.append(output.dtype)

    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(hook)


def test_the_engine_keeps_the_runs_autocast():
    dist = init_distributed()
    seen: list[torch.dtype] = []
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    _linear_output_dtypes(model, seen)
    engine = build_engine(model, OptimConfig(), 1e-3, 4, 0, dist.device, autocast_dtype=torch.bfloat16)
    with torch.autocast(dist.device.type, dtype=torch.bfloat16):
        loss = engine(torch.randn(4, 8)).float().square().mean()
    engine.backward(loss)
    engine.step()
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 and p.grad is None or p.grad.dtype == torch.float32
               for p in model.parameters())  # the weights and their gradients stay fp32

    seen.clear()
    fp32 = build_engine(nn.Sequential(nn.Linear(8, 2)), OptimConfig(), 1e-3, 4, 0, dist.device)
    _linear_output_dtypes(fp32.module, seen)
    fp32(torch.randn(4, 8))
    assert seen == [torch.float32]


@pytest.mark.slow
def test_a_bf16_fine_tune_trains_in_bf16(tmp_path, synth_corpus, monkeypatch):
    import common.training.loop
    from finetune.run import main as finetune

    seen: list[torch.dtype] = []
    real = common.training.loop.build_engine

    def recording(model, *args, **kwargs):
        _linear_output_dtypes(model, seen)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(common.training.loop, "build_engine", recording)
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(_synth_root(tmp_path, synth_corpus)),
                     "--run-dir", str(tmp_path / "run"),
                     *sets(*TINY, "train.precision=bf16", "phases=[{compression: none, epochs: 1}]")]) == 0
    assert seen and set(seen) == {torch.bfloat16}


def test_a_step_does_not_wait_for_the_device(monkeypatch):
    """DeepSpeed's throughput timer synchronises the device twice per step unless it is turned off."""
    from deepspeed.accelerator import get_accelerator

    dist = init_distributed()
    accelerator = get_accelerator()
    waits = []
    monkeypatch.setattr(accelerator, "synchronize", lambda *args, **kwargs: waits.append(1))
    engine = build_engine(nn.Sequential(nn.Linear(8, 2)), OptimConfig(), 1e-3, 4, 0, dist.device)
    waits.clear()
    for _ in range(3):
        loss = engine(torch.randn(4, 8)).square().mean()
        engine.backward(loss)
        engine.step()
    assert waits == []


@pytest.mark.parametrize("accum", [1, 2])
def test_without_zero_the_gradients_are_clipped_by_torchs_rule_and_not_by_deepspeeds(monkeypatch, accum):
    """An engine without ZeRO clips with torch's multi-tensor clip_grad_norm_ (DeepSpeed's loops over the
    tensors), once per optimiser step: the update is that of Adam on the clipped sum of the micro-batches."""
    import deepspeed.runtime.engine

    from common.training.optim import step_engine

    def refused(*args, **kwargs):
        raise AssertionError("DeepSpeed clipped")

    monkeypatch.setattr(deepspeed.runtime.engine, "clip_grad_norm_", refused)
    dist = init_distributed()
    torch.manual_seed(0)
    model, twin = nn.Linear(8, 2), nn.Linear(8, 2)
    twin.load_state_dict(model.state_dict())
    cfg = OptimConfig(grad_clip=0.05, warmup_steps=0, grad_accum=accum)
    engine = build_engine(model, cfg, 1e-2, 4, 0, dist.device)
    reference = torch.optim.Adam(twin.parameters(), lr=1e-2, betas=cfg.betas, weight_decay=cfg.weight_decay)
    data = [torch.randn(4, 8) for _ in range(2 * accum)]
    for start in range(0, len(data), accum):
        for x in data[start:start + accum]:
            engine.backward(engine(x).square().mean())
            step_engine(engine)
            (twin(x).square().mean() / accum).backward()
        norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
        assert norm > 0.05  # the clip bites
        reference.step()
        reference.zero_grad()
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_without_zero_a_step_drops_every_gradient_without_walking_the_module_tree(monkeypatch):
    """After the optimiser step every gradient is None, as DeepSpeed's zero_grad leaves them, from a list of the
    parameters made with the engine (DeepSpeed's walks ``named_parameters`` at every step)."""
    from common.training.optim import step_engine

    dist = init_distributed()
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    engine = build_engine(model, OptimConfig(warmup_steps=0), 1e-2, 4, 0, dist.device)

    def walked(*args, **kwargs):
        raise AssertionError("the module tree was walked in a step")

    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    monkeypatch.setattr(type(model), "named_parameters", walked)
    for _ in range(2):
        engine.backward(engine(torch.randn(4, 8)).square().mean())
        step_engine(engine)
        assert all(p.grad is None for p in params)
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
