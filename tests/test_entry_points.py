"""Every entry point answers --help, and the console scripts point at real functions."""

import importlib
import re
from pathlib import Path

import pytest

ENTRY_POINTS = ["pretrain.run", "finetune.run", "finetune.linear_probe", "finetune.report", "finetune.predict",
                "finetune.demo", "common.corpora.__main__", "common.flops", "common.hf", "bench.data_throughput",
                "bench.train_throughput", "bench.gpu_check"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and len(out.splitlines()) > 3


def test_console_scripts_resolve():
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    targets = re.findall(r'"c2f-[\w-]+=([\w.]+):(\w+)"', setup)
    assert len(targets) == 7
    for module, function in targets:
        assert callable(getattr(importlib.import_module(module), function))
