"""A run directory's recipe: what a resumed run may change, and the recipe written when the run has trained
(:class:`RunRecipe`); ``common.training.run_dir`` checks a resume by these rules.

``RUN/recipe.yaml`` is the resolved recipe of the run in ``RUN``. It is written with the run's first
checkpoint, not before: a run that fails before it leaves nothing that would refuse the corrected command.
Re-running on a run directory that holds checkpoints resumes it, and the recipe must be the same, except

- settings that do not change what is computed (:data:`RESUMABLE_CHANGES`), and
- the documented recovery after a non-finite loss: another learning rate or schedule
  (:data:`RECOVERY_CHANGES`, ``phases.N.lr``), and after too much bad audio: another
  ``data.max_bad_fraction`` (:data:`TOLERANCE_CHANGES`), and after running out of device memory: a smaller
  micro-batch, ``data.max_batch_per_rank`` (:data:`MEMORY_CHANGES`: the same global batch in more accumulated
  micro-batches; the data position is converted), accepted and recorded in ``ledger.json`` as an intervention by
  the trainer.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from common.config.recipe import dump_yaml, to_dict
from common.models.arch import official_channels

__all__ = ["RESUMABLE_CHANGES", "RECOVERY_CHANGES", "TOLERANCE_CHANGES", "MEMORY_CHANGES", "BEFORE_KEY", "RunRecipe",
           "flat_keys", "by_behaviour", "field_defaults", "recipe_diff", "recovery_change"]

# keys that may change between a run and its resumption (they do not change what is computed)
RESUMABLE_CHANGES = ("data.num_workers", "train.cpu_threads", "train.log_every", "train.keep_checkpoints",
                     "train.eval_batches", "data.eval_batch_size", "train.accept_baseline_differences",
                     "transfer.init_pos_embed")  # the last: how --init is fitted, read only when a run starts
# the documented recovery after a non-finite loss: resume with another learning rate or schedule
RECOVERY_CHANGES = ("optim.lr", "optim.warmup_steps", "optim.schedule", "optim.patience", "optim.decay",
                    "optim.decay_start", "optim.decay_every", "optim.min_lr")
# the documented recovery after too much bad audio (the error names it): tolerate a larger share
TOLERANCE_CHANGES = ("data.max_bad_fraction",)
# the documented recovery after the device ran out of memory (the error names it): a smaller micro-batch
MEMORY_CHANGES = ("data.max_batch_per_rank",)
_PHASE_LR = re.compile(r"phases\.\d+\.lr")


def flat_keys(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(flat_keys(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(flat_keys(value, f"{prefix}.{i}"))
        return out
    return {prefix: data}


# keys that name a file: the same file by another spelling (relative, absolute; a recipe.yaml of an older version
# stored the path as typed) is no change
_PATHS = ("baseline",)
# keys that name the manifests a run reads: another spelling of the same manifests (another working folder, a link,
# absolute for relative paths) is no change of the recipe; what they hold is compared by their fingerprints, in
# order (common.training.interventions.check_data: a changed manifest is refused there, unless
# --accept-changed-data). Not task.data_root: its class list and test split are not fingerprinted
LOCATIONS = re.compile(r"data\.train\.\d+\.path|data\.valid")


def _same(key: str, a, b) -> bool:
    if key in _PATHS and isinstance(a, str) and isinstance(b, str):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


# keys added with a default other than what the code did before them: a recipe.yaml written before a key existed
# did this (every training set streamed through the shuffle buffer; training clips cropped at random)
BEFORE_KEY = {"data.shuffle": "buffer", "data.full_shuffle_max": 0, "data.train_crop": "random"}


def by_behaviour(flat: dict) -> dict:
    """A flattened recipe with what a setting does in place of how it is written: ``data.channels: auto`` is the
    architecture's (HTS-AT: ``mean``, the AST family: ``first``), and a recipe written before the key existed read
    the first channel; SSAST's ``ssast.eval_mask_ratio`` is the ratio it masks (``null``, or a recipe written
    before the key existed: the training ratio); the keys of :data:`BEFORE_KEY`, absent, are what they say."""
    channels = flat.get("data.channels", "first")
    if channels == "auto":
        channels = official_channels(flat.get("model.arch", "ast"))
    out = {**BEFORE_KEY, **flat, "data.channels": channels}
    if "ssast.mask_ratio" in flat:
        masked = flat.get("ssast.eval_mask_ratio")
        out["ssast.eval_mask_ratio"] = masked if masked is not None else flat["ssast.mask_ratio"]
    return out


def field_defaults(recipe, prefix: str = "") -> dict:
    """The flattened keys of a recipe's dataclass tree with the default each field gives (lists of sections, such
    as ``phases``, have none)."""
    out = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if dataclasses.is_dataclass(value):
            out.update(field_defaults(value, f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[prefix + f.name] = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[prefix + f.name] = to_dict(f.default_factory())
    return out


def recipe_diff(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """Keys whose values differ between two resolved recipes (ignoring harmless ones; a key by what it does).

    ``defaults`` (:func:`field_defaults`): a key that a ``recipe.yaml`` written before the key existed lacks is
    the same when the new recipe gives it its default, as a new key's default keeps the behaviour from before it;
    the keys whose absence means something else are read in :func:`by_behaviour` (``data.channels``,
    :data:`BEFORE_KEY`): such a run is refused unless ``--set`` gives them the old behaviour."""
    a, b, defaults = by_behaviour(flat_keys(old)), by_behaviour(flat_keys(new)), defaults or {}
    return sorted(k for k in set(a) | set(b) if not _same(k, a.get(k), b.get(k))
                  and not (k not in a and k in defaults and _same(k, defaults[k], b.get(k)))
                  and not k.startswith(RESUMABLE_CHANGES) and not LOCATIONS.fullmatch(k))


def recovery_change(key: str) -> bool:
    """Whether a resumed run may change ``key``: learning-rate and schedule settings (see RECOVERY_CHANGES), the
    bad-audio tolerance (TOLERANCE_CHANGES) and the micro-batch cap (MEMORY_CHANGES)."""
    return key in RECOVERY_CHANGES or key in TOLERANCE_CHANGES or key in MEMORY_CHANGES or \
        bool(_PHASE_LR.fullmatch(key))


@dataclass
class RunRecipe:
    """What the trainer does with the run directory's recipe.

    Attributes:
        path: ``RUN/recipe.yaml`` (a fold's trainer writes its run's, one folder up).
        pending: the recipe to write with the next checkpoint (None: the file is up to date).
        changes: accepted recovery changes, ``{key: {"from": old, "to": new}}``, for the ledger.
        accept_changed_data: resume although the manifests changed since the run started
            (``--accept-changed-data``; ``common.data.fingerprint``).
    """

    path: Path
    pending: object | None = None
    changes: dict[str, dict] = field(default_factory=dict)
    accept_changed_data: bool = False

    def write_pending(self) -> None:
        """Write the held-back recipe (rank 0, with a checkpoint); later calls do nothing."""
        if self.pending is not None:
            dump_yaml(self.pending, self.path)
            self.pending = None
