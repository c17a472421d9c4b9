"""Coarse to fine from any baseline: ``--coarse METHOD:C[:SHARE]`` turns a full-resolution recipe into the
paper's schedule.

The recipe field ``coarse:`` (:class:`CoarseConfig`; the flag fills it in) takes a recipe with one
full-resolution phase of length ``L`` (steps or epochs) and derives the phases (paper sections 3.3-3.5):

- epoch-based (fine-tuning, AST / HTS-AT): the initial phases take ``share`` of ``L`` (default 25 %, the
  paper's "about 25 % of the baseline's epochs"; 30 % for three phases, section 3.4) and the final phase
  the rest: 20 epochs -> 5 + 15, 5 (AudioSet) -> 1 + 4, 20 three-phase -> 3 + 3 + 14;
- iteration-based (SSAST pretraining): the initial phases take ``share`` of ``L`` (default 1/8) and the
  final phase ``final_share`` (default 5/8), as the paper's 100K + 500K steps against the baseline's
  800K (three phases: 50K + 50K + 500K).

Several factors (``fshift:4,2``, also written ``4-2`` or ``4->2``) give ``4 -> 2 -> 1``: the initial share
is split evenly between the coarse phases. Lengths are rounded half up, each at least 1. ``until:`` (for
the coarse phases) and ``final_until:`` (for the final one) let criteria end them instead
(``common.phases.until``); their ``max`` defaults to the derived length. The phases keep the baseline
phase's batch size and learning rate.

The baseline is recorded in the resolved recipe (``coarse.baseline``: its name and phases, which also
marks the recipe as derived, so a resolved ``recipe.yaml`` is not derived twice); the run's plan
(``common.training.plan``) plans it beside the schedule, so the ledger's saving is against the recipe it came
from, and ``--dry-run`` prints the derived schedule with its planned saving.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from common.audio.compression import METHODS as COMPRESSIONS
from common.config.recipe import RecipeError, build, merge, parse_yaml
from common.models.ast.resize import PatchResize
from common.phases.config import PhaseConfig
from common.phases.until import UntilConfig

__all__ = ["CoarseConfig", "CoarseBaseline", "baseline_name", "parse_coarse", "derive_phases", "apply_coarse",
           "build_derived", "coarse_tag"]

METHODS = tuple(m for m in COMPRESSIONS if m != "none")  # every compression method of a coarse phase


@dataclass(frozen=True)
class CoarseBaseline:
    """The recipe a schedule was derived from (written by the derivation, not by hand).

    Args:
        name: the baseline recipe's name (the recipe file's stem, or the task's default recipe).
        phases: its phases.
    """

    name: str
    phases: list[PhaseConfig]


@dataclass(frozen=True)
class CoarseConfig:
    """How to derive a coarse-to-fine schedule from a full-resolution recipe.

    Args:
        method: the compression of the coarse phases: ``fshift``, ``avgpool``, ``maxpool`` or ``patch``.
        factors: one factor per coarse phase, decreasing, each >= 2 (``[4]``: 4 -> 1; ``[4, 2]``: 4 -> 2 -> 1).
        share: the coarse phases' share of the baseline's length (default: 0.25, or 0.30 for several coarse
            phases, epoch-based; 1/8 iteration-based).
        final_share: the final phase's share (default: the rest, epoch-based; 5/8 iteration-based).
        patch_transfer: ``pi`` or ``bilinear`` for ``patch`` phases.
        until: end the coarse phases by a criterion (``max`` defaults to the derived length).
        final_until: end the final phase by a criterion, or cap it for ``train.stop_when_surpassing``.
        baseline: set by the derivation: the recipe the schedule came from.
    """

    method: Literal[METHODS]
    factors: list[int]
    share: float | None = None
    final_share: float | None = None
    patch_transfer: PatchResize = "pi"
    until: UntilConfig | None = None
    final_until: UntilConfig | None = None
    baseline: CoarseBaseline | None = None

    def __post_init__(self) -> None:
        if not self.factors:
            raise ValueError("coarse.factors: give at least one compression factor")
        if any(f < 2 for f in self.factors) or list(self.factors) != sorted(set(self.factors), reverse=True):
            raise ValueError(f"coarse.factors: factors must be >= 2 and strictly decreasing, got {list(self.factors)}")
        for key in ("share", "final_share"):
            value = getattr(self, key)
            if value is not None and not 0 < value < 1:
                raise ValueError(f"coarse.{key}: a share of the baseline's length in (0, 1), got {value}")

    def shares(self, iteration_based: bool) -> tuple[float, float | None]:
        """``(share, final_share)`` with the paper's defaults (``final_share`` None: the rest)."""
        if iteration_based:
            return self.share or 1 / 8, self.final_share or 5 / 8
        return self.share or (0.25 if len(self.factors) == 1 else 0.30), self.final_share

    def describe(self) -> str:
        """E.g. ``fshift 4->1``."""
        return f"{self.method} {'->'.join(map(str, [*self.factors, 1]))}"


