"""A GPU the installed PyTorch cannot use is said before a command picks its device (``common.system.gpu``): a host
whose driver PyTorch's CUDA build cannot use is warned that it runs on the CPU; a GPU of an architecture the build
lacks is refused in one line naming both, not at the first kernel."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from common.system.gpu import unseen_gpu, unsupported_gpu

DEV_NULL = Path("/dev/null")  # a device this process may open, as the driver's control device where it may use GPUs
DRIVER = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.104.05  Release Build  (dvs-builder@U16)\n"
          "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")


def test_a_host_with_a_driver_pytorch_cannot_use_is_warned_that_it_runs_on_the_cpu(tmp_path, monkeypatch):
    driver = tmp_path / "version"
    driver.write_text(DRIVER)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    said = unseen_gpu(driver, control=DEV_NULL)
    assert said.startswith(f"this machine has an NVIDIA GPU (driver 535.104.05) that PyTorch {torch.__version__} "
                           f"cannot use (built for CUDA {torch.version.cuda}: a driver older than that CUDA's needs "
                           f"another build; docs/pretraining.md#gpus-and-clusters says how"), said
    assert "runs on the CPU; set CUDA_VISIBLE_DEVICES= (empty)" in said and "\n" not in said
    assert unseen_gpu(tmp_path / "none") is None  # no NVIDIA driver: a CPU machine, nothing to say
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build, installed for the CPU
    assert unseen_gpu(driver) is None
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert unseen_gpu(driver, control=tmp_path / "nvidiactl") is None  # a container without GPUs, a denying cgroup
    for hidden in ("", "-1"):  # the GPUs hidden on purpose
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert unseen_gpu(driver, control=DEV_NULL) is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert unseen_gpu(driver, control=DEV_NULL) is None


@pytest.mark.parametrize("capability, arches, usable", [
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # a V100 under a CUDA 13 build
    ((7, 5), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], True),  # a T4
    ((8, 9), ["sm_75", "sm_80", "sm_86", "sm_90"], True),  # an L4: sm_86 kernels run on 8.9
    ((12, 1), ["sm_80", "sm_90", "sm_100", "compute_100"], True),  # newer than every kernel: PTX compiled for it
    ((12, 1), ["sm_80", "sm_90", "sm_100"], False),
    ((9, 0), ["sm_80", "sm_90a"], True),  # a suffixed architecture (it stopped every command with int('90a'))
    ((7, 0), ["sm_80", "sm_90a"], False),
    ((9, 0), ["gfx90a", "gfx942"], True),  # a ROCm build's list: nothing said
])
def test_a_gpu_the_build_has_no_kernels_for_is_refused_naming_both(monkeypatch, capability, arches, usable):
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arches)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla V100-SXM2-32GB")
    said = unsupported_gpu(1)
    assert (said is None) == usable, said
    if not usable:
        assert said.startswith(f"cuda:1 (Tesla V100-SXM2-32GB, compute capability {capability[0]}.{capability[1]}) "
                               f"is not among the GPUs this PyTorch {torch.__version__} is built for "
                               f"({' '.join(arches)}); docs/pretraining.md#gpus-and-clusters"), said


def test_commands_warn_and_refuse_before_they_pick_a_device(tmp_path, monkeypatch, caplog):
    """c2f-evaluate, embed, predict and the probe choose their device through command_device: the warning where
    their default falls to the CPU on a GPU host, the refusal for a GPU the build lacks."""
    import common.system.gpu as gpu
    from common.cli import command_device

    driver = tmp_path / "version"
    driver.write_text(DRIVER)
    monkeypatch.setattr(gpu, "_DRIVER", driver)
    monkeypatch.setattr(gpu.unseen_gpu, "__defaults__", (driver, DEV_NULL))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert command_device(None) == "cpu"
    assert [r.getMessage()[:42] for r in caplog.records] == ["this machine has an NVIDIA GPU (driver 535"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert command_device("cpu") == "cpu"  # asked for: nothing to say
    assert not caplog.records
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla V100")
    with pytest.raises(ValueError, match=r"^--device cuda: cuda:0 \(Tesla V100, compute capability 7.0\) is not"):
        command_device(None)
