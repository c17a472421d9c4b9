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

Where compiled code is cached. Inductor keeps its compiled graphs (and Triton's kernels) in
``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``: a predictable name in a folder every user
can write, created without an owner check, whose files torch unpickles. Another local user who makes that folder
first runs code in your training. Unless the variable is set, a compiling run points it at a private folder
(:func:`private_inductor_cache`: ``$XDG_CACHE_HOME/coarse2fine/inductor``, by default
``~/.cache/coarse2fine/inductor``, created 0700), and refuses one that another user owns or that others may
write. A ``TORCHINDUCTOR_CACHE_DIR`` set by the user is theirs, used as it is (but for torch's default, which
importing ``torch._dynamo`` writes into the environment itself).
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Literal

import torch._dynamo
from torch import nn

try:  # torch's default inductor cache, which importing torch._dynamo already writes into the environment
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as _torch_default_cache
except ImportError:  # another torch version: the same rule
    def _torch_default_cache() -> str:
        return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser()))

__all__ = ["CompileBackend", "COMPILE_BACKENDS", "CompileMode", "COMPILE_MODES", "repeated_blocks", "maybe_compile",
           "check_mode", "private_inductor_cache"]

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
        ValueError: an unknown backend or mode, a mode the backend does not take, a model without
            repeated blocks to compile, or an inductor cache folder that is not private
            (:func:`private_inductor_cache`).
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

    private_inductor_cache()  # before anything compiles: torch reads the variable when it first caches
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


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def private_inductor_cache() -> Path | None:
    """Point ``TORCHINDUCTOR_CACHE_DIR`` at this user's own folder unless it is set (see the module docstring):
    ``$XDG_CACHE_HOME/coarse2fine/inductor`` (an absolute ``XDG_CACHE_HOME``; else ``~/.cache/...``), created with
    mode 0700. Returns the folder set, or None when the variable was set already to another folder than torch's
    default (the user's choice, kept).

    Raises:
        ValueError: the folder cannot be made, is another user's, or is writable by its group or others (one
            line naming it and what to do).
    """
    given = os.environ.get(INDUCTOR_CACHE_ENV)
    if given and os.path.abspath(given) != os.path.abspath(_torch_default_cache()):
        return None
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    advice = f"or set {INDUCTOR_CACHE_ENV} to a folder of your own"
    try:
        folder = (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "coarse2fine" / "inductor"
    except RuntimeError:  # no HOME and no password entry for this user (a container run as a bare uid)
        raise ValueError(f"train.compile: no home folder for the private compile cache; set XDG_CACHE_HOME to an "
                         f"absolute folder {advice}") from None
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError as err:
        raise ValueError(f"train.compile: cannot make the private compile cache {folder} ({err.strerror or err}); "
                         f"make it writable {advice}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"train.compile: the compile cache {folder} is not a folder; remove it {advice}")
    if info.st_uid != os.getuid():
        raise ValueError(f"train.compile: the compile cache {folder} belongs to another user (uid {info.st_uid}), "
                         f"who could plant code that torch would load; remove it {advice}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(f"train.compile: the compile cache {folder} is writable by others (mode "
                         f"{stat.S_IMODE(info.st_mode):o}), who could plant code that torch would load; run chmod "
                         f"go-w {folder} {advice}")
    os.environ[INDUCTOR_CACHE_ENV] = str(folder)
    log.info("train.compile: compiled code is cached in %s (%s unset: torch's default is a shared /tmp folder)",
             folder, INDUCTOR_CACHE_ENV)
    return folder
