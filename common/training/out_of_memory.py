"""A run that runs out of device memory: one line that says where, how much, who else holds the device, and
what to change.

PyTorch's error (``torch.OutOfMemoryError`` on a GPU; a ``RuntimeError`` of the CPU allocator) is a traceback
and a paragraph of allocator statistics. On a shared machine the usual cause is another process on the same
GPU, which PyTorch's message names ("Process 4321 has 30.00 GiB memory in use"); otherwise the micro-batch is
too large for the phase, which ``data.max_batch_per_rank`` lowers while keeping the global batch (more gradient
accumulation: the same optimisation, ``common.training.batch``). Nothing is lost: the run resumes from its
last checkpoint.
"""

from __future__ import annotations

import re

import torch

__all__ = ["OutOfDeviceMemory", "is_out_of_memory", "out_of_memory", "describe_out_of_memory"]


class OutOfDeviceMemory(RuntimeError):
    """The device ran out of memory (a run that stopped: exit status 1, resumable)."""


# The words of a device's out-of-memory error raised outside PyTorch's caching allocator (all RuntimeErrors): a
# cudaMalloc of the runtime itself (``torch.AcceleratorError``: "CUDA error: out of memory", e.g. at context
# creation), cuBLAS / cuDNN creating their handles (the first allocation outside PyTorch's pool: the usual form on a
# GPU another process fills), NCCL's buffers (``DistBackendError``: "Cuda failure 2 'out of memory'"); and the CPU
# allocator's.
_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "CUDA error: out of memory", "_STATUS_ALLOC_FAILED",
                  "'out of memory'", "cudaErrorMemoryAllocation")


def is_out_of_memory(err: BaseException) -> bool:
    """A GPU's out-of-memory error (the caching allocator's, or one of cuBLAS, cuDNN, NCCL or the CUDA runtime),
    or the CPU allocator's."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(words in str(err) for words in _OUT_OF_MEMORY))


def _torch_words(err: BaseException) -> str:
    """The sentences of PyTorch's message that say what was asked and who holds the device (not its allocator
    statistics and advice)."""
    text = " ".join(str(err).split())
    keep = [s.strip() for s in re.split(r"(?<=\.) (?=[A-Z])", text)
            if re.search(r"Tried to allocate|total capacity|Process \d+ has|this process has|you tried to allocate",
                         s)]
    lines = [line for line in str(err).strip().splitlines() if line.strip()] or [""]
    said = next((line for line in lines if any(words in line for words in _OUT_OF_MEMORY)), lines[0])
    return " ".join(keep) or " ".join(said.split())[:300]  # the line that says so, not CUDA's debugging advice


def out_of_memory(err: BaseException, device: torch.device, where: str, micro_batch: int,
                  estimate_bytes: int | None, validating: bool = False) -> OutOfDeviceMemory:
    """The error to raise for ``err`` (:func:`is_out_of_memory`), raised on ``device`` in ``where`` (``phase2
    (full resolution) at step 1200``) with ``micro_batch`` clips per rank per forward pass, of which the plan
    estimated ``estimate_bytes``; ``validating``: in a validation pass (its batch is ``data.eval_batch_size``)."""
    words = _torch_words(err)
    text = str(err)
    resume = "then run the same command again to resume from the last checkpoint"
    if "DataLoader worker process" in text:  # a loader worker's allocation, re-raised here
        return OutOfDeviceMemory(f"a data loader worker ran out of host memory in {where}: {words} Lower "
                                 f"data.num_workers (each decodes batches ahead), or run where more memory is free; "
                                 f"{resume}")
    host = "DefaultCPUAllocator" in text
    what = f"{device}" if not host or device.type == "cpu" else f"the host's memory (not {device}'s)"
    planned = f", planned at {estimate_bytes / 2**30:.3g} GiB" if estimate_bytes and not host else ""
    others = re.findall(r"Process (\d+) has ([\d.]+ [KMGT]iB) memory in use", words)
    advice = []
    if others:
        held = ", ".join(f"pid {pid}: {size}" for pid, size in others)
        advice.append(f"other processes hold memory on this device ({held}): run where they are not "
                      f"(CUDA_VISIBLE_DEVICES) or when they are done")
    if validating and micro_batch > 1:
        advice.append(f"lower the validation batch: --set data.eval_batch_size={micro_batch // 2}")
    elif micro_batch > 1:
        advice.append(f"lower the micro-batch: --set data.max_batch_per_rank={micro_batch // 2} keeps the global "
                      f"batch (more gradient accumulation)")
    else:
        advice.append("one clip per pass does not fit: a smaller model, or train.precision bf16 where it is fp32")
    advice = "; or ".join(advice)
    return OutOfDeviceMemory(
        f"{what} ran out of memory in {where} ({micro_batch} clip(s) per rank per forward pass{planned}): {words} "
        f"{advice[0].upper()}{advice[1:]}; {resume}")


def describe_out_of_memory(err: BaseException) -> str | None:
    """One line for an out-of-memory error outside training (prediction, evaluation, embedding: their
    ``--batch-size``); None for another error."""
    if not is_out_of_memory(err):
        return None
    return (f"out of memory: {_torch_words(err)} Lower the batch (evaluate and embed: --batch-size; a training "
            f"command: data.eval_batch_size, data.max_batch_per_rank), or run where more memory is free")
