"""Compiled training steps (``train.compile``): ``torch.compile`` of a phase's model, block by block.

What is compiled. Every *repeated block* of the model: each member of an ``nn.ModuleList`` whose members
all share one class (the transformer blocks of the AST encoder; the blocks of a Swin stage). This is
PyTorch's "regional compilation": the blocks share their code, so one block's graph is captured and
compiled once per shape and reused by the others, and compile time does not grow with the depth. What
lies between the blocks stays eager: the fbank front end, the objectives' random draws (SSAST masks,
mixup and SpecAugment take a CPU ``torch.Generator``, which would break a whole-model graph), the heads
and the losses. The blocks hold nearly all of the FLOPs.

How. ``nn.Module.compile`` compiles a module *in place*: its parameters, buffers and state-dict keys
stay what they were (``torch.compile(module)`` would return a wrapper whose keys gain ``_orig_mod.``),
so checkpoints, exports and the weight average are those of an uncompiled model and load into one, and
a resumed run restores into freshly compiled blocks. DeepSpeed's ``engine.compile()`` does the same for
the whole module (``module.compile(backend=...)``); the engine itself is unaware of either.

Shapes are static within a phase (batch, token count), so graphs are compiled with ``dynamic=False``:
a phase change compiles the new shapes once (the caches of the previous phase are dropped first, so a
long run of several phases never reaches Dynamo's recompile limit), validation's shapes once more, and
a resumed run compiles again.

Modes (``train.compile_mode``, inductor only): ``default``; ``reduce-overhead`` replays each block's
kernels as a CUDA graph, which removes the per-kernel launch cost that dominates a GPU step when the
tokens are few (a coarse phase at a small batch: ``bench.gpu_check`` measured the bare SSAST-base step at
Fshift x4 and batch 24 on an H200 at 6 % of the GPU's peak); ``max-autotune`` searches kernel configurations
(long compiles). CUDA graphs need a GPU; on the CPU ``reduce-overhead`` compiles as ``default``.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch._dynamo
from torch import nn

__all__ = ["CompileBackend", "COMPILE_BACKENDS", "CompileMode", "COMPILE_MODES", "repeated_blocks", "maybe_compile",
           "check_mode"]

log = logging.getLogger(__name__)

CompileBackend = Literal["inductor", "aot_eager", "eager"]
# inductor: generated kernels (the speed); aot_eager: graphs captured and differentiated ahead of time, run
# by the eager kernels (no code generation: finds a capture problem in seconds); eager: capture only.
COMPILE_BACKENDS: tuple[str, ...] = ("inductor", "aot_eager", "eager")
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every member of an ``nn.ModuleList`` whose members all share one class.

    Lists nested inside such a block are not searched (the block is compiled whole).
    """
    found: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            members = list(child.children()) if isinstance(child, nn.ModuleList) else []
            if members and len({type(m) for m in members}) == 1 and any(True for _ in members[0].parameters()):
                found.extend((f"{path}.{i}", m) for i, m in enumerate(members))
            else:
                visit(child, f"{path}.")

    visit(model, "")
    return found


def maybe_compile(model: nn.Module, enabled: bool, backend: str = "inductor", mode: str = "default") -> nn.Module:
    """Compile ``model``'s repeated blocks in place when ``enabled``; returns ``model`` itself.

    Args:
        model: a phase's model (the objective's model around its encoder).
        enabled: ``train.compile``; nothing happens when False.
        backend: ``train.compile_backend``, one of :data:`COMPILE_BACKENDS`.
        mode: ``train.compile_mode``, one of :data:`COMPILE_MODES` (other than ``default``: inductor only).

    Raises:
        ValueError: an unknown backend or mode, a mode the backend does not take, or a model without
            repeated blocks to compile.
    """
    if not enabled:
        return model
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"train.compile_backend: unknown backend {backend!r}; choose one of {list(COMPILE_BACKENDS)}")
    check_mode(backend, mode)
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"train.compile: {type(model).__name__} has no repeated blocks (an nn.ModuleList of one "
                         f"module class) to compile")

    torch._dynamo.reset()  # the previous phase's graphs are never used again
    for _, block in blocks:
        block.compile(backend=backend, dynamic=False, mode=None if mode == "default" else mode)
    log.info("train.compile: %d blocks of %s compiled with torch.compile (backend %s, mode %s, static shapes); the "
             "first steps of the phase include the compilation", len(blocks), type(model).__name__, backend, mode)
    return model


def check_mode(backend: str, mode: str) -> None:
    """Raise ValueError, naming the key, for an unknown mode or one that ``backend`` does not take."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile_mode: unknown mode {mode!r}; choose one of {list(COMPILE_MODES)}")
    if mode != "default" and backend != "inductor":
        raise ValueError(f"train.compile_mode: {mode!r} is a mode of the inductor backend, not of "
                         f"train.compile_backend {backend!r}")