def parse_coarse(text: str) -> dict:
    """``METHOD:C[:SHARE]`` -> the ``coarse`` recipe fields it sets.

    ``C`` is a factor or several (``4,2``, ``4-2``, ``4->2``); ``SHARE`` a fraction (``0.25``) or a
    percentage (``25%``) of the baseline's length.

    Raises:
        RecipeError: naming ``--coarse`` and the value.
    """
    def bad(why: str) -> RecipeError:
        return RecipeError(f"--coarse {text!r}: {why} (expected METHOD:C[:SHARE], e.g. fshift:4 or fshift:4,2:0.3)")

    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise bad("not of the form METHOD:C[:SHARE]")
    method = parts[0].strip().lower()
    if method not in METHODS:
        raise bad(f"unknown method {parts[0]!r}; one of {', '.join(METHODS)}")
    raw_factors = parts[1].strip()
    if not re.fullmatch(r"\d+((\s*(,|->|-|>)\s*|\s+)\d+)*", raw_factors):  # "-4" is no factor, not 4
        raise bad(f"C must be a factor or factors like 4 or 4,2 (whole numbers >= 2), got {parts[1]!r}")
    factors = re.findall(r"\d+", raw_factors)
    out = {"method": method, "factors": [int(f) for f in factors]}
    if len(parts) == 3:
        raw = parts[2].strip()
        try:
            share = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError:
            raise bad(f"SHARE must be a fraction like 0.25 or a percentage like 25%, got {raw!r}") from None
        out["share"] = share
    return out


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def derive_phases(base: PhaseConfig, cfg: CoarseConfig) -> list[PhaseConfig]:
    """The coarse-to-fine phases derived from the baseline's one full-resolution phase.

    Raises:
        ValueError: a derived phase would be empty.
    """
    length, steps = base.length, base.iteration_based
    share, final_share = cfg.shares(steps)
    each = _round(share * length / len(cfg.factors))
    if each < 1:
        raise ValueError(f"coarse.share: {share:g} of {length} {'steps' if steps else 'epochs'} leaves less than "
                         f"one per coarse phase")
    final = _round(final_share * length) if final_share is not None else length - each * len(cfg.factors)
    if final < 1:
        raise ValueError(f"coarse.share: the coarse phases ({len(cfg.factors)} x {each}) leave nothing of the "
                         f"baseline's {length} {'steps' if steps else 'epochs'} for the final phase")

    def phase(compression: str, factor: int, n: int, until: UntilConfig | None) -> PhaseConfig:
        unit = {"steps": n} if steps else {"epochs": n}
        try:
            return PhaseConfig(compression=compression, factor=factor, patch_transfer=cfg.patch_transfer,
                               batch_size=base.batch_size, lr=base.lr, until=until, **unit)
        except ValueError as err:
            key = "coarse.until" if compression != "none" else "coarse.final_until"
            raise ValueError(f"{key}: the derived phase has {n} {next(iter(unit))}: {err}") from None

    return [*(phase(cfg.method, f, each, cfg.until) for f in cfg.factors), phase("none", 1, final, cfg.final_until)]


