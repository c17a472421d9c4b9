"""Every entry point answers --help, and the console scripts point at real functions."""

import importlib
import re
from pathlib import Path

import pytest

ENTRY_POINTS = ["pretrain.run", "finetune.run", "finetune.linear_probe", "common.reports.report", "finetune.predict",
                "finetune.evaluate", "finetune.embed", "finetune.demo", "common.data.corpora.__main__",
                "common.models.flops", "common.models.hf_export", "finetune.onnx_export", "bench.data_throughput", "bench.train_throughput",
                "bench.gpu_check"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and len(out.splitlines()) > 3


def test_every_usage_names_a_command_that_runs_it(capsys):
    """Each console script's usage line names a command that runs it: the script, ``python -m MODULE`` of a
    module that runs its ``main`` when so run, or a script file that does (a usage naming ``python -m
    common.models.hf``, which did nothing, left a user with an export that never happened)."""
    root = Path(__file__).resolve().parents[1]
    setup = (root / "setup.py").read_text()
    for script, module in re.findall(r'"(c2f-[\w-]+)=([\w.]+):main"', setup):
        with pytest.raises(SystemExit):
            importlib.import_module(module).main(["--help"])
        prog = re.match(r"usage: (.+?) \[-h\]", capsys.readouterr().out).group(1)
        if prog.startswith("python -m "):
            named = importlib.import_module(prog.split()[-1])
            if hasattr(named, "__path__"):  # a package runs its __main__ module
                named = importlib.import_module(named.__name__ + ".__main__")
            source = Path(named.__file__).read_text()
        else:
            assert prog == script or prog.endswith(".py"), (script, prog)
            source = (root / prog).read_text() if prog.endswith(".py") else '__name__ == "__main__"'
        assert '__name__ == "__main__"' in source, f"{script}: its usage names {prog}, which would do nothing"


def test_console_scripts_resolve():
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    targets = re.findall(r'"c2f-[\w-]+=([\w.]+):(\w+)"', setup)
    assert len(targets) == 10
    for module, function in targets:
        assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.slow
def test_importing_the_package_installs_no_logging_handler():
    """No import may configure logging (a library's root-level ``logging.info`` installs logging's default
    console handler): each command's own handlers then print every line once, around the progress bars."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = ("import logging, common.cli, common.data.loader, pretrain.run, finetune.run, finetune.embed\n"
              "print(logging.getLogger().handlers)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_no_deepspeed_greeting_on_our_commands():
    """DeepSpeed's "Setting accelerator to CPU" (its import on a machine without a GPU) and its install banners
    ("[WARNING] ... async_io ...") greet no command: --help, --dry-run, or a run's DeepSpeed set-up."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = ("import sys\n"
              "from pretrain.run import main\n"
              "from common.system.distributed import init_distributed\n"
              "dist = init_distributed()\n"  # what a run does first: import DeepSpeed, join the group
              "dist.teardown()\n"
              "code = main(['--recipe', 'recipes/synth_pretrain.yaml', '--dry-run'])\n"
              "try:\n"
              "    main(['--help'])\n"
              "except SystemExit:\n"
              "    pass\n"
              "sys.exit(code)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                             "MASTER_PORT", "MASTER_ADDR")}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "usage: pretrain/run.py" in output and "saving 34.5%" in output  # both commands ran
    assert "Setting accelerator" not in output and "[WARNING]" not in output and "async_io" not in output, output


@pytest.mark.parametrize("module", ["finetune.evaluate", "finetune.embed"])
def test_a_cuda_device_on_a_machine_without_one_is_refused_in_one_line(module, monkeypatch, tmp_path, capsys):
    """The commands with --device choose it alike (common.cli.command_device): CUDA where there is one, else the
    CPU; a CUDA device named on a machine without one is refused before anything is read."""
    import torch

    from common.cli import command_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert command_device(None) == "cpu" and command_device("cpu") == "cpu"
    args = {"finetune.evaluate": ["--ckpt", str(tmp_path / "m"), str(tmp_path / "x.jsonl.gz")],
            "finetune.embed": ["--init", str(tmp_path / "m"), "--inputs", str(tmp_path), "--out", str(tmp_path / "o")]}
    assert importlib.import_module(module).main([*args[module], "--device", "cuda:1"]) == 1
    assert capsys.readouterr().err.strip() == "error: --device cuda:1: this machine has no CUDA device; use --device cpu"
