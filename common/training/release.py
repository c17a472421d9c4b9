"""Releasing a phase's DeepSpeed engine at a phase change: nothing of the old phase outlives it.

A DeepSpeed engine and its model hold each other in a reference cycle: the engine keeps the module, and
the module's forward pre- and post-hooks are closures over the engine (and, under ZeRO, every parameter's
gradient hook is a closure over the ZeRO optimizer). The trainer keeps the model after its phase (its
weights are adapted to the next phase's grid), so without care the whole engine stays reachable through
those hooks: the optimizer state (Adam's two moments, ZeRO's fp32 master partitions and buckets) lives on
into the next phase, and once the old model is dropped only a cyclic garbage collection frees any of it.
On SSAST-base that is the size of its fp32 weights and Adam moments on the device during phase 2.

:func:`release_engine` hands back the bare model and leaves nothing of the engine reachable from it: it
removes the engine's module hooks, lets DeepSpeed take its own state down (``engine.destroy()``: the ZeRO
gradient hooks, its debug table of parameter names), empties the optimizer state and drops the gradients.
The trainer collects garbage once the old model itself is no longer referenced (after the next phase's
model is built from it).
"""

from __future__ import annotations

import gc

import torch
from torch import nn

__all__ = ["release_engine", "collect"]


def _optimizers(optimizer) -> list:
    """``optimizer`` and the optimizers it wraps (DeepSpeed's ZeRO and mixed-precision wrappers keep the torch
    optimizer as ``.optimizer``)."""
    found, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        found.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return found


def release_engine(engine) -> nn.Module:
    """The model of ``engine`` (its trained weights), with the engine's hooks removed and its optimizer state,
    gradients and DeepSpeed's bookkeeping released; ``engine`` is unusable afterwards."""
    module = engine.module
    for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, name, None)
        if handle is not None and hasattr(handle, "remove"):
            handle.remove()
            setattr(engine, name, None)
    optimizers = _optimizers(getattr(engine, "optimizer", None))
    for opt in optimizers:
        if hasattr(opt, "unregister_grad_acc_post_hooks"):
            opt.unregister_grad_acc_post_hooks()
    engine.destroy()  # ZeRO's per-parameter gradient hooks, DeepSpeed's debug name table
    # lazy: importing DeepSpeed takes seconds; --help and --dry-run do not need it
    from deepspeed.utils.debug import debug_clear_module_and_param_names

    debug_clear_module_and_param_names()  # (also where destroy() did not get that far)
    for opt in optimizers:
        state = getattr(opt, "state", None)
        if hasattr(state, "clear"):
            state.clear()  # Adam's moments: the phase's last checkpoint has them
    for param in module.parameters():
        param.grad = None
    for name in ("optimizer", "basic_optimizer", "client_optimizer", "lr_scheduler", "client_lr_scheduler"):
        if name in vars(engine):
            vars(engine)[name] = None  # whatever still holds the engine no longer holds the phase's state
    return module


def collect() -> None:
    """Free what the released phase left in reference cycles (after its last reference is gone), and give the
    device's cached blocks of it back."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
