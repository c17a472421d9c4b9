"""Memory per phase: the peak measured while a phase trains, and an estimate made before it runs.

Measured (:class:`PeakMemory`, reset when a phase starts, read whenever the trainer accounts):

- CUDA: ``torch.cuda.max_memory_allocated`` (the tensors PyTorch's allocator handed out, the model's
  weights, optimiser state and activations; not the allocator's cached blocks).
- CPU: the peak resident set of the process. ``ru_maxrss`` is a lifetime maximum and cannot be reset,
  so the kernel's high-water mark ``VmHWM`` (``/proc/self/status``) is reset instead by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux 4.0+): the peak is then the phase's own, and it includes the
  process's fixed share (the Python interpreter, PyTorch's libraries, the loader: about 0.7-1 GB). Where
  the reset is refused, the largest ``VmRSS`` seen at the reads is used (a lower bound), and without
  ``/proc`` the lifetime ``ru_maxrss``; :attr:`PeakMemory.source` says which.

Estimated (:func:`estimate_training_memory`, what ``--dry-run`` prints per phase): weights, gradients and
optimiser state from the parameter count, plus the activations one training step keeps for its
backward pass at the phase's token count and batch. Those are counted, not guessed: the objective's
training step runs on the ``meta`` device (no memory, no compute) under a hook that sees every tensor
autograd saves, counting each storage once and leaving out the parameters. Attention is counted as the
fused kernels store it (query, key, value, output and the log-sum-exp rows; the ``[N, N]`` weights are
recomputed in the backward pass), which is what runs on the CPU and on the GPU. Under bf16 autocast the
activations are counted at 2 bytes and autocast's bf16 copy of the weights is added. With ZeRO stage 1
or 2, Adam's moments are this rank's share of them, and DeepSpeed adds an fp32 master copy of that share of
the weights and a gradient bucket of
``reduce_bucket_size`` fp32 elements (the engine's 5e7, ``common.system.engine_config``; two of them where the
reduction overlaps the backward pass, on several ranks), which the GPU allocator reserves whole and the CPU
only touches as far as the gradients fill it.
"""

from __future__ import annotations

import contextlib
import gc
import re
import resource
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from common.system.engine_config import ZERO_BUCKET, resolve_zero_stage

__all__ = ["PeakMemory", "MemoryEstimate", "estimate_training_memory", "saved_activation_bytes",
           "measure_training_peak", "autocast_bf16", "training_setting", "describe_setting", "rss_bytes", "gib"]

DEEPSPEED_REDUCE_BUCKET = ZERO_BUCKET  # the engine's zero_optimization.reduce_bucket_size (elements)
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32, per parameter


def gib(nbytes: float) -> float:
    """Bytes in GiB."""
    return nbytes / 2**30


def _proc_status(field: str) -> int | None:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def rss_bytes() -> int | None:
    """The process's resident set now (``VmRSS``), or None without ``/proc``."""
    return _proc_status("VmRSS")


class PeakMemory:
    """The peak memory of a span of training on ``device`` (see the module docstring).

    Args:
        device: the training device.
    """
    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._sampled = 0
        self.source = self._probe()

    def _probe(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated"
        if _proc_status("VmHWM") is None:
            return "cpu ru_maxrss (process lifetime)"
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return "cpu peak RSS (VmHWM)"
        except OSError:
            return "cpu largest sampled RSS"

    def reset(self) -> None:
        """Start a new span: the peak restarts from what is in use now."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source == "cpu peak RSS (VmHWM)":
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        self._sampled = rss_bytes() or 0

    def peak(self) -> int:
        """The peak in bytes since the last :meth:`reset`."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.source == "cpu peak RSS (VmHWM)":
            return _proc_status("VmHWM") or 0
        if self.source == "cpu largest sampled RSS":
            self._sampled = max(self._sampled, rss_bytes() or 0)
            return self._sampled
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # getrusage's ru_maxrss: bytes on macOS, kB on Linux


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a rank needs to train one phase (see the module docstring for what each term counts)."""
    weights: int
    gradients: int
    optimizer: int
    activations: int
    zero_buffers: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.zero_buffers

    def describe(self) -> str:
        parts = [f"weights {gib(self.weights):.3g}", f"gradients {gib(self.gradients):.3g}",
                 f"optimizer {gib(self.optimizer):.3g}", f"activations {gib(self.activations):.3g}"]
        if self.zero_buffers:
            parts.append(f"ZeRO buffers {gib(self.zero_buffers):.3g}")
        return f"{gib(self.total):.3g} GiB ({', '.join(parts)} GiB)"


class _FusedAttentionSaves(torch.autograd.Function):
    """Stands in for a fused attention kernel on the meta device: saves what flash / memory-efficient
    attention saves for the backward pass (q, k, v, the output and fp32 log-sum-exp rows)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FusedAttentionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) == 3:
            return _FusedAttentionSaves.apply(*args)
        return func(*args, **kwargs)


