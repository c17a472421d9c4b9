"""``python -m bench.gpu_check --smoke``: the GPU check's whole code path on the CPU with tiny sizes, so that
the command a lent GPU runs cannot rot; and its table of peaks."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_check import SyncSites, main, peak_bf16

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_smoke_run_goes_through_every_section(tmp_path, capsys):
    assert main(["--smoke", "--out", str(tmp_path), "--batch", "4"]) == 0  # --batch: what a 16 GB GPU needs
    text = (tmp_path / "cpu-smoke.md").read_text()
    assert "SSAST-custom, batch 4, fbank" in text and "`python -m bench.gpu_check --smoke --batch 4`" in text
    assert text.strip() in capsys.readouterr().out  # printed too
    for title in ("1. bf16 against fp32", "2. Fused attention", "3. Throughput per phase", "4. The loader",
                  "5. Wall-time saving", "6. Host synchronisations", "7. Fine-tuning", "8. Where the trainer's step",
                  "9. Issue 21's targets"):
        assert f"## {title}" in text
    assert "FAILED" not in text and "Skipped" not in text
    assert "ssast: agrees" in text and "fine-tuning (cross-entropy): agrees" in text
    assert "fused scaled-dot-product attention is in use" in text
    assert text.count("| phase1 (fshift x4) | 130 |") == 2 and text.count("| phase2 (full resolution) | 514 |") == 2
    assert "ratio **" in text
    assert "r = the coarse step's time over the full step's (bare): eager" in text and "r through the trainer" in text
    assert "Phase 1 (Fshift x4): self CPU time" in text and "Phase 2 (full resolution)" in text
    assert "| `aten::" in text  # the profile's operators
    targets = text.split("## 9. Issue 21's targets")[1]
    assert targets.count("| yes |") + targets.count("| **no** |") == 9  # every target measured
    syncs = text.split("## 6. Host synchronisations")[1].split("## 7.")[0]
    assert "`pretrain/run.py`" in syncs and "`finetune/run.py`" in syncs  # both training paths counted


@pytest.mark.slow
def test_a_machine_without_lhotse_and_deepspeed_is_told_what_to_install(tmp_path):
    code = ("import sys; sys.modules['deepspeed'] = None; sys.modules['lhotse'] = None; "
            "from bench.gpu_check import main; sys.exit(main(['--smoke', '--out', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "cpu-smoke.md").read_text()
    assert text.count("Skipped: cannot import") == 8 and "pip install" in text and "deepspeed" in text


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                         ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
                                         ("NVIDIA H100 NVL", None), ("Tesla T4", None),
                                         ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", None),  # a slice: not the whole peak
                                         ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None)])
def test_peaks_by_device_name_come_with_their_source(name, tflops):
    found = peak_bf16(name)
    assert (found[0] if found else None) == tflops
    if found:
        assert "datasheet" in found[1]


def test_sync_sites_names_where_the_loop_waits_and_how_often(monkeypatch):
    import warnings

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(1))
    patched = torch.cuda.synchronize
    sites = SyncSites()

    def loop():
        for _ in range(3):
            torch.cuda.synchronize()  # an explicit wait, e.g. a timer's
        warnings.warn("called a synchronizing CUDA operation")  # what CUDA's sync debug mode says
        warnings.warn("something else")  # not a synchronisation

    import inspect
    lines = inspect.getsource(loop).splitlines()
    first = loop.__code__.co_firstlineno
    waited = first + next(i for i, line in enumerate(lines) if "torch.cuda.synchronize()" in line)
    warned = first + next(i for i, line in enumerate(lines) if "warnings.warn(\"called" in line)

    sites.around(loop)()
    assert len(calls) == 3 and torch.cuda.synchronize is patched  # the real call still runs; restored after
    (explicit, n1), (implicit, n2) = sorted(sites.counts.items(), key=lambda kv: -kv[1])
    assert n1 == 3 and explicit[0].startswith("tests/test_gpu_check.py:") and "torch.cuda.synchronize" in explicit[1]
    assert n2 == 1 and implicit[0].startswith("tests/test_gpu_check.py:") and "synchronizing operation" in implicit[1]
    # the line that synchronised is the warning's own (not the warnings module's, which calls showwarning)
    assert implicit[1] == f"synchronizing operation at test_gpu_check.py:{warned}"
    assert explicit[1] == f"torch.cuda.synchronize at test_gpu_check.py:{waited}"


def test_a_device_profile_counts_each_kernel_once():
    """On a GPU the profiler lists a kernel as its own event and inside the operator that launched it, and the step
    marker's device event spans the whole step: the total is the kernels' time (torch's own table's), the rows
    are the operators, with what no operator launched in a row of its own; on the CPU, operators by self time."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from bench.gpu_check import profile_rows

    def event(key, device, self_device, self_cpu=0.0, annotation=False, count=1):
        return SimpleNamespace(key=key, count=count, device_type=device, is_user_annotation=annotation,
                               self_device_time_total=self_device, self_cpu_time_total=self_cpu)

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [event("ProfilerStep*", cpu, 1000.0, 50.0, annotation=True),  # merged CPU + device step marker
              event("aten::mm", cpu, 600.0, 20.0), event("sm90_xmma_gemm", gpu, 600.0),
              event("aten::softmax", cpu, 100.0, 5.0), event("softmax_kernel", gpu, 100.0),
              event("ncclAllReduce", gpu, 300.0),  # launched by no recorded operator
              event("aten::view", cpu, 0.0, 3.0)]
    total, rows = profile_rows(events, device=True)
    assert total == 1000.0
    assert [(r[0], r[2]) for r in rows] == [("aten::mm", 600.0), ("(kernels launched outside the operators "
                                                                  "recorded)", 300.0), ("aten::softmax", 100.0)]
    total, rows = profile_rows(events, device=False)
    assert total == 78.0 and rows[0][0] == "ProfilerStep*" and rows[-1][2] == 0.0
