"""Memory per phase: the estimate against a measured peak on the CPU, the ledger, TensorBoard and the plan."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.cli import PLAN_NOT_READY
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.memory import PeakMemory, estimate_training_memory, saved_activation_bytes
from common.training.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh process: the estimate, then the measured growth of the resident set over 2 Adam steps.
MEASURE = """
import json, sys, torch
from common.models.memory import measure_training_peak
from common.models.ast.encoder import ASTEncoder, encoder_config
from finetune.classifier import AugmentConfig, ClassifierObjective
from pretrain.ssast import SSASTConfig, SSASTObjective
from common.cli import PLAN_NOT_READY
torch.manual_seed(0)
out = []
for kind, frames, batch in json.loads(sys.argv[1]):
    cfg = encoder_config("tiny", depth=3, input_tdim=frames)
    if kind == "ssast":
        objective = SSASTObjective(SSASTConfig())
        generator = torch.Generator().manual_seed(0)
        step = lambda model: model(torch.randn(batch, frames, 128), generator)["loss"]
    else:
        objective = ClassifierObjective([str(i) for i in range(10)], "acc", "ce", AugmentConfig())
        step = lambda model: objective.criterion(model(torch.randn(batch, frames, 128)), torch.full((batch, 10), 0.1))
    estimate = objective.memory_estimate(cfg, batch).total
    measured = measure_training_peak(lambda: objective.build_model(cfg), step, torch.device("cpu"))
    out.append([kind, frames, batch, estimate, measured])
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_the_estimate_is_within_10_percent_of_the_measured_cpu_peak():
    # the coarse (Fshift x4: 256 frames, 130 tokens) and the full (1024 frames, 514 tokens) phase of both objectives
    cases = [["ssast", 256, 8], ["ssast", 1024, 4], ["classifier", 256, 16], ["classifier", 1024, 8]]
    # glibc's allocator keeps freed blocks in its heap by a threshold it raises as it goes, which makes the
    # resident set wander by tens of per cent around the tensors it holds; a fixed threshold makes it track them
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind, frames, batch, estimate, measured in rows:
        assert 0.9 <= measured / estimate <= 1.1, (kind, frames, batch, estimate, measured)
    full, coarse = rows[1], rows[0]  # what the coarse phase saves shows in the estimate: 2x the batch, less memory
    assert coarse[3] < full[3]


