"""Can the installed PyTorch use this machine's GPU: said before a command picks its device, not after.

Two ways a GPU machine goes wrong on the first day, both silent or late without this check:

- PyTorch sees no GPU where the host has one: a wheel built for a newer CUDA than the NVIDIA driver offers (the
  default wheel of PyTorch 2.11 is built for CUDA 13, which needs a recent driver; shared clusters often run older
  ones). ``torch.cuda.is_available()`` is then False, DeepSpeed picks its CPU accelerator, and a recipe sized for
  GPUs trains on the CPU. Said as a warning (:func:`unseen_gpu`): a user may mean to run on the CPU, and hiding
  the GPUs (``CUDA_VISIBLE_DEVICES=``) says so.
- PyTorch sees the GPU but was built for none of its architecture (a V100, sm_70, under a wheel whose lowest is
  sm_75): the first kernel fails with "no kernel image is available" deep in a traceback. Refused in one line
  (:func:`unsupported_gpu`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

__all__ = ["unseen_gpu", "unsupported_gpu", "INSTALL_HINT"]

# where the docs say how to install a PyTorch build for an older driver or GPU
INSTALL_HINT = "docs/pretraining.md#gpus-and-clusters says how to install the PyTorch build for it"

_DRIVER = Path("/proc/driver/nvidia/version")  # the NVIDIA kernel module's, present wherever its driver is loaded
_CONTROL = Path("/dev/nvidiactl")  # the driver's device, which a process allowed to use a GPU can open
_ARCH = re.compile(r"(sm|compute)_(\d+)[a-z]?")  # sm_90, sm_90a, compute_120


def _may_use_gpus(control: Path) -> bool:
    """Whether this process may use the host's GPUs: it can open the driver's control device (a container started
    without GPUs has none; a job whose cgroup denies the devices cannot open it)."""
    try:
        os.close(os.open(control, os.O_RDWR))
    except OSError:
        return False
    return True


def unseen_gpu(driver_file: Path = _DRIVER, control: Path = _CONTROL) -> str | None:
    """Why a host with an NVIDIA driver loaded, whose GPUs this process may use, has none PyTorch can use, or None
    (PyTorch sees one, the host has none, this process may not use them, ``CUDA_VISIBLE_DEVICES`` hides them on
    purpose, or PyTorch is a CPU build, installed for the CPU)."""
    if (torch.cuda.is_available() or torch.version.cuda is None
            or os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1") or not _may_use_gpus(control)):
        return None
    try:
        text = driver_file.read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(?:for \w+\s+)?([\d.]+)", text)
    driver = f"driver {found.group(1)}" if found else "its driver"
    return (f"this machine has an NVIDIA GPU ({driver}) that PyTorch {torch.__version__} cannot use (built for "
            f"CUDA {torch.version.cuda}: a driver older than that CUDA's needs another build; {INSTALL_HINT}), so "
            f"this runs on the CPU; set CUDA_VISIBLE_DEVICES= (empty) to run on the CPU without this warning")


def unsupported_gpu(index: int) -> str | None:
    """Why PyTorch cannot run kernels on CUDA device ``index`` (built for none of its architecture), or None."""
    arches = torch.cuda.get_arch_list()  # e.g. sm_75 ... sm_120, compute_120 (PTX the driver compiles for newer GPUs)
    parsed = [m.groups() for m in map(_ARCH.fullmatch, arches) if m]
    if not parsed or torch.version.hip is not None:  # a list it cannot read (ROCm's gfx90a ...): nothing to say
        return None
    major, minor = torch.cuda.get_device_capability(index)
    have = major * 10 + minor
    numbers = {kind: [int(n) for k, n in parsed if k == kind.rstrip("_")] for kind in ("sm_", "compute_")}
    # a kernel built for sm_XY runs on a GPU of the same major version and a minor at least Y; PTX on any newer one
    if any(n // 10 == major and n <= have for n in numbers["sm_"]) or any(n <= have for n in numbers["compute_"]):
        return None
    return (f"cuda:{index} ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor}) is not among "
            f"the GPUs this PyTorch {torch.__version__} is built for ({' '.join(arches)}); {INSTALL_HINT}, or hide "
            f"it with CUDA_VISIBLE_DEVICES")
