"""Timing one SSAST training step of a recipe's phase (shared by the benchmarks)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phase_step_rate(size: str, phase_index: int, batch: int, device: torch.device, steps: int = 3,
                    recipe: str = "ssast_fshift4.yaml", *, compile: bool = False, backend: str = "inductor",
                    mode: str = "default", bf16: bool | None = None, overrides: Sequence[str] = (), warmup: int = 1) -> dict:
    """Clips/s and tokens/s of fbank + SSAST forward/backward (both objectives) + Adam for one phase (the masks
    drawn once, before the clock).

    Args:
        size: the encoder size (``model.size``).
        phase_index: which phase of ``recipe``.
        batch: clips per step.
        device: where to run.
        steps: timed steps (after ``warmup`` untimed ones, which include any compilation).
        recipe: a pretraining recipe in ``recipes/``.
        compile: ``torch.compile`` the encoder's blocks as ``train.compile`` does (``common.training.compile``).
        backend: the compile backend.
        mode: the compile mode (``train.compile_mode``).
        bf16: bf16 autocast (default: on CUDA, as ``train.precision: auto``).
        overrides: more ``key=value`` recipe overrides (e.g. a custom model size).
        warmup: untimed steps first.

    Returns:
        ``phase``, ``tokens`` (per clip, prefix included), ``clips_per_s``, ``tokens_per_s``, ``flops_per_clip``
        (training FLOPs, ``common.models.flops``), ``first_step_s`` (the first warm-up step: allocation, compilation),
        ``peak_memory`` (CUDA: ``max_memory_allocated`` over the timed steps; None on the CPU) and
        ``memory_estimate`` (``common.models.memory``, bytes).
    """
    from common.audio.pipeline import FeaturePipeline
    from common.models.ast.encoder import ASTEncoder
    from common.training.compile import maybe_compile
    from pretrain.recipe import load_recipe
    from pretrain.ssast import SSASTModel, SSASTObjective

    rec = load_recipe(RECIPES / recipe, [f"model.size={size}", *overrides])
    phase, cfg = rec.phases[phase_index], rec.encoder_configs()[phase_index]
    bf16 = device.type == "cuda" if bf16 is None else bf16
    torch.manual_seed(0)
    model = SSASTModel(ASTEncoder(cfg), rec.ssast).to(device)
    maybe_compile(model, compile, backend, mode)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as common.training.optim builds it
    pipeline = FeaturePipeline(rec.audio, phase.as_compression()).to(device)
    waves = torch.randn(batch, rec.audio.clip_samples, device=device) * 0.1
    generator = torch.Generator().manual_seed(0)
    # the masks drawn before the clock, as the trainer draws them a batch ahead on a thread
    # (pretrain.mask_draws): a draw in the step (milliseconds on the host, a blocking copy) is not the model's
    masks = [model.sample_mask(batch, generator, device) for _ in range(2 if rec.ssast.separate_passes else 1)]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(pipeline(waves), masks=masks)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        step()
    _sync(device)
    first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    clips = batch * steps / (time.perf_counter() - start)
    objective = SSASTObjective(rec.ssast)
    estimate = objective.memory_estimate(cfg, batch, bf16=bf16, cuda=device.type == "cuda")
    return {"phase": phase.label(phase_index), "tokens": cfg.num_tokens, "clips_per_s": clips,
            "tokens_per_s": clips * cfg.num_tokens, "flops_per_clip": objective.flops_per_sample(cfg),
            "first_step_s": first,
            "peak_memory": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
            "memory_estimate": estimate.total}
