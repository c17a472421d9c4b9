"""Every GPU-only check and measurement in one run: writes ``bench/results/<gpu name>.md`` and prints it.

    python -m bench.gpu_check            # a machine with a CUDA GPU: a few minutes
    python -m bench.gpu_check --smoke    # the same code path on the CPU with tiny sizes, in seconds

Sections (each one's failure is written into the results and the others still run):

1. bf16 against fp32: the SSAST loss and a fine-tuning loss over a few Adam steps from the same weights
   and data, with bf16 autocast and without.
2. Attention: timm's fused scaled-dot-product attention is enabled (``timm.layers.use_fused_attn``) and
   used by the blocks of the model built here (``block.attn.fused_attn``), and the kernels that run are
   flash / memory-efficient / cuDNN attention (``torch.profiler`` event names).
3. Per phase of ``recipes/ssast_fshift4.yaml`` with SSAST-base at the recipe's batch (24 clips: 6 per rank
   on 4 GPUs), eager, compiled (``train.compile``) and compiled with CUDA graphs (``train.compile_mode:
   reduce-overhead``): clips/s, tokens/s, model FLOPs utilisation (the
   training FLOPs of ``common.models.flops`` per second over the GPU's bf16 dense peak, :data:`PEAK_BF16_DENSE`),
   the first step (compilation), and the peak memory next to the estimate of ``common.models.memory``.
4. The loader's clips/s (10 s FLAC clips, decoded, cropped, batched) at 4, 8 and 16 workers against what
   the cheapest phase consumes.
5. A short coarse-to-fine pretraining run through the real trainer against its full-resolution baseline
   (the paper's proportions: B/8 steps at Fshift x4 + 5B/8 at full resolution against B): the wall-time
   saving next to the FLOPs saving (the paper: 31.73 % of the time for 34.58 % of the FLOPs, 0.92; the
   goal here is 0.95 or better), and each phase's clips/s through the trainer next to section 3's bare step.
6. Where the training loop makes the host wait for the GPU: a few steps of each phase, pretraining and
   fine-tuning (SpecAugment, mixup), with CUDA's sync debug mode on and ``torch.cuda.synchronize`` counted inside
   the trainer's steps, each site named with its count per step.
7. Fine-tuning through ``finetune/run.py`` (SpecAugment, mixup, validation per epoch) on 4 s clips: the wall-time
   saving of a short coarse-to-fine run next to its FLOPs saving, as section 5 for pretraining.
8. Where the trainer's step spends its time: ``torch.profiler`` over a few steps of each phase through
   ``pretrain/run.py``, the top operators by self device time (CPU time on the CPU), per step.
9. Issue 21's targets, from sections 3, 5 and 6: host syncs per step, trainer / bare per phase, the bare
   coarse step's clips/s, r (the coarse step's time over the full step's; section 3 gives it per mode and
   next to the FLOPs ratio), the short run's wall / FLOPs ratio, phase 2's peak over the baseline's.

Every section needs Lhotse (the front end is its batched fbank), sections 5 to 7 DeepSpeed too; where one is
missing, the section says so and how to install it, and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]

# bf16 dense (no sparsity) Tensor Core peaks, TFLOP/s, from NVIDIA's datasheets (which print the sparse
# figure, twice the dense one, for Hopper). First match wins; names as torch.cuda.get_device_name() gives them.
PEAK_BF16_DENSE: list[tuple[str, float, str]] = [
    (r"H200", 989.0, "NVIDIA H200 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (SXM)"),
    (r"H100.*PCIe", 756.0, "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe: BF16 Tensor Core 1,513 TFLOPS with "
                           "sparsity"),
    (r"H100(?!.*NVL)", 989.0, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS with "
                              "sparsity"),
    (r"A100", 312.0, "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
]
FUSED_ATTENTION_EVENTS = ("flash_attention", "efficient_attention", "cudnn_attention", "fmha", "flash")


def peak_bf16(device_name: str) -> tuple[float, str] | None:
    """The bf16 dense peak (TFLOP/s) and its source for a device name, or None if it is not in the table or names
    a MIG slice (``NVIDIA A100-SXM4-40GB MIG 1g.5gb``: a share of the GPU's peak, the whole one's overstated it 7x)."""
    if "MIG" in device_name:
        return None
    for pattern, tflops, source in PEAK_BF16_DENSE:
        if re.search(pattern, device_name):
            return tflops, source
    return None


@dataclass(frozen=True)
class Settings:
    """The sizes of a run: the real one on a GPU, or the smoke test's on the CPU."""

    size: str = "base"
    model: tuple[str, ...] = ()  # more recipe overrides of the model
    batch: int = 24  # ssast_fshift4.yaml's global batch (6 per rank on 4 GPUs)
    steps: int = 20
    warmup: int = 3
    agree_steps: int = 5
    agree_batch: int = 8
    backend: str = "inductor"
    workers: tuple[int, ...] = (4, 8, 16)
    loader_clips: int = 48
    clip_seconds: float = 10.0
    run_steps: int = 512  # baseline steps of the short runs (the phases' fixed costs: loader start, first steps)
    run_workers: int = 8
    run_overrides: tuple[str, ...] = field(default_factory=tuple)
    ft_clips: int = 480  # 4 s labeled clips of section 7's fine-tuning runs
    ft_epochs: int = 8
    ft_batch: int = 48
    profile_skip: int = 3  # section 8: steps of each phase before the profile records
    profile_steps: int = 5  # section 8: steps of each phase it records