@pytest.mark.slow
def test_the_estimate_counts_activations_from_the_token_count():
    cfg = EncoderConfig(embed_dim=64, depth=2, num_heads=2, num_mel_bins=32, input_tdim=64, fshape=8, tshape=8,
                        fstride=8, tstride=8)

    def step(model, n):
        return model(torch.randn(n, model.cfg.input_tdim, cfg.num_mel_bins)).mean()

    with torch.device("meta"):
        model = ASTEncoder(cfg)
        one, two = saved_activation_bytes(model, step, 1), saved_activation_bytes(model, step, 2)
        long = saved_activation_bytes(ASTEncoder(cfg.replace(input_tdim=128)), step, 1)
    assert two == 2 * one  # linear in the batch
    tokens, longer = cfg.num_tokens, cfg.replace(input_tdim=128).num_tokens
    # fused attention keeps no [N, N] weights: linear in the tokens too (up to the fixed-size input patches)
    assert long / one == pytest.approx(longer / tokens, rel=0.1)
    estimate = estimate_training_memory(lambda: ASTEncoder(cfg), step, 4)
    params = sum(p.numel() for p in ASTEncoder(cfg).parameters())
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == (4 * params, 4 * params, 8 * params)
    assert estimate.zero_buffers == 0 and estimate.total > estimate.activations > 0
    zero = estimate_training_memory(lambda: ASTEncoder(cfg), step, 4, zero_stage=1, cuda=True)
    assert zero.zero_buffers == 4 * (params + int(5e7))  # fp32 master copy + the engine's whole reduce bucket
    two = estimate_training_memory(lambda: ASTEncoder(cfg), step, 4, zero_stage=1, world_size=2, cuda=True)
    assert two.zero_buffers == 4 * (params // 2 + 2 * int(5e7))  # half the master copy, double-buffered buckets
    assert (zero.optimizer, two.optimizer) == (8 * params, 8 * (params // 2))  # each rank steps its share
    bf16 = estimate_training_memory(lambda: ASTEncoder(cfg), step, 4, bf16=True)
    assert bf16.activations < estimate.activations


def test_peak_memory_resets_per_span_on_the_cpu():
    """In a process of its own: malloc's settings and free lists are the process's (a training run in the same
    pytest worker keeps freed memory resident, common.system.cpu.keep_freed_memory, and a freed 64 MiB is then
    still in the RSS the next span starts from)."""
    if PeakMemory(torch.device("cpu")).source != "cpu peak RSS (VmHWM)":
        pytest.skip("no resettable high-water mark here")
    script = ("import torch\n"
              "from common.models.memory import PeakMemory\n"
              "meter = PeakMemory(torch.device('cpu'))\n"
              "meter.reset()\n"
              "big = torch.ones(64 * 2**20 // 4)\n"  # 64 MiB, touched
              "high = meter.peak()\n"
              "del big\n"
              "meter.reset()\n"
              "assert meter.peak() < high - 32 * 2**20, (meter.peak(), high)\n")  # the next span starts afresh
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_ledger_keeps_the_larger_peak_and_its_old_keys():
    ledger = Ledger("acc")
    ledger.start_phase(0, name="p", compression="none", factor=1, flops_per_sample=10, memory_estimate_bytes=5)
    ledger.add_training(0, 1, 2, 0.5)
    ledger.set_peak_memory(0, 300, "cpu peak RSS (VmHWM)")
    ledger.set_peak_memory(0, 200, "cpu peak RSS (VmHWM)")  # a resumed phase peaked lower: the phase's peak stays
    data = ledger.to_dict()["phases"][0]
    assert data["peak_memory_bytes"] == 300 and data["memory_estimate_bytes"] == 5
    assert {"steps", "samples", "train_flops", "wall_seconds", "eval_seconds", "compression", "factor"} <= set(data)
    assert Ledger.from_dict(ledger.to_dict()).phases[0].peak_memory_bytes == 300


@pytest.mark.slow
def test_a_run_records_peak_memory_per_phase(tmp_path, synth_corpus, caplog):
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers import run

    with caplog.at_level(logging.INFO):
        assert run(tmp_path / "run", synth_corpus, "train.save_every=100") == 0
    phases = json.loads((tmp_path / "run" / "ledger.json").read_text())["phases"]
    for phase in phases:
        assert phase["peak_memory_bytes"] > 0 and phase["peak_memory_source"].startswith("cpu")
        assert 0 < phase["memory_estimate_bytes"] < phase["peak_memory_bytes"]  # RSS holds the process too
    assert phases[0]["memory_estimate_bytes"] < phases[1]["memory_estimate_bytes"]
    assert sum("done; exported" in r.message and "peak memory" in r.message for r in caplog.records) == 2
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert all(e.value > 0 for e in events.Scalars("perf/peak_memory_gib"))


def test_dry_run_prints_the_memory_per_phase(capsys):
    from pretrain.run import main

    assert main(["--recipe", str(ROOT / "recipes" / "ssast_fshift4.yaml"), "--dry-run"]) == PLAN_NOT_READY
    out = capsys.readouterr().out
    header, coarse, full = out.splitlines()[:3]
    assert header.split()[-1] == "GiB/rank"
    assert 0 < float(coarse.split()[-1]) < float(full.split()[-1])
    assert "estimated memory per rank" in out


@pytest.mark.parametrize("precision,cuda,native,expected", [
    ("auto", False, True, False),   # the CPU: fp32
    ("auto", True, True, True),     # Ampere or later: bf16 autocast
    ("auto", True, False, False),   # a V100 / T4 only emulates bf16 (several times slower): fp32
    ("bf16", True, False, True),    # asked for: as asked
    ("bf16", False, False, True),
    ("fp32", True, True, False),
])
def test_auto_precision_is_bf16_only_where_the_gpu_computes_in_bf16(monkeypatch, precision, cuda, native, expected):
    from common.models.memory import autocast_bf16, training_setting

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native)
    assert autocast_bf16(precision, cuda) is expected
    assert training_setting(precision, 0, 1, torch.device("cuda" if cuda else "cpu"))["bf16"] is expected
    assert all(emulation is False for emulation in asked)  # emulated bf16 does not count