def saved_activation_bytes(model: nn.Module, step: Callable[[nn.Module, int], torch.Tensor], batch: int) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``step(model, batch)``, each storage once,
    parameters left out. ``model`` lives on the meta device; ``step`` builds its own meta inputs."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            storages[storage._cdata] = max(storages.get(storage._cdata, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FusedAttentionMode():
        step(model, batch)
    return sum(storages.values())


def autocast_bf16(precision: str, cuda: bool) -> bool:
    """Whether a run autocasts to bf16: ``train.precision: bf16``, or ``auto`` on a CUDA device that computes in
    bf16 (Ampere or later); ``auto`` on a GPU that only emulates bf16 (a V100, a T4: several times slower than
    fp32) trains in fp32, as on the CPU."""
    if precision == "bf16":
        return True
    return (precision == "auto" and cuda and torch.cuda.is_available()
            and torch.cuda.is_bf16_supported(including_emulation=False))


def training_setting(precision: str, zero_stage: int | str, world_size: int = 1,
                     device: torch.device | None = None) -> dict:
    """The keyword arguments of :func:`estimate_training_memory` (and the objectives' ``memory_estimate``)
    for a recipe's ``train.precision`` and ``train.zero_stage`` on ``device`` (default: CUDA when present,
    as a run would pick)."""
    cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    return {"bf16": autocast_bf16(precision, cuda), "zero_stage": resolve_zero_stage(zero_stage, world_size),
            "world_size": world_size, "cuda": cuda}


def describe_setting(setting: dict) -> str:
    """One line saying what a plan's memory column assumes (:func:`training_setting`)."""
    where = "CUDA" if setting["cuda"] else "the CPU"
    return (f"GiB/rank: estimated memory per rank on {where} ({'bf16 autocast' if setting['bf16'] else 'fp32'}, "
            f"Adam, ZeRO stage {setting['zero_stage']}): weights, gradients, optimiser state and the activations "
            f"kept for the backward pass at the phase's micro-batch (common/models/memory.py)")


def estimate_training_memory(build: Callable[[], nn.Module], step: Callable[[nn.Module, int], torch.Tensor],
                             batch: int, bf16: bool = False, zero_stage: int = 0, world_size: int = 1,
                             cuda: bool = False) -> MemoryEstimate:
    """What one rank needs to train a model with Adam at micro-batch ``batch``.

    Args:
        build: makes the model (called under ``torch.device("meta")``).
        step: ``step(model, batch) -> loss``: the objective's training forward pass on meta inputs.
        batch: the micro-batch per rank.
        bf16: bf16 autocast (activations at 2 bytes, plus a bf16 copy of the weights).
        zero_stage, world_size: DeepSpeed ZeRO stage and ranks (stage 1-2 buffers, see the module docstring).
        cuda: the GPU allocator reserves DeepSpeed's whole gradient bucket; the CPU touches only what is used.
    """
    with torch.device("meta"):
        model = build()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        with contextlib.ExitStack() as stack:
            if bf16:
                model = model.to(torch.bfloat16)
                stack.enter_context(_default_dtype(torch.bfloat16))
            activations = saved_activation_bytes(model, step, batch)
    if bf16:
        activations += weight_bytes // 2  # autocast's bf16 copy of the weights
    zero = 0
    if zero_stage >= 1:
        bucket = DEEPSPEED_REDUCE_BUCKET if cuda else min(DEEPSPEED_REDUCE_BUCKET, trainable)
        zero = 4 * (trainable // world_size + bucket * (2 if world_size > 1 else 1))  # overlap_comm: double buffer
    stepped = trainable // world_size if zero_stage >= 1 else trainable  # ZeRO partitions Adam's moments
    return MemoryEstimate(weights=weight_bytes, gradients=4 * trainable, optimizer=4 * ADAM_STATES * stepped,
                          activations=activations, zero_buffers=zero)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def measure_training_peak(build: Callable[[], nn.Module], step: Callable[[nn.Module], torch.Tensor],
                          device: torch.device, steps: int = 2) -> int:
    """What training a fresh model for ``steps`` Adam steps adds to the memory in use at its peak (bytes):
    the quantity :func:`estimate_training_memory` estimates.

    On the CPU this is the growth of the resident set; a throwaway model trains one step first, so that
    the code PyTorch pages in on first use and its one-time buffers are not counted. With glibc's default
    allocator freed blocks may stay in the heap and be reused or not, so the growth varies by tens of
    per cent from run to run; ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment makes it track the
    tensors. On CUDA it is ``max_memory_allocated`` minus what was allocated before.

    Args:
        build: makes the model on ``device``.
        step: ``step(model) -> loss`` on ``device`` (inputs and autocast included).
        device: where to measure.
        steps: optimiser steps measured.
    """
    def train(model: nn.Module, n: int) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, fused=True)  # as common.training.optim builds it
        for _ in range(n):
            step(model).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    train(build(), 1)
    gc.collect()
    meter = PeakMemory(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
    else:
        before = rss_bytes() or 0
    meter.reset()
    model = build()
    train(model, steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return meter.peak() - before

