"""Every entry point answers --help, and the console scripts point at real functions."""

import importlib
import re
import socket
from pathlib import Path

import pytest

from common.cli import PLAN_NOT_READY

ENTRY_POINTS = ["pretrain.run", "finetune.run", "finetune.linear_probe", "common.reports.report", "finetune.predict",
                "finetune.evaluate", "finetune.embed", "finetune.demo", "common.data.corpora.__main__",
                "common.models.flops", "common.models.hf_export", "finetune.onnx_export", "bench.data_throughput", "bench.train_throughput",
                "bench.gpu_check", "bench.shar_ranks"]


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


def test_a_console_script_shows_its_own_name(capsys, monkeypatch):
    """Launched as ``c2f-pretrain`` the usage says ``c2f-pretrain`` (it said pretrain/run.py); from a checkout it
    names the file that runs it."""
    from pretrain.run import main

    for argv0, name in (("/venv/bin/c2f-pretrain", "c2f-pretrain"), ("pretrain/run.py", "pretrain/run.py")):
        monkeypatch.setattr("sys.argv", [argv0, "--help"])
        with pytest.raises(SystemExit):
            main(["--help"])
        assert capsys.readouterr().out.startswith(f"usage: {name} [-h]")


def test_console_scripts_resolve():
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    targets = re.findall(r'"c2f-[\w-]+=([\w.]+):(\w+)"', setup)
    assert len(targets) == 10
    for module, function in targets:
        assert callable(getattr(importlib.import_module(module), function))


# what a --help must not load: each takes a second or more to import (torch alone about two)
HEAVY = ("torch", "lhotse", "timm", "deepspeed", "torchaudio")


def test_help_answers_without_loading_torch():
    """Every command's ``--help`` (each console script of setup.py, and each module of the package that runs as a
    command: a ``__main__`` module or a ``__name__ == "__main__"`` guard) answers with exit status 0 without
    importing torch, lhotse, timm, DeepSpeed or torchaudio, as the note in each of them promises (``--help`` took
    seconds: ``common.cli`` and the commands imported the training stack at their top); the few that are a library
    first (the FLOPs tables, the Hugging Face export) say in their note that theirs loads torch. One process runs
    them all, one after another: what a command loads shows up in the first command that loads it."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    scripts = re.findall(r'"(c2f-[\w-]+)=([\w.]+):main"', (root / "setup.py").read_text())
    commands, heavy = [], set()
    for path in sorted(p for d in ("common", "pretrain", "finetune") for p in (root / d).rglob("*.py")):
        if path.name == "__main__.py" or '__name__ == "__main__"' in path.read_text():
            parts = path.relative_to(root).with_suffix("").parts
            commands.append(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
            if "--help loads torch" in path.read_text():  # a library first, whose note says so: --help answers
                heavy.add(commands[-1])                     # all the same, after the light commands have run
    heavy |= {script for script, module in scripts if module in heavy}
    assert len(scripts) == 10 and {"pretrain.run", "finetune.predict", "common.reports"} <= set(commands)
    assert heavy == {"common.models.hf_export", "c2f-hf", "common.models.flops", "common.models.htsat"}
    # (name, module, run as __main__), the light ones first: what a heavy one loads would hide theirs
    runs = sorted([(m, m, True) for m in commands] + [(s, m, False) for s, m in scripts],
                  key=lambda run: run[0] in heavy)
    script = f"""
import contextlib, importlib, io, runpy, sys, warnings
warnings.simplefilter("ignore")  # runpy's note on a module already imported by an earlier command
heavy = {HEAVY!r}
def answer(name, run):
    out, code = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(out):
            run()
    except SystemExit as stop:
        code = stop.code
    print(name, code, out.getvalue().startswith("usage:"), *[m for m in heavy if m in sys.modules])
