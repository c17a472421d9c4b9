"""A run that runs out of device memory stops with one line that says where, how much, who else holds the
device and what to change, and resumes from its last checkpoint (``common.training.out_of_memory``)."""
import json

import pytest
import torch

from common.training.out_of_memory import describe_out_of_memory, is_out_of_memory, out_of_memory
from tests.helpers import one_error, run, weights

# PyTorch 2.11's message for a GPU out of memory, as a shared GPU gives it
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
            "1.06 GiB is free. Process 4321 has 30.00 GiB memory in use. Including non-PyTorch memory, this process "
            "has 48.00 GiB memory in use. Of the allocated memory 45.50 GiB is allocated by PyTorch, and 1.20 GiB "
            "is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
            "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")


def test_a_gpu_out_of_memory_names_the_other_processes_and_the_micro_batch():
    err = torch.OutOfMemoryError(CUDA_OOM)
    assert is_out_of_memory(err) and not is_out_of_memory(RuntimeError("CUDA error: device-side assert"))
    line = str(out_of_memory(err, torch.device("cuda", 0), "phase2 (full resolution) at step 1200", 24, 62 * 2**30))
    assert line.startswith("cuda:0 ran out of memory in phase2 (full resolution) at step 1200 (24 clip(s) per rank "
                           "per forward pass, planned at 62 GiB): Tried to allocate 2.00 GiB. "
                           "GPU 0 has a total capacity of 79.10 GiB of which 1.06 GiB is free. Process 4321 has "), line
    assert "memory in use. Other processes hold memory on this device (pid 4321: 30.00 GiB)" in line and "CUDA_VISIBLE_DEVICES" in line
    assert "--set data.max_batch_per_rank=12 keeps the global batch" in line and "resume" in line
    assert "PYTORCH_CUDA_ALLOC_CONF" not in line and "allocated by PyTorch" not in line and "\n" not in line
    alone = str(out_of_memory(torch.OutOfMemoryError(CUDA_OOM.replace("Process 4321 has 30.00 GiB memory in use. ",
                                                                      "")), torch.device("cuda", 0), "x", 1, None))
    assert "ther processes" not in alone and "One clip per pass does not fit" in alone and "planned" not in alone
    assert describe_out_of_memory(err).startswith("out of memory: Tried to allocate 2.00 GiB. GPU 0 has a total")
    assert describe_out_of_memory(ValueError("x")) is None
    valid = str(out_of_memory(err, torch.device("cuda", 0), "the validation of x", 32, None, validating=True))
    assert "or lower the validation batch: --set data.eval_batch_size=16;" in valid and "max_batch" not in valid


def test_host_memory_is_not_said_to_be_the_gpus():
    """The CPU allocator's error on a GPU run is the host's memory; a loader worker's names the workers."""
    host = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)")
    assert is_out_of_memory(host)
    line = str(out_of_memory(host, torch.device("cuda", 0), "phase1 at step 3", 8, 2**30))
    assert line.startswith("the host's memory (not cuda:0's) ran out of memory in phase1 at step 3 (8 clip(s) per "
                           "rank per forward pass): DefaultCPUAllocator"), line
    worker = RuntimeError(f"Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                          f"call last):\n  File \"x.py\", line 1, in f\nRuntimeError: {host}")
    line = str(out_of_memory(worker, torch.device("cuda", 0), "phase1 at step 3", 8, 2**30))
    assert line.startswith("a data loader worker ran out of host memory in phase1 at step 3:") and \
        "Lower data.num_workers" in line and "max_batch_per_rank" not in line, line


@pytest.mark.parametrize("error", [
    torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some "
                           "other API call, so the stacktrace below might be incorrect.\nFor debugging consider "
                           "passing CUDA_LAUNCH_BLOCKING=1"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error (run with "
                                       "NCCL_DEBUG=INFO for details), NCCL version 2.27.5\nncclUnhandledCudaError: "
                                       "Call to CUDA function failed.\nLast error:\nCuda failure 2 'out of memory'")])
def test_out_of_memory_outside_the_caching_allocator_is_said_as_such(error):
    """A GPU another process fills runs out where PyTorch's pool is not asked: the CUDA runtime (at context creation),
    cuBLAS and cuDNN creating their handles, NCCL's buffers; each gets the out-of-memory line, not a traceback, and the
    line quotes the error's first line, not CUDA's debugging advice."""
    assert is_out_of_memory(error)
    line = str(out_of_memory(error, torch.device("cuda", 0), "phase1 at step 1", 8, 2**30))
    assert line.startswith("cuda:0 ran out of memory in phase1 at step 1 (8 clip(s) per rank per forward pass, "
                           "planned at 1 GiB): ") and "max_batch_per_rank=4" in line, line
    assert "CUDA_LAUNCH_BLOCKING" not in line and "\n" not in line
    assert any(words in line for words in ("out of memory", "ALLOC_FAILED")), line  # NCCL says it on its last line
    assert describe_out_of_memory(error).startswith("out of memory: ")
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["step", "validation"])
def test_a_run_out_of_memory_stops_with_one_line_and_resumes(tmp_path, synth_corpus, monkeypatch, capsys, where):
    """A real allocation the CPU cannot make, in the third training step or in the first validation (after the
    step-2 checkpoint): exit status 1, one line, and the same command then trains the uninterrupted weights."""
    from pretrain.ssast import SSASTObjective

    method = "train_step" if where == "step" else "evaluate"
    real, calls = getattr(SSASTObjective, method), {"n": 0}

    def greedy(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 or where == "validation":
            torch.empty(10**13)  # 40 TB
        return real(self, *args, **kwargs)

    assert run(tmp_path / "straight", synth_corpus) == 0
    with monkeypatch.context() as patch:
        patch.setattr(SSASTObjective, method, greedy)
        capsys.readouterr()
        assert run(tmp_path / "r", synth_corpus) == 1
    line = one_error(capsys.readouterr().err)
    at = "phase1 (fshift x4) at step 2" if where == "step" else "the validation of phase1 (fshift x4) at step 2"
    assert line.startswith(f"error: cpu ran out of memory in {at} (4 clip(s) per rank per forward pass"), line
    assert "you tried to allocate 40000000000000 bytes" in line and "run the same command again to resume" in line
    assert ("data.max_batch_per_rank=2" if where == "step" else "data.eval_batch_size=2") in line
    if where == "validation":  # the same command: the uninterrupted weights
        assert run(tmp_path / "r", synth_corpus) == 0
        a, b = weights(tmp_path / "straight"), weights(tmp_path / "r")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        return
    # the same command with the smaller micro-batch it advises: accepted, the same global batch, recorded
    assert run(tmp_path / "r", synth_corpus, "data.max_batch_per_rank=2") == 0
    ledger = json.loads((tmp_path / "r" / "ledger.json").read_text())
    assert ledger["total"]["steps"] == 6 and [p["samples"] for p in ledger["phases"]] == [3 * 4, 3 * 4]
    assert [(p["batch_per_rank"], p["grad_accum"]) for p in ledger["phases"]] == [(2, 2)] * 2
    assert {"data.max_batch_per_rank": {"from": None, "to": 2}} in [i["changes"] for i in ledger["interventions"]]
