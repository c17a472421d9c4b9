"""Timing one SSAST training step of a recipe's phase (shared by the benchmarks)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def phase_step_rate(size: str, phase_index: int, batch: int, device: torch.device, steps: int = 3,
                    recipe: str = "ssast_fshift4.yaml") -> dict:
    """Clips/s and tokens/s of fbank + SSAST forward/backward (both objectives) + Adam for one phase."""
    from common.features import FeaturePipeline
    from common.model import ASTEncoder
    from pretrain.recipe import load_recipe
    from pretrain.ssast import SSASTModel

    rec = load_recipe(RECIPES / recipe, [f"model.size={size}"])
    phase, cfg = rec.phases[phase_index], rec.encoder_configs()[phase_index]
    model = SSASTModel(ASTEncoder(cfg), rec.ssast).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    pipeline = FeaturePipeline(rec.audio, phase.as_compression()).to(device)
    waves = torch.randn(batch, rec.audio.clip_samples, device=device) * 0.1
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(pipeline(waves), generator)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    clips = batch * steps / (time.perf_counter() - start)
    return {"phase": phase.label(phase_index), "tokens": cfg.num_tokens, "clips_per_s": clips,
            "tokens_per_s": clips * cfg.num_tokens}