def coarse_tag(cfg: CoarseConfig) -> str:
    """A short name for run directories, e.g. ``fshift4``, ``fshift4-2-0.3``, ``fshift4-plateau``."""
    tag = f"{cfg.method}{'-'.join(map(str, cfg.factors))}"
    if cfg.share is not None:
        tag += f"-{cfg.share:g}"
    if cfg.until is not None and cfg.until.criterion:
        tag += f"-{cfg.until.criterion}"
    return tag


def baseline_name(recipe_path) -> str:
    """The name a schedule derived from the recipe file ``recipe_path`` records as its baseline: the file's
    own, or, for a file that extends another and asks for ``coarse:`` itself, the recipe it extends (the
    full-resolution recipe the schedule came from)."""


    path = Path(recipe_path)
    raw = parse_yaml(path.read_text()) if path.is_file() else None
    if isinstance(raw, dict) and "coarse" in raw and isinstance(raw.get("extends"), str):
        return Path(raw["extends"]).stem
    return path.stem


def apply_coarse(data: dict, name: str, flag: str | None = None) -> tuple[dict, str | None]:
    """Derive the phases of a raw recipe (a mapping) whose ``coarse`` section or ``--coarse`` flag asks for it.

    Args:
        data: the recipe's mapping after ``extends`` and ``--set``.
        name: the baseline's name for the record (the recipe's).
        flag: the ``--coarse`` value (overrides the recipe's ``coarse`` method, factors and share).

    Returns:
        ``(data, label)``: the mapping with the derived ``phases`` (:class:`PhaseConfig` objects) and the
        ``coarse`` section with its ``baseline`` record (a :class:`CoarseConfig`), which the recipe's ``build``
        takes as they are, and the label to prefix errors of the derived recipe with (None when nothing was
        derived).

    Raises:
        RecipeError: a bad ``--coarse`` / ``coarse`` value, or a recipe that is not one full-resolution phase.
    """
    label = f"--coarse {flag}" if flag else "coarse"
    if flag:
        data = {**data, "coarse": merge(data.get("coarse") or {}, parse_coarse(flag))}
    raw = data.get("coarse")
    if raw is None:
        return data, None
    try:
        cfg = build(CoarseConfig, raw, "coarse")
    except RecipeError as err:
        raise RecipeError(f"{label}: {err}" if flag else str(err)) from None
    if cfg.baseline is not None:  # a resolved recipe: derived already
        return data, None
    raw_phases = data.get("phases")
    if not isinstance(raw_phases, list):
        raise RecipeError(f"{label}: the recipe has no phases list to derive from")
    phases = [build(PhaseConfig, p, f"phases.{i}") for i, p in enumerate(raw_phases)]
    if len(phases) != 1 or phases[0].compression != "none" or phases[0].factor != 1:
        raise RecipeError(f"{label}: derives a schedule from a full-resolution recipe (one phase at factor 1); this "
                          f"one has {len(phases)} phase(s): "
                          + ", ".join(p.as_compression().describe() for p in phases))
    try:
        derived = derive_phases(phases[0], cfg)
    except ValueError as err:
        raise RecipeError(f"{label}: {err}") from None
    # built once: the recipe takes the derived phases and the record as they are (no round trip through a mapping)
    return {**data, "phases": derived, "coarse": replace(cfg, baseline=CoarseBaseline(name, phases))}, label


def build_derived(cls, data: dict, label: str | None):
    """``build(cls, data)``, with errors of a derived recipe saying what derived it: first for the derived phases
    (what wrote them is ``label``), after the key they start with for any other key (which
    :func:`common.config.recipe.with_source` then finds where it was written)."""
    try:
        return build(cls, data)
    except RecipeError as err:
        if label is None:
            raise
        if str(err).startswith("phases"):
            raise RecipeError(f"{label}: the derived schedule is invalid: {err}") from None
        raise RecipeError(f"{err} (in the schedule {label} derived)") from None