for name, module, as_main in {runs!r}:
    sys.argv = [name, "--help"]
    answer(name, lambda: runpy.run_module(module, run_name="__main__", alter_sys=True) if as_main
           else importlib.import_module(module).main())
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    answers = done.stdout.splitlines()
    assert len(answers) == len(commands) + len(scripts), done.stdout + done.stderr
    assert [line for line in answers if line.split()[1:] != ["0", "True"]
            and (line.split()[0] not in heavy or line.split()[1:3] != ["0", "True"])] == []


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


@pytest.mark.parametrize("argv", [["-m", "common.data.corpora", "list"], ["finetune/run.py", "--list-tasks"]])
def test_a_reader_that_goes_away_ends_a_command_quietly(argv):
    """``command | head``: the reader closes the pipe; the command ends as a process killed by SIGPIPE would (141),
    with no traceback nor "error: [Errno 32] Broken pipe"."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, *argv], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(root)})
    proc.stdout.close()  # gone before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_a_broken_pipe_that_is_not_the_output_is_an_error_like_any_other():
    """Only standard output's reader going away ends a command quietly: another pipe that breaks (a child
    process's, a socket's) is raised as before."""
    from common.cli import run_main

    def body() -> int:
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        run_main(body)


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
    assert done.returncode == PLAN_NOT_READY, output  # the plan, without the synthetic corpus's files here
    assert "usage: pretrain/run.py" in output and "saving 34.5%" in output  # both commands ran
    assert "Setting accelerator" not in output and "[WARNING]" not in output and "async_io" not in output, output


@pytest.mark.parametrize("module", ["finetune.evaluate", "finetune.embed", "finetune.predict",
                                    "finetune.linear_probe"])
def test_a_cuda_device_on_a_machine_without_one_is_refused_in_one_line(module, monkeypatch, tmp_path, capsys):
    """The commands that run a model outside training take --device and choose it alike
    (common.cli.command_device): CUDA where there is one, else the CPU; a CUDA device named on a machine without
    one is refused before anything is read (predict and the probe took the first GPU, another job's on a shared
    machine, with no way to choose)."""
    import torch

    from common.cli import command_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert command_device(None) == "cpu" and command_device("cpu") == "cpu"
    args = {"finetune.evaluate": ["--ckpt", str(tmp_path / "m"), str(tmp_path / "x.jsonl.gz")],
            "finetune.embed": ["--init", str(tmp_path / "m"), "--inputs", str(tmp_path), "--out", str(tmp_path / "o")],
            "finetune.predict": ["--ckpt", str(tmp_path / "m"), str(tmp_path / "a.wav")],
            "finetune.linear_probe": ["--init", str(tmp_path / "m"), "--task", "esc50"]}
    assert importlib.import_module(module).main([*args[module], "--device", "cuda:1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --device cuda:1: this machine has no CUDA device; use --device cpu"


def test_a_device_this_machine_does_not_have_is_refused_in_one_line(monkeypatch):
    """A CUDA index beyond the machine's devices (numbered from 0 within CUDA_VISIBLE_DEVICES) and a name that is no
    device are refused in one line, not with torch's "invalid device ordinal" traceback at the first copy."""
    import torch

    from common.cli import command_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])  # (a GPU the build has kernels for: test_gpu.py)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [command_device(d) for d in (None, "cuda", "cuda:1", "cpu")] == ["cuda", "cuda", "cuda:1", "cpu"]
    with pytest.raises(ValueError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\) \(cuda:0 to "
                                         r"cuda:1; CUDA_VISIBLE_DEVICES=3,5 numbers them from 0\)$"):
        command_device("cuda:2")
    for bad in ("gpu", "cuda:x", "mps"):
        with pytest.raises(ValueError, match=f"^--device {bad}: not a device this package runs on; give cpu, cuda"):
            command_device(bad)


