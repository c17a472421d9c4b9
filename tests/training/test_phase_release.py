"""Nothing of a phase outlives it: at a phase change the old engine, its optimizer state (Adam's moments,
ZeRO's fp32 partitions) and the old model's parameters are freed before the next phase's engine is built."""

from __future__ import annotations

import weakref

import pytest
import torch

from common.training.loop import Trainer
from common.training.release import _optimizers
from tests.helpers import run

pytestmark = pytest.mark.slow  # end-to-end: every test here trains, launches or exports


def _state_tensors(engine) -> list[torch.Tensor]:
    found = []
    for opt in _optimizers(engine.optimizer):
        for state in getattr(opt, "state", {}).values():
            found += [v for v in state.values() if torch.is_tensor(v)]
        found += list(getattr(opt, "single_partition_of_fp32_groups", []))  # ZeRO's fp32 master partitions
    return found


@pytest.mark.parametrize("stage", [0, 1])
def test_a_phase_change_frees_the_old_engine_parameters_and_optimizer_state(tmp_path, synth_corpus, monkeypatch,
                                                                            stage):
    old: dict[str, list[weakref.ref]] = {}
    seen_at_phase_2: dict[str, int] = {}
    end_phase, engine_of = Trainer._end_phase, Trainer._engine

    def end_and_watch(self, engine, index):
        done = end_phase(self, engine, index)
        if index == 0:
            old["parameters"] = [weakref.ref(p) for p in engine.module.parameters()]
            old["optimizer state"] = [weakref.ref(t) for t in _state_tensors(engine)]
            old["engine"] = [weakref.ref(engine)]
        return done

    def check_then_build(self, model, index, resume_tag=None):
        if index == 1:
            seen_at_phase_2.update({k: sum(r() is not None for r in refs) for k, refs in old.items()})
        return engine_of(self, model, index, resume_tag)

    monkeypatch.setattr(Trainer, "_end_phase", end_and_watch)
    monkeypatch.setattr(Trainer, "_engine", check_then_build)
    assert run(tmp_path / "run", synth_corpus, f"train.zero_stage={stage}") == 0
    assert len(old["parameters"]) > 4 and len(old["optimizer state"]) >= (1 if stage else 8)
    assert seen_at_phase_2 == {"parameters": 0, "optimizer state": 0, "engine": 0}


def test_the_released_model_keeps_its_weights_and_no_hook(tmp_path):
    from deepspeed.utils import debug

    from common.system.distributed import init_distributed
    from common.training.optim import OptimConfig, build_engine
    from common.training.release import release_engine

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    engine = build_engine(model, OptimConfig(warmup_steps=0), 1e-2, 4, 0, init_distributed().device)
    engine.backward(engine(torch.randn(4, 8)).square().mean())
    engine.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert model._forward_pre_hooks and model._forward_hooks and len(debug.param_names)
    released = release_engine(engine)
    assert released is model and not model._forward_pre_hooks and not model._forward_hooks
    assert len(debug.param_names) == 0 and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert model(torch.randn(2, 8)).shape == (2, 2)  # a plain module again