FULL = Settings()
SMOKE = Settings(size="custom", model=("model.embed_dim=32", "model.depth=2", "model.num_heads=2"), batch=2, steps=2,
                 warmup=1, agree_steps=2, agree_batch=2, backend="aot_eager", workers=(0, 1), loader_clips=8,
                 clip_seconds=2.0, run_steps=8, run_workers=0,
                 run_overrides=("audio.target_frames=128",), ft_clips=8, ft_epochs=4, ft_batch=4,
                 profile_skip=1, profile_steps=2)


class Report:
    """The results as Markdown lines; each section runs guarded."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failures: list[str] = []
        self.timings: list[tuple[str, float]] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def section(self, title: str, body: Callable[[], None]) -> None:
        self.add("", f"## {title}", "")
        start = time.perf_counter()
        try:
            body()
        except MissingPackage as err:
            self.add(f"Skipped: {err}")
        except Exception as err:  # noqa: BLE001 - one section's failure is a result, not the end of the run
            last = traceback.format_exc().strip().splitlines()
            self.add(f"**FAILED**: {type(err).__name__}: {err}", "", "```", *last[-12:], "```")
            self.failures.append(title)
        self.timings.append((title, time.perf_counter() - start))
        print(f"[gpu_check] {title}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class MissingPackage(RuntimeError):
    """A section needs a package this machine lacks."""


def require(*modules: str) -> None:
    """Import ``modules`` or raise :class:`MissingPackage` saying how to get them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(f"{name} ({err})")
    if missing:
        raise MissingPackage(
            f"cannot import {', '.join(missing)}; install it first, e.g. `pip install deepspeed==0.19.8 "
            f"lhotse==1.33.0` (on a machine without network: `pip install --no-index --find-links WHEELS deepspeed "
            f"lhotse` from wheels built elsewhere: `make gpu-wheels`)")


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