def test_bad_input_to_a_command_ends_in_one_line_with_exit_status_2_before_any_compute(tmp_path, model_file,
                                                                                         capsys):
    """Bad input is exit status 2 (common.cli.run_main), said in one line naming the flag or file, refused before
    the compute it would waste: a --hop that is no finite number of seconds, an --out that is a file (a folder is
    written), a --C the regression refuses and a linear probe's --out that is a folder (both found after hours of
    features before)."""
    from common.data.corpora.__main__ import main as corpora
    from finetune.embed import main as embed
    from finetune.linear_probe import main as probe
    from finetune.predict import main as predict
    from tests.helpers import _write, one_error

    model, clip = model_file("ce"), _write(tmp_path / "a.wav", 0.5)
    for hop in ("inf", "nan", "0"):
        for command, argv in ((predict, ["--ckpt", str(model), str(clip)]),
                              (embed, ["--init", str(model), "--inputs", str(clip), "--out", str(tmp_path / "e")])):
            with pytest.raises(SystemExit) as exit_info:
                command([*argv, "--hop", hop])
            assert exit_info.value.code == 2
            assert f"--hop: seconds between windows, a finite number above 0, got '{hop}'" in capsys.readouterr().err
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    assert embed(["--init", str(model), "--inputs", str(clip), "--out", str(taken)]) == 2
    assert one_error(capsys.readouterr().err) == f"error: --out {taken} is a file, not a folder; name a new folder or " \
                                                 f"an existing one"
    (tmp_path / "list.csv").write_text(f"path,label\n{clip},dog\n")
    assert corpora(["prepare", "custom", "--csv", str(tmp_path / "list.csv"), "--out", str(taken)]) == 2
    assert one_error(capsys.readouterr().err) == f"error: --out {taken} is a file, not a folder; name a new folder or " \
                                                 f"an existing one"
    assert corpora(["prepare", "synth", "--out", str(taken)]) == 2  # before writing any clip under it
    assert one_error(capsys.readouterr().err) == f"error: --out {taken} is a file, not a folder; name a new folder or " \
                                                 f"an existing one"
    with pytest.raises(SystemExit) as exit_info:
        corpora(["stats", str(clip), "--target-frames", "0"])
    assert exit_info.value.code == 2
    assert "argument --target-frames: a whole number above 0, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        corpora(["stats", str(clip), "--workers", "-1"])
    assert exit_info.value.code == 2
    assert "argument --workers: a whole number >= 0 (0: decode in this process), got '-1'" in capsys.readouterr().err
    assert taken.read_text() == "mine\n"
    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "scratch" / "out")  # a link to a folder on a disk that is not there
    assert corpora(["prepare", "custom", "--csv", str(tmp_path / "list.csv"), "--out", str(dangling / "x")]) == 2
    assert one_error(capsys.readouterr().err) == f"error: --out {dangling / 'x'} is not a folder ({dangling} on its " \
                                                 f"way is a link to {tmp_path / 'scratch' / 'out'}, which does not " \
                                                 f"exist); name a new folder or an existing one"
    nowhere = str(tmp_path / "no-such-model")  # read only after the checks
    assert probe(["--init", nowhere, "--task", "synth", "--C", "0"]) == 2
    assert one_error(capsys.readouterr().err) == "error: --C: the inverse regularisation must be a finite number " \
                                                 "above 0, or a list of them, got 0.0"
    with pytest.raises(SystemExit) as exit_info:  # the option, not the recipe key
        probe(["--init", nowhere, "--task", "synth", "--workers", "-1"])
    assert exit_info.value.code == 2
    assert "argument --workers: a whole number >= 0 (0: decode in this process), got '-1'" in capsys.readouterr().err
    probe_recipe = tmp_path / "probe.yaml"
    probe_recipe.write_text("tasks: [synth]\nbatch_size: 0\n")
    assert probe(["--init", nowhere, "--recipe", str(probe_recipe)]) == 2
    assert one_error(capsys.readouterr().err) == f"error: batch_size: must be 1 or more, got 0 (in {probe_recipe})"
    assert probe(["--init", nowhere, "--task", "synth", "--out", str(tmp_path)]) == 2
    assert one_error(capsys.readouterr().err) == f"error: --out {tmp_path} is a folder; name the JSON file to write " \
                                                 f"the results to"
    assert probe(["--init", nowhere, "--task", "synth", "--out", str(taken / "probe.json")]) == 2
    assert one_error(capsys.readouterr().err) == f"error: --out {taken / 'probe.json'}: the folder {taken} is a file, " \
                                                 f"not a folder; name a new folder or an existing one"


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_the_set_examples_of_a_commands_help_work_on_it(command, capsys):
    """`--help` shows `--set` with a phase length the command's phases count (fine-tuning's are epochs: the
    pretraining example, phases.0.steps, is refused there)."""
    from finetune.run import build_parser as finetune_parser
    from finetune.run import main as finetune_main
    from pretrain.run import build_parser as pretrain_parser
    from pretrain.run import main as pretrain_main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "synth_pretrain.yaml"
    parser, main, base = {
        "pretrain": (pretrain_parser, pretrain_main, ["--recipe", str(recipe)]),
        "finetune": (finetune_parser, finetune_main, ["--init", "none", "--task", "synth"]),
    }[command]
    examples = re.findall(r"--set ([a-z_][\w.]*=[^\s\])]+)", " ".join(parser().format_help().split()))
    assert len(examples) >= 2, examples
    code = main([*base, "--dry-run", *(a for e in examples for a in ("--set", e))])
    assert code == PLAN_NOT_READY, capsys.readouterr().err  # planned; the corpus's files are not here


