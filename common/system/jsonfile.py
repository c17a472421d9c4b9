"""JSON that every reader accepts: the files and ``--json`` outputs users read with other tools.

Python writes a float that is not finite as ``NaN`` or ``Infinity``, which are not JSON (JavaScript's
``JSON.parse`` refuses them, jq turns them into null or a huge number). Metrics can be such values: the mAUC of
a set where no class has both positives and negatives is undefined, and the d' of a perfect (or perfectly
wrong) mAUC is infinite, as AST computes it. They are written ``null`` here; :func:`undefined_as_nan` reads a
null metric back as NaN.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["strict", "dumps", "undefined_as_nan"]


def strict(value: Any) -> Any:
    """``value`` (dicts, lists, tuples, numbers, strings) with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`strict` ``(value)``; a non-finite float it missed (in a type it does not walk) is
    an error, never an invalid file."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def undefined_as_nan(metrics: dict) -> dict:
    """Metrics read back from a file :func:`dumps` wrote: null (undefined, or an infinite d') is NaN."""
    return {k: float("nan") if v is None else v for k, v in metrics.items()}
