"""The DeepSpeed engine's ZeRO settings: ZeRO only where it pays, communication overlapped on several ranks.

- One rank (``train.zero_stage: auto``, the default): stage 0. ZeRO partitions the optimizer state across
  ranks; on one rank there is nothing to partition, and stage 1 would only add work to every step (a copy of
  each gradient into a flat bucket, an fp32 master copy, a gradient norm in float64) and a bucket of memory.
- Several ranks (``auto``): stage 1 with ``overlap_comm``: each rank keeps its share of Adam's moments and
  fp32 weights, and the gradients are reduced bucket by bucket while the backward pass still runs (stage 0
  reduces the whole gradient after the backward pass, in one go).
- Buckets of 5e7 elements for the reduction and the all-gather of the updated weights (DeepSpeed's default is
  5e8): a ViT-base-size model (about 90M parameters) then reduces in about two buckets that overlap with the
  backward pass instead of one at its end, and the bucket costs 200 MB of fp32 memory instead of 2 GB.

A recipe's explicit ``train.zero_stage`` (0, 1 or 2), ``train.zero_overlap_comm`` and ``train.zero_bucket_size``
win over these defaults. A resumed run keeps the stage its checkpoint was written with (``auto`` resolves to it),
so a run that started on one rank and resumes on two, or the other way round, loads its own optimizer state
(a stage-0 checkpoint as it is, a ZeRO one through DeepSpeed's universal format, ``common.training.checkpoints``).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["ZeroStage", "ZERO_BUCKET", "resolve_zero_stage", "zero_config"]

ZeroStage = Literal["auto", 0, 1, 2]
# elements per reduce / all-gather bucket: about two buckets for a ViT-base-size model (see the docstring)
ZERO_BUCKET = int(5e7)


def resolve_zero_stage(stage: ZeroStage, world_size: int, saved: int | None = None) -> int:
    """The ZeRO stage a run uses: the recipe's if it names one, else the stage of the checkpoint it resumes
    (``saved``), else 0 on one rank and 1 on several."""
    if stage != "auto":
        return int(stage)
    if saved is not None:
        return int(saved)
    return 0 if world_size <= 1 else 1


def zero_config(stage: int, world_size: int, overlap_comm: bool | None = None,
                bucket_size: int | None = None, grad_clip: float = 0.0) -> dict:
    """DeepSpeed's ``zero_optimization`` section for ``stage`` on ``world_size`` ranks; ``overlap_comm`` and
    ``bucket_size`` (elements) override the defaults (module docstring) where given.

    Without gradient clipping (``grad_clip`` 0) ZeRO-1/2 computes no gradient norm: with fp32 weights (the
    autocast runs keep them) DeepSpeed read that norm on the host at every step to skip a step on a non-finite
    gradient, a wait for the device per step; the run's own non-finite check (``train.nonfinite_check``) stops
    on a non-finite loss instead, as it does without ZeRO. With clipping the norm is needed and read."""
    section: dict = {"stage": stage}
    if stage >= 1:
        bucket = ZERO_BUCKET if bucket_size is None else bucket_size
        section.update(overlap_comm=(world_size > 1) if overlap_comm is None else overlap_comm,
                       reduce_bucket_size=bucket, allgather_bucket_size=bucket, contiguous_gradients=True)
        if stage in (1, 2) and not grad_clip:
            section["compute_grad_norm"] = False
    return section