def test_ctrl_c_promises_a_resume_only_where_there_are_checkpoints(capsys):
    """Ctrl-C ends a command with status 130; a training command says that the same command resumes, a command
    without checkpoints (predict, evaluate, the probe, embed) only that it was interrupted."""
    from common.cli import run_main

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_main(interrupted, resumable=True) == 130
    assert capsys.readouterr().err.strip() == "interrupted; run the same command again to resume from the last " \
                                              "checkpoint"
    assert run_main(interrupted) == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_one_process_commands_refuse_to_run_as_several_ranks(tmp_path, model_file, monkeypatch, capsys):
    """Under a launcher's several ranks, prediction, evaluation, the probe and embedding would each repeat the
    whole work and write the same files: one line says to run them with python, before any work."""
    from finetune.embed import main as embed
    from finetune.evaluate import main as evaluate
    from finetune.linear_probe import main as probe
    from finetune.predict import main as predict
    from tests.helpers import _write, one_error

    model, clip = model_file("ce"), _write(tmp_path / "a.wav", 0.5)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command, argv, name in (
            (predict, ["--ckpt", str(model), str(clip)], "c2f-predict"),
            (evaluate, ["--ckpt", str(model), str(tmp_path / "m.jsonl.gz")], "c2f-evaluate"),
            (probe, ["--init", str(model), "--task", "synth"], "the linear probe"),
            (embed, ["--init", str(model), "--inputs", str(clip), "--out", str(tmp_path / "e")], "c2f-embed")):
        assert command(argv) == 2
        line = one_error(capsys.readouterr().err)  # every rank's line names its rank and host
        assert re.match(rf"error: rank \S+ \(host {re.escape(socket.gethostname())}\): {re.escape(name)} runs in one "
                        rf"process, and this is one of WORLD_SIZE=2 ranks", line), line
    assert not (tmp_path / "e").exists()


def test_an_error_line_writes_control_characters_as_escapes():
    """What a user wrote with a newline, a carriage return or an escape byte in it stays inside one error line."""
    from common.system.prog import error_line

    said = error_line("recipe a\nb.yaml\r\x1b[31m does not exist\t!")
    assert said == "recipe a\\nb.yaml\\r\\x1b[31m does not exist\\t!"
    assert error_line("plain: ünïcode kept") == "plain: ünïcode kept"
    assert error_line("a\x85b\u2028c\x9b") == "a\\x85b\\u2028c\\x9b"  # what str.splitlines() and terminals split on
    assert len(error_line("".join(map(chr, range(0x2030)))).splitlines()) == 1