# ------------------------------------------------------------------------------- 1. bf16 vs fp32
def _losses(kind: str, s: Settings, device: torch.device, bf16: bool) -> list[float]:
    from common.audio.pipeline import FeaturePipeline
    from common.models.ast.encoder import ASTEncoder
    from finetune.classifier import AugmentConfig, ClassifierObjective
    from pretrain.recipe import load_recipe
    from pretrain.ssast import SSASTModel

    rec = load_recipe(ROOT / "recipes" / "ssast_fshift4.yaml", [f"model.size={s.size}", *s.model])
    cfg = rec.encoder_configs()[1]  # full resolution
    torch.manual_seed(0)
    objective = ClassifierObjective([str(i) for i in range(10)], "acc", "ce", AugmentConfig())
    model = (SSASTModel(ASTEncoder(cfg), rec.ssast) if kind == "ssast" else objective.build_model(cfg))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as common.training.optim builds it
    pipeline = FeaturePipeline(rec.audio).to(device)
    data = torch.Generator().manual_seed(1)
    waves = (torch.randn(s.agree_batch, rec.audio.clip_samples, generator=data) * 0.1).to(device)
    targets = torch.nn.functional.one_hot(torch.randint(0, 10, (s.agree_batch,), generator=data), 10).float().to(device)
    masks = torch.Generator().manual_seed(2)
    out = []
    for _ in range(s.agree_steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = pipeline(waves)
            loss = model(x, masks)["loss"] if kind == "ssast" else objective.criterion(model(x), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def check_bf16(report: Report, s: Settings, device: torch.device) -> None:
    require("lhotse")
    tolerance = 0.02
    report.add(f"Same weights, data and masks; {s.agree_steps} Adam steps (lr 1e-4) at full resolution, batch "
               f"{s.agree_batch}, SSAST-{s.size}. Agreement: |bf16 - fp32| / |fp32| <= {tolerance} at every step "
               f"(bf16 keeps 8 bits of mantissa: about 2-3 significant digits per operation).", "",
               "| loss | step | fp32 | bf16 | relative difference |", "|---|---:|---:|---:|---:|")
    verdicts = []
    for kind in ("ssast", "fine-tuning (cross-entropy)"):
        key = "ssast" if kind == "ssast" else "classifier"
        fp32, bf16 = _losses(key, s, device, False), _losses(key, s, device, True)
        worst = 0.0
        for i, (a, b) in enumerate(zip(fp32, bf16)):
            rel = abs(b - a) / max(abs(a), 1e-12)
            worst = max(worst, rel)
            report.add(f"| {kind} | {i + 1} | {a:.5f} | {b:.5f} | {rel:.2e} |")
        verdicts.append(f"{kind}: {'agrees' if worst <= tolerance else 'DOES NOT agree'} (worst {worst:.2e})")
    report.add("", "Result: " + "; ".join(verdicts) + ".")


# ------------------------------------------------------------------------------- 2. attention kernels
def check_attention(report: Report, s: Settings, device: torch.device) -> None:
    require("lhotse")
    from timm.layers import use_fused_attn
    from torch.profiler import ProfilerActivity, profile

    from common.audio.pipeline import FeaturePipeline
    from common.models.ast.encoder import ASTEncoder
    from pretrain.recipe import load_recipe
    from pretrain.ssast import SSASTModel

    rec = load_recipe(ROOT / "recipes" / "ssast_fshift4.yaml", [f"model.size={s.size}", *s.model])
    cfg = rec.encoder_configs()[1]
    model = SSASTModel(ASTEncoder(cfg), rec.ssast).to(device)
    flags = [block.attn.fused_attn for block in model.encoder.blocks]
    pipeline = FeaturePipeline(rec.audio).to(device)
    waves = torch.randn(2, rec.audio.clip_samples, device=device) * 0.1
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, acc_events=True) as prof:  # one cycle: nothing to clear (quiet)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(pipeline(waves), torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    names = sorted({e.key for e in prof.key_averages()})
    fused = [n for n in names if any(k in n.lower() for k in FUSED_ATTENTION_EVENTS)]
    math_path = [n for n in names if n in ("aten::_scaled_dot_product_attention_math", "aten::softmax",
                                           "aten::_softmax")]
    ok = use_fused_attn() and all(flags) and bool(fused)
    report.add(f"- `timm.layers.use_fused_attn()`: {use_fused_attn()}",
               f"- blocks of the model built here with `attn.fused_attn`: {sum(flags)} of {len(flags)}",
               f"- fused attention events in a bf16 forward + backward: "
               f"{', '.join(f'`{n}`' for n in fused[:8]) or 'none'}",
               f"- softmax / math-path events (expected only in the heads' losses): "
               f"{', '.join(f'`{n}`' for n in math_path) or 'none'}",
               "", f"Result: fused scaled-dot-product attention {'is' if ok else 'is NOT'} in use.")


# --------------------------------------------------------------------------- 3. per-phase throughput
def measure_phases(report: Report, s: Settings, device: torch.device, store: dict) -> None:
    require("lhotse")
    from bench.ssast_step import phase_step_rate

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_bf16(name) if device.type == "cuda" else None
    report.add(f"SSAST-{s.size}, batch {s.batch}, fbank + both objectives (two passes) + Adam, "
               f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; {s.warmup} untimed step(s), then {s.steps} "
               f"timed. Compiled: the encoder blocks (`train.compile`, backend {s.backend}; on a GPU also with "
               f"`train.compile_mode: reduce-overhead`, CUDA graphs). MFU: training FLOPs "
               f"(`common.models.flops`) per second over the bf16 dense peak "
               f"{f'{peak[0]:g} TFLOP/s ({peak[1]})' if peak else '(none for this device: MFU n/a)'}.", "",
               "| phase | tokens/clip | mode | clips/s | tokens/s | TFLOP/s | MFU | first step (s) | peak memory "
               "(GiB) | estimate (GiB) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    # CUDA graphs (train.compile_mode: reduce-overhead) only where there is a GPU: they are what removes the
    # launch cost of a step with few tokens; each such row is guarded on its own
    modes = [("eager", False, "default"), ("compiled", True, "default")]
    if device.type == "cuda":
        modes.append(("compiled, reduce-overhead", True, "reduce-overhead"))
    for index in (0, 1):
        for label, compiled, mode in modes:
            try:
                r = phase_step_rate(s.size, index, s.batch, device, steps=s.steps, compile=compiled,
                                    backend=s.backend, mode=mode, overrides=s.model, warmup=s.warmup)
            except Exception as err:  # noqa: BLE001 - a compiled mode that fails is a result (eager is the base)
                if not compiled:
                    raise
                first_line = (str(err).splitlines() or [""])[0][:120]
                report.add(f"| phase {index + 1} | | {label} | failed: {type(err).__name__}: {first_line} "
                           f"| | | | | | |")
                continue
            tflops = r["clips_per_s"] * r["flops_per_clip"] / 1e12
            mfu = tflops / peak[0] if peak else None
            store.setdefault(index, {})[label] = r
            report.add(f"| {r['phase']} | {r['tokens']} | {label} | "
                       f"{r['clips_per_s']:.1f} | {r['tokens_per_s']:.0f} | {tflops:.3g} | "
                       f"{_fmt(mfu and 100 * mfu, '.1f')}{'%' if mfu else ''} | {r['first_step_s']:.1f} | "
                       f"{_fmt(r['peak_memory'] and r['peak_memory'] / 2**30)} | {r['memory_estimate'] / 2**30:.3g} |")
    for label in [m[0] for m in modes[1:]]:
        if all(label in store[i] for i in (0, 1)):
            speed = [store[i][label]["clips_per_s"] / store[i]["eager"]["clips_per_s"] for i in (0, 1)]
            report.add("", f"{label.capitalize()} / eager: {speed[0]:.2f}x in the coarse phase, {speed[1]:.2f}x at "
                           f"full resolution.")
    flops_r = store[0]["eager"]["flops_per_clip"] / store[1]["eager"]["flops_per_clip"]
    rs = {label: store[1][label]["clips_per_s"] / store[0][label]["clips_per_s"]
          for label in [m[0] for m in modes] if all(label in store[i] for i in (0, 1))}
    store["bare_r"] = rs
    report.add("", "r = the coarse step's time over the full step's (bare): "
               + ", ".join(f"{label} {r:.3f}" for label, r in rs.items())
               + f"; the FLOPs ratio is {flops_r:.3f} (r at the FLOPs ratio: equal MFU in both phases).")


# ------------------------------------------------------------------------------------ 4. the loader
def measure_loader(report: Report, s: Settings, device: torch.device, store: dict, work: Path) -> None:
    require("lhotse", "soundfile")
    from bench.clips import make_clips
    from bench.data_throughput import loader_rate
    from common.audio.pipeline import AudioConfig

    clip_samples = AudioConfig(target_frames=int(s.clip_seconds * 100) // 16 * 16).clip_samples
    manifest = make_clips(work / "clips", s.loader_clips, seconds=s.clip_seconds, rate=16000)
    consumed = max((r["clips_per_s"] for r in store.get(0, {}).values()), default=None)
    report.add(f"{s.clip_seconds:g} s 16 kHz FLAC clips, batch {s.batch}, decode + random crop + batching "
               f"(`common.data.loader.ClipLoader`), {os.cpu_count()} CPU cores. The cheapest phase (Fshift x4) consumes "
               f"{_fmt(consumed, '.1f')} clips/s (section 3, its fastest mode).", "",
               "| workers | clips/s | x what the cheapest phase consumes |", "|---:|---:|---:|")
    for workers in s.workers:
        rate = loader_rate(manifest, workers, s.batch, clip_samples,
                           clips_to_time=max(4 * s.batch, 4 * s.batch * max(1, workers)))
        report.add(f"| {workers} | {rate:.1f} | {_fmt(consumed and rate / consumed, '.2f')} |")


# ------------------------------------------------------------------------------ 5. the short runs
def measure_short_runs(report: Report, s: Settings, device: torch.device, work: Path, store: dict) -> None:
    require("deepspeed", "lhotse", "soundfile")
    from bench.clips import make_clips
    from bench.train_throughput import short_runs

    manifest = make_clips(work / "clips", max(s.loader_clips, 2 * s.batch), seconds=s.clip_seconds, rate=16000)
    if device.type == "cuda":
        import gc

        gc.collect()
        store["allocated_before_runs"] = int(torch.cuda.memory_allocated())
    result = short_runs(manifest, s.size, s.run_steps, s.batch, s.run_workers, work / "runs", 1,
                        extra=(*s.model, *s.run_overrides))
    b, c = result["baseline"], result["fshift4"]
    report.add(f"`pretrain/run.py` (DeepSpeed engine, loader with {s.run_workers} workers, phase change), "
               f"SSAST-{s.size}, batch {s.batch}: baseline {s.run_steps} steps at full resolution; coarse to fine "
               f"{s.run_steps // 8} at Fshift x4 + {5 * s.run_steps // 8} at full resolution. Training wall time from "
               f"the ledgers (validation and checkpoints excluded).", "",
               "| run | steps | training FLOPs | training wall time (s) |", "|---|---:|---:|---:|",
               f"| baseline | {b['steps']} | {b['train_flops']:.3g} | {b['wall_seconds']:.1f} |",
               f"| Fshift 4->1 | {c['steps']} | {c['train_flops']:.3g} | {c['wall_seconds']:.1f} |", "",
               f"FLOPs saving {result['flops_saving']:.1%}, wall-time saving {result['wall_saving']:.1%}: ratio "
               f"**{result['ratio']:.2f}** (paper 0.92; goal 0.95 or better).")
    # clips/s of each phase through the trainer next to the bare step of section 3: what a step costs outside
    # the model (loader, engine, bookkeeping; each phase's start-up included)
    phases = [("full resolution, baseline", s.run_steps, b["phase_seconds"][0], 1),
              ("Fshift x4", s.run_steps // 8, c["phase_seconds"][0], 0),
              ("full resolution, after the change", 5 * s.run_steps // 8, c["phase_seconds"][1], 1)]
    peaks = [b["phase_peak_bytes"][0], c["phase_peak_bytes"][0], c["phase_peak_bytes"][1]]
    report.add("", "| phase | clips/s through the trainer | bare step (section 3, eager) | trainer / bare | peak memory "
                   "(GiB) | bare step's peak (GiB) |", "|---|---:|---:|---:|---:|---:|")
    rates = [steps * s.batch / seconds for _, steps, seconds, _ in phases]
    store["runs"] = {"ratio": result["ratio"], "trainer_rates": rates, "trainer_r": rates[2] / rates[1],
                     "peak_over_baseline": peaks[2] - peaks[0] if peaks[2] and peaks[0] else None}
    for (label, steps, seconds, index), peak in zip(phases, peaks):
        rate = steps * s.batch / seconds
        bare = store.get(index, {}).get("eager", {})
        report.add(f"| {label} | {rate:.1f} | {_fmt(bare.get('clips_per_s'), '.1f')} | "
                   f"{_fmt(bare.get('clips_per_s') and rate / bare['clips_per_s'], '.2f')} | "
                   f"{_fmt(peak and peak / 2**30)} | {_fmt(bare.get('peak_memory') and bare['peak_memory'] / 2**30)} |")
    report.add("", f"r through the trainer (coarse step's time over the full step's after the change): "
                   f"{store['runs']['trainer_r']:.3f}.")
    report.add("", "On the CPU the peak is the process's resident set (the interpreter and libraries included); on "
                   "a GPU `max_memory_allocated` per phase: a full-resolution phase after the change that peaks "
                   "above the baseline's keeps something of the coarse phase alive.")
    if device.type == "cuda":  # the runs share this process: what one leaves allocated, the next one carries
        report.add("", f"CUDA memory still allocated after each run returned: baseline "
                       f"{_fmt(b['left_allocated'] and b['left_allocated'] / 2**30)} GiB, Fshift 4->1 "
                       f"{_fmt(c['left_allocated'] and c['left_allocated'] / 2**30)} GiB (before the runs: "
                       f"{store.get('allocated_before_runs', 0) / 2**30:.3g} GiB).")


# ------------------------------------------------------------------------- 7. fine-tuning short runs
def measure_finetune_runs(report: Report, s: Settings, device: torch.device, work: Path) -> None:
    require("deepspeed", "lhotse", "soundfile")
    from bench.clips import make_task
    from bench.train_throughput import finetune_runs

    task = make_task(work / "ft_clips", s.ft_clips, seconds=4.0)
    augment = ("augment.freqm=48", "augment.timem=96", "augment.mixup=0.5")  # AST's kinds, on the GPU path too
    result = finetune_runs(task, s.size, s.ft_epochs, s.ft_batch, s.run_workers, work / "ft_runs", 1,
                           extra=(*s.model, *augment))
    b, c = result["baseline"], result["fshift4"]
    coarse = s.ft_epochs // 4
    report.add(f"`finetune/run.py` from scratch (`recipes/ft_fshift4.yaml`'s phases; SpecAugment 48 / 96 and mixup "
               f"0.5 on the waveforms, cross-entropy, a validation per epoch), AST-{s.size}, {s.ft_clips} labeled 4 s clips, batch {s.ft_batch}, loader with "
               f"{s.run_workers} workers: baseline {s.ft_epochs} epochs at full resolution; coarse to fine {coarse} "
               f"at Fshift x4 + {s.ft_epochs - coarse} at full resolution (issue 14 item 4's setting, shortened). "
               f"Training wall time from the ledgers (validation and checkpoints excluded).", "",
               "| run | steps | training FLOPs | training wall time (s) | per phase (s) |", "|---|---:|---:|---:|---|",
               f"| baseline | {b['steps']} | {b['train_flops']:.3g} | {b['wall_seconds']:.1f} | "
               f"{' + '.join(f'{x:.1f}' for x in b['phase_seconds'])} |",
               f"| Fshift 4->1 | {c['steps']} | {c['train_flops']:.3g} | {c['wall_seconds']:.1f} | "
               f"{' + '.join(f'{x:.1f}' for x in c['phase_seconds'])} |", "",
               f"FLOPs saving {result['flops_saving']:.1%}, wall-time saving {result['wall_saving']:.1%}: ratio "
               f"**{result['ratio']:.2f}** (goal 0.95 or better).")


# --------------------------------------------------------------------------- 6. host synchronisations
def _package_file(filename: str) -> bool:
    """A file of this package (not of an installed library, not this module)."""
    path = Path(filename).resolve()
    return (path.is_relative_to(ROOT) and "site-packages" not in path.parts
            and path != Path(__file__).resolve())


class SyncSites:
    """Where the host waits for the device inside the training loop: CUDA's sync debug mode warns at every
    synchronising operation (``.item()``, a copy to the host, ``nonzero``...), and explicit
    ``torch.cuda.synchronize`` calls (DeepSpeed's timers use them) are wrapped. Each site is named by the
    innermost frame of this package and the innermost frame overall, with its count."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def note(self, what: str, where: tuple[str, int] | None = None) -> None:
        """Count a synchronisation; ``where``: the line that made it (a warning's file and line), else the caller
        of the function that called this one (``torch.cuda.synchronize``'s)."""
        stack = traceback.extract_stack()[:-2]
        ours = next((f for f in reversed(stack) if _package_file(f.filename)), None)
        if where is None and stack:
            where = (stack[-1].filename, stack[-1].lineno)
        key = (f"{Path(ours.filename).relative_to(ROOT)}:{ours.lineno}" if ours else "?",
               f"{what} at {Path(where[0]).name}:{where[1]}" if where else what)
        self.counts[key] = self.counts.get(key, 0) + 1

    def around(self, fn: Callable) -> Callable:
        import functools
        import warnings

        sites = self

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            cuda = torch.cuda.is_available()
            real_sync = torch.cuda.synchronize

            def synchronize(*a, **k):
                sites.note("torch.cuda.synchronize")
                return real_sync(*a, **k)

            def showwarning(message, category, filename, lineno, file=None, line=None):
                if "synchronizing" in str(message):  # the file and line of the Python call that synchronised
                    sites.note("synchronizing operation", (filename, lineno))

            torch.cuda.synchronize = synchronize
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("always")
                    warnings.showwarning = showwarning
                    if cuda:
                        torch.cuda.set_sync_debug_mode("warn")
                    try:
                        return fn(*args, **kwargs)
                    finally:
                        if cuda:
                            torch.cuda.set_sync_debug_mode("default")
            finally:
                torch.cuda.synchronize = real_sync

        return traced


def _traced_steps(run: Callable[[], int], what: str) -> SyncSites:
    """The host synchronisations inside the trainer's steps of ``run()`` (a training command's ``main``): only
    ``Trainer._step`` (forward, backward, optimizer step and what falls due after it), not a phase's start or end
    (its checkpoint copies each tensor to the host, one wait each) or an epoch's validation."""
    import common.training.loop

    sites = SyncSites()
    real = common.training.loop.Trainer._step
    common.training.loop.Trainer._step = sites.around(real)
    try:
        if run() != 0:
            raise RuntimeError(f"the {what} run failed")
    finally:
        common.training.loop.Trainer._step = real
    return sites


def _sync_table(report: Report, sites: SyncSites, steps: int, device: torch.device) -> float:
    """Report ``sites`` over ``steps`` steps; returns the synchronisations per step at sites reached at least once
    per step (a site counted once per phase, a first step's, is not per step)."""
    per_step = sum(n for n in sites.counts.values() if n >= steps) / steps
    if not sites.counts:
        report.add("Result: no host synchronisation inside the training steps"
                   + (" (on the CPU there is no device to wait for: the smoke test only runs the code path)."
                      if device.type != "cuda" else "."))
        return per_step
    report.add("| in this package | what, where | count | per step |", "|---|---|---:|---:|")
    for (ours, what), n in sorted(sites.counts.items(), key=lambda kv: -kv[1]):
        report.add(f"| `{ours}` | {what} | {n} | {n / steps:.2f} |")
    report.add("", f"Result: {per_step:.2f} synchronisations per step at sites reached at least once per step.")
    return per_step


def find_host_syncs(report: Report, s: Settings, device: torch.device, work: Path, store: dict) -> None:
    require("deepspeed", "lhotse", "soundfile")
    from bench.clips import make_clips, make_task
    from finetune.run import main as finetune
    from pretrain.run import main as pretrain

    steps = 4  # per phase
    manifest = make_clips(work / "clips", max(s.loader_clips, 2 * s.batch), seconds=s.clip_seconds, rate=16000)
    argv = _pretrain_argv(s, work / "syncs", manifest, steps, "train.zero_stage=0")
    sites = _traced_steps(lambda: pretrain(argv), "pretraining")
    report.add(f"`pretrain/run.py`, SSAST-{s.size}, batch {s.batch}: {steps} steps at Fshift x4 then {steps} at full "
               f"resolution, with CUDA's sync debug mode on and `torch.cuda.synchronize` counted inside the "
               f"trainer's steps (`Trainer._step`: forward, backward, optimizer step and what falls due after it; "
               f"no log window, validation or checkpoint falls due in this run).", "")
    store["syncs_per_step"] = _sync_table(report, sites, 2 * steps, device)
    # fine-tuning: its augmentations draw on the host (mixup, SpecAugment) and copy to the device
    task = make_task(work / "sync_ft_clips", steps * s.ft_batch, seconds=4.0)
    ft_argv = ["--init", "none", "--task", str(task), "--run-dir", str(work / "sync_ft")]
    for item in (f"model.size={s.size}", f"data.batch_size={s.ft_batch}", f"data.num_workers={s.run_workers}",
                 "train.eval_batches=1", "train.log_every=100000", "augment.freqm=48", "augment.timem=96",
                 "augment.mixup=0.5", "phases=[{compression: fshift, factor: 4, epochs: 1}, "
                 "{compression: none, epochs: 1}]", *s.model):
        ft_argv += ["--set", item]
    sites = _traced_steps(lambda: finetune(ft_argv), "fine-tuning")
    report.add("", f"`finetune/run.py`, AST-{s.size}, batch {s.ft_batch}, SpecAugment 48 / 96 and mixup 0.5: an epoch "
                   f"of {steps} steps at Fshift x4 then one at full resolution, counted the same way (the epochs' "
                   f"validations are outside the steps).", "")
    store["finetune_syncs_per_step"] = _sync_table(report, sites, 2 * steps, device)


# ------------------------------------------------------------------ 8. profile of the trainer's step
def _pretrain_argv(s: Settings, run_dir: Path, manifest: Path, steps: int, *extra: str) -> list[str]:
    """``pretrain/run.py`` on ``ssast_fshift4.yaml`` for ``steps`` steps per phase, no logging window, no
    validation, checkpoint or baseline inside the phases (sections 6 and 8)."""
    argv = ["--recipe", str(ROOT / "recipes" / "ssast_fshift4.yaml"), "--run-dir", str(run_dir)]
    for item in [f"data.train=[{{path: {manifest}}}]", "data.valid=[]", f"model.size={s.size}",
                 f"data.batch_size={s.batch}", f"data.num_workers={s.run_workers}", "train.log_every=100000",
                 "train.save_every=100000", "train.eval_every=100000", "baseline=null",
                 f"phases.0.steps={steps}", f"phases.1.steps={steps}", *s.model, *s.run_overrides, *extra]:
        argv += ["--set", item]
    return argv


def profile_rows(events, device: bool) -> tuple[float, list[tuple[str, int, float, float]]]:
    """The total self time (us) and the rows ``(name, calls, self us, self CPU us)`` of a profile's
    ``key_averages()``, largest first. On the CPU: operators by self CPU time, the step marker's (ProfilerStep)
    being the time between operators. On a device, as torch's own table counts it: the total is the kernels'
    time (device events that are not user annotations: a step marker's device event spans the whole step, and a
    kernel's time is also its launching operator's), the rows are the operators by the kernel time they launched,
    and what no operator launched is one row of its own."""
    if not device:
        rows = [(e.key, e.count, float(e.self_cpu_time_total), float(e.self_cpu_time_total)) for e in events]
        return sum(r[2] for r in rows), sorted(rows, key=lambda r: r[2], reverse=True)
    from torch.autograd import DeviceType

    kernels = [e for e in events if e.device_type != DeviceType.CPU and not e.is_user_annotation]
    total = sum(float(e.self_device_time_total) for e in kernels)
    rows = [(e.key, e.count, float(e.self_device_time_total), float(e.self_cpu_time_total)) for e in events
            if e.device_type == DeviceType.CPU and not e.is_user_annotation and e.self_device_time_total > 0]
    unattributed = total - sum(r[2] for r in rows)
    if unattributed > 0.01 * total:
        rows.append(("(kernels launched outside the operators recorded)", sum(e.count for e in kernels),
                     unattributed, 0.0))
    return total, sorted(rows, key=lambda r: r[2], reverse=True)


def profile_trainer_step(report: Report, s: Settings, device: torch.device, work: Path, store: dict) -> None:
    require("deepspeed", "lhotse", "soundfile")
    from torch.profiler import ProfilerActivity, profile, schedule

    from bench.clips import make_clips
    from common.training.loop import Trainer
    from pretrain.run import main as pretrain

    skip, active, top = s.profile_skip, s.profile_steps, 12
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    manifest = make_clips(work / "clips", max(s.loader_clips, 2 * s.batch), seconds=s.clip_seconds, rate=16000)
    tables: dict[int, list] = {}
    current: dict = {}
    real_phase, real_step = Trainer._train_phase, Trainer._step

    def phase(self, engine, index, budget):  # one profile per phase: `skip` steps unrecorded, then `active`
        prof = profile(activities=activities, schedule=schedule(wait=0, warmup=skip, active=active, repeat=1),
                       acc_events=True)
        with prof:
            current["prof"] = prof
            try:
                result = real_phase(self, engine, index, budget)
            finally:
                current.pop("prof", None)
        tables[index] = list(prof.key_averages())
        return result

    def step(self, *args, **kwargs):
        ended = real_step(self, *args, **kwargs)
        if "prof" in current:
            current["prof"].step()
        return ended

    Trainer._train_phase, Trainer._step = phase, step
    try:
        if pretrain(_pretrain_argv(s, work / "profile", manifest, skip + active)) != 0:
            raise RuntimeError("the pretraining run failed")
    finally:
        Trainer._train_phase, Trainer._step = real_phase, real_step
    clock = "device" if cuda else "CPU"
    report.add(f"`pretrain/run.py`, SSAST-{s.size}, batch {s.batch}, {s.run_workers} loader workers: "
               f"`torch.profiler` over {active} steps of each phase after {skip} unrecorded ones (the trainer's "
               f"whole step: loader wait, front end, masks, forward, backward, optimizer step, bookkeeping). The "
               f"top {top} operators by self {clock} time, per step.")
    store["profile"] = {}
    for index in sorted(tables):
        total_us, rows = profile_rows(tables[index], cuda)
        total = total_us / active / 1e3
        store["profile"][index] = total
        report.add("", f"Phase {index + 1} ({'Fshift x4' if index == 0 else 'full resolution'}): self {clock} time "
                       f"{total:.2f} ms per step in all.", "",
                   f"| operator | calls / step | self {clock} ms / step | share |" + (" self CPU ms / step |" if cuda
                                                                                      else ""),
                   "|---|---:|---:|---:|" + ("---:|" if cuda else ""))
        for key, count, self_us, cpu_us in rows[:top]:
            ms = self_us / active / 1e3
            outside = key.startswith("ProfilerStep")  # on the CPU, the step marker's: time between operators
            name = "(the step outside operators: Python, waits)" if outside else \
                key if key.startswith("(") else f"`{key[:60]}`"
            report.add(f"| {name} | {count / active:.1f} | {ms:.3f} | {100 * ms / max(total, 1e-9):.1f} % |"
                       + (f" {cpu_us / active / 1e3:.3f} |" if cuda else ""))


# ------------------------------------------------------------------------- 9. issue 21's targets
TARGETS = [  # (measure, target text, test on the measured value)
    ("host syncs per step outside the log window", "0", lambda v: v == 0),
    ("host syncs per step, fine-tuning (SpecAugment, mixup)", "0", lambda v: v == 0),
    ("trainer / bare step, full resolution", ">= 0.95", lambda v: v >= 0.95),
    ("trainer / bare step, Fshift x4", ">= 0.90", lambda v: v >= 0.90),
    ("bare step, Fshift x4 (clips/s, its fastest mode)", ">= 1,200", lambda v: v >= 1200),
    ("r = coarse step time / full step time (bare, eager)", "<= 0.35", lambda v: v <= 0.35),
    ("r through the trainer", "<= 0.35", lambda v: v <= 0.35),
    ("wall-time saving / FLOPs saving, short c2f run", ">= 0.95", lambda v: v >= 0.95),
    ("phase-2 peak memory over the baseline's (GiB)", "<= +0.05", lambda v: v <= 0.05),
]


def targets(report: Report, s: Settings, device: torch.device, store: dict) -> None:
    runs = store.get("runs", {})
    rates = runs.get("trainer_rates")
    eager = [store.get(i, {}).get("eager", {}).get("clips_per_s") for i in (0, 1)]
    measured = [
        store.get("syncs_per_step"),
        store.get("finetune_syncs_per_step"),
        rates and eager[1] and rates[2] / eager[1],
        rates and eager[0] and rates[1] / eager[0],
        max((r["clips_per_s"] for r in store.get(0, {}).values()), default=None),
        store.get("bare_r", {}).get("eager"),
        runs.get("trainer_r"),
        runs.get("ratio"),
        None if runs.get("peak_over_baseline") is None else runs["peak_over_baseline"] / 2**30,
    ]
    smoke = "; this CPU smoke run says nothing about them: it runs the code" if device.type != "cuda" else ""
    report.add(f"SSAST-{s.size}, batch {s.batch} (the targets are for SSAST-base at batch 24 in bf16 on one "
               f"H200{smoke}). From sections 3, 5 and 6; empty where a section was skipped or failed.", "",
               "| measure | measured | target | met |", "|---|---:|---:|---|")
    for (what, goal, test), value in zip(TARGETS, measured):
        met = "" if value is None else ("yes" if test(value) else "**no**")
        report.add(f"| {what} | {_fmt(value)} | {goal} | {met} |")


# ------------------------------------------------------------------------------------------ main
def environment(device: torch.device) -> list[str]:
    lines = [f"- device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (smoke test)'}",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda}, {os.cpu_count()} CPU cores, "
             f"Python {platform.python_version()}"]
    for name in ("timm", "deepspeed", "lhotse", "torchaudio"):
        try:
            lines.append(f"- {name} {importlib.import_module(name).__version__}")
        except ImportError:
            lines.append(f"- {name}: not installed")
    return lines


def results_name(device: torch.device) -> str:
    """``bench/results/<gpu name>.md``'s file name: the device name with spaces and symbols as ``_``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-smoke"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") + ".md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the same code path on the CPU with tiny sizes, in seconds (what the test suite runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the results file (default: bench/results; with --smoke: runs/gpu_check_smoke)")
    parser.add_argument("--run-steps", type=int, default=None, metavar="N",
                        help=f"baseline steps of section 5's short runs (default {FULL.run_steps}; the coarse-to-fine "
                             f"run trains N/8 + 5N/8); fewer fit a tight time budget, more average the phases' start-up "
                             f"out")
    parser.add_argument("--batch", type=int, default=None, metavar="B",
                        help=f"clips per step (default {FULL.batch}, the issue's targets'; a 16 GB GPU or a MIG slice "
                             f"needs fewer: SSAST-base at 24 takes about 15 GiB in fp32)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out: bf16, attention, phases, "
                                                    "loader, runs, syncs, finetune, profile, targets")
    args = parser.parse_args(argv)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    if args.smoke:
        device, s = torch.device("cpu"), SMOKE
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU here; `python -m bench.gpu_check --smoke` runs the same code on the CPU",
                  file=sys.stderr)
            return 2
        device, s = torch.device("cuda"), FULL
    if args.run_steps is not None:
        if args.run_steps < 8:
            parser.error("--run-steps must be at least 8 (the coarse phase trains N/8 steps)")
        s = replace(s, run_steps=args.run_steps)
    if args.batch is not None:
        if args.batch < 1:
            parser.error("--batch must be at least 1")
        s = replace(s, batch=args.batch)
    out = args.out or (ROOT / "runs" / "gpu_check_smoke" if args.smoke else ROOT / "bench" / "results")
    start = time.perf_counter()
    report = Report()
    report.add(f"# GPU check: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU smoke test'}",
               "", f"`python -m bench.gpu_check{' --smoke' if args.smoke else ''}"
                   f"{f' --batch {args.batch}' if args.batch else ''}"
                   f"{f' --run-steps {args.run_steps}' if args.run_steps else ''}`, "
                   f"{time.strftime('%Y-%m-%d %H:%M %Z')}.", "", *environment(device))
    store: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        sections = [("bf16", "1. bf16 against fp32", lambda: check_bf16(report, s, device)),
                    ("attention", "2. Fused attention", lambda: check_attention(report, s, device)),
                    ("phases", "3. Throughput per phase of ssast_fshift4.yaml, eager and compiled",
                     lambda: measure_phases(report, s, device, store)),
                    ("loader", "4. The loader against the cheapest phase",
                     lambda: measure_loader(report, s, device, store, work)),
                    ("runs", "5. Wall-time saving against FLOPs saving of a short run",
                     lambda: measure_short_runs(report, s, device, work, store)),
                    ("syncs", "6. Host synchronisations in the training loop",
                     lambda: find_host_syncs(report, s, device, work, store)),
                    ("finetune", "7. Fine-tuning: wall-time saving against FLOPs saving of a short run",
                     lambda: measure_finetune_runs(report, s, device, work)),
                    ("profile", "8. Where the trainer's step spends its time",
                     lambda: profile_trainer_step(report, s, device, work, store)),
                    ("targets", "9. Issue 21's targets", lambda: targets(report, s, device, store))]
        out.mkdir(parents=True, exist_ok=True)
        path = out / results_name(device)
        for key, title, body in sections:
            if key not in skip:
                report.section(title, body)
                path.write_text(report.text())  # after every section: a run cut short keeps what it measured
    report.add("", f"Total {time.perf_counter() - start:.0f} s ("
               + ", ".join(f"{t.split('.')[0]}: {sec:.0f} s" for t, sec in report.timings) + ")."
               + (f" Failed sections: {', '.join(report.failures)}." if report.failures else ""))
    path.write_text(report.text())
    print(report.text())
    print(f"written: {path}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
