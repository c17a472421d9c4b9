"""Whether weights fit a model, said in words before ``load_state_dict`` would raise its RuntimeError (a
traceback): missing and unexpected keys, shapes, and tensors no model should start from (integers where the model
has floating-point weights, NaN or infinite values)."""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["misfit", "load_checked"]


def misfit(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], fresh: tuple[str, ...] = ()) -> str | None:
    """What keeps ``state`` from loading into a module whose state dict is ``own`` (tensors, or anything with a
    ``shape``): missing keys (but those starting with a ``fresh`` prefix), unexpected keys, and shapes that differ,
    the first few of each, in words; None when it fits."""
    missing = [k for k in own if k not in state and not k.startswith(fresh)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(v.shape)} (the model's {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    parts = [f"{what} {items[:5] if what != 'wrong shapes' else '; '.join(items[:5])}"
             + (f" ({len(items)} in all)" if len(items) > 5 else "")
             for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
             if items]
    return ", ".join(parts) or None


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike,
                 fresh: tuple[str, ...] = ()) -> nn.Module:
    """Load ``state`` into ``module`` (each tensor cast to the dtype of the module's own), key for key and shape
    for shape (but keys starting with a ``fresh`` prefix, which the module may keep as they are).

    Raises:
        ValueError: the weights do not fit, naming ``source`` (the file) and the first mismatching keys and shapes
            (``load_state_dict``'s RuntimeError would be a traceback); a tensor of integers where the model has
            floating-point weights, or one holding NaN or infinite values, naming the key.
    """
    own = module.state_dict()
    problem = misfit(own, state, fresh)
    if problem is not None:
        raise ValueError(f"{source}: the weights do not fit the model its config describes: {problem}")
    for key, value in state.items():  # a cast would make integers or NaN weights a model that says nothing
        if own[key].is_floating_point() and not value.is_floating_point():
            raise ValueError(f"{source}: tensor {key} holds {str(value.dtype).replace('torch.', '')} values; the "
                             f"model's weights are floating point")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{source}: tensor {key} holds NaN or infinite values")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=not fresh)
    return module
