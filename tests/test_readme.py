"""The README's example commands, run exactly as written (in a folder without data, in-process), its sample
outputs and numbers against what the commands print, and its first hour from a clone to a CPU result."""

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _entry(program: list[str]):
    """The main() a README command line runs."""
    from common.data.corpora.__main__ import main as corpora
    from finetune.linear_probe import main as probe
    from finetune.predict import main as predict
    from common.reports.report import main as report
    from finetune.run import main as finetune
    from pretrain.run import main as pretrain

    scripts = {"pretrain/run.py": pretrain, "finetune/run.py": finetune, "common/reports/report.py": report,
               "finetune/predict.py": predict, "finetune/linear_probe.py": probe}
    if program[:2] == ["-m", "common.data.corpora"]:
        return corpora, program[2:]
    return scripts[program[0]], program[1:]


def _command_lines() -> list[str]:
    """Every `python ...` line of the README's bash blocks and inline code that uses --set or --dry-run, or
    that lists something (those run without data)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        lines += [line.split("  #")[0].strip() for line in block.splitlines()]
    lines += re.findall(r"`(python [^`]+)`", README)
    wanted = [line for line in lines if line.startswith("python ") and
              ("--set" in line or "--dry-run" in line or line.endswith((" list", "--list-tasks")))]
    return sorted(set(wanted))


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """A working directory with the repository's recipes and no prepared data."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_the_commands_this_test_runs():
    lines = _command_lines()
    assert "python pretrain/run.py --recipe recipes/ssast_fshift4.yaml --dry-run" in lines
    # one recipe for any number of GPUs (the global batch is the recipe's): the README plans 4 GPUs
    assert "python pretrain/run.py --recipe recipes/ssast_fshift4.yaml --dry-run --world-size 4" in lines
    assert len(lines) >= 5


@pytest.mark.parametrize("line", _command_lines())
def test_readme_command_runs_as_written(line, no_data, capsys):
    argv = shlex.split(line)
    assert argv[0] == "python"
    main, args = _entry(argv[1:])
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if "--dry-run" in args or args[-1:] in (["list"], ["--list-tasks"]):
        assert code == 0, err
        if "ssast_fshift4.yaml" in line:
            assert "saving 34.6%" in out  # the paper's 34.58 %, on one GPU or several
            assert "batch: 24 clips per step = " in out  # SSAST's global batch, whatever the launch
    else:  # a real run: everything parses, and it stops before any compute because there is no data here
        missing = ("error: data.train.0.path: manifest data/", "error: task.classes: class list data/")
        assert code == 2 and err.startswith(missing) and "does not exist" in err, err
        assert not (no_data / "runs").exists()


def test_inline_set_examples_parse_as_numbers(capsys):
    """`--set key=value` examples of the README and of --help: `5e-5` is a number, not a string."""
    from common.cli import add_run_arguments
    from pretrain.recipe import load_recipe

    parser = argparse.ArgumentParser()
    add_run_arguments(parser, "runs")
    help_text = re.sub(r"\s+", " ", parser.format_help())
    examples = re.findall(r"`(--set [^`]+)`", re.sub(r"\s+", " ", README))
    examples.append(help_text.split("e.g. ")[1].split(" (")[0])
    examples = [e for e in examples if "key=value" not in e and "..." not in e and "|" not in e]  # concrete ones
    assert len(examples) >= 2
    for example in examples:
        sets = shlex.split(example)[1::2]
        if any(s.split(".", 1)[0] in ("head", "augment", "task") for s in sets):  # a fine-tuning example
            from finetune.recipe import load_recipe as load_finetuning

            recipe = load_finetuning("esc50", None, sets)
        elif any(s.startswith("coarse.") for s in sets):  # settings of a --coarse derivation (fine-tuning)
            from finetune.recipe import load_recipe as load_finetuning

            recipe = load_finetuning("vggsound", None, sets, coarse="fshift:4")
        else:
            recipe = load_recipe(ROOT / "recipes" / "ssast_fshift4.yaml", sets)
        for item in sets:
            key, value = item.split("=", 1)
            section, field = key.split(".", 1)
            got = getattr(getattr(recipe, section), field) if "." not in field else None
            if value in ("true", "false"):  # a switch
                assert got is (value == "true"), item
            elif got is not None and not value.startswith(("{", "[")):  # a mapping or list: it loaded, that is all
                try:
                    expected = float(value)
                except ValueError:  # a word (e.g. head.pool=prefix)
                    assert got == value, item
                else:
                    assert got == pytest.approx(expected), item


def test_the_readme_task_file_works_relative_to_itself(tmp_path, monkeypatch, capsys):
    """The README's task YAML, as written, in a folder of its own; run from elsewhere."""
    from common.data.corpora import get_corpus
    from common.data.corpora.stats import compute_stats
    from finetune.run import main as finetune
    from tests.layouts import write_clip

    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README, re.S) if "target_frames" in b)
    project = tmp_path / "project"
    for label in ("kick", "snare"):
        for i in range(4):
            write_clip(tmp_path / "audio" / label / f"{i}.wav", seconds=0.5, seed=i + 7 * len(label))
    get_corpus("custom").prepare(tmp_path / "audio", project / "data" / "mine", name="mine", valid_fraction=0.5)
    compute_stats(project / "data" / "mine" / "mine_train.jsonl.gz", target_frames=64, workers=0)
    (project / "my_task.yaml").write_text(block)
    fields = yaml.safe_load(block)
    monkeypatch.chdir(tmp_path)  # not the task file's folder
    assert finetune(["--init", "none", "--task", str(project / "my_task.yaml"), "--dry-run",
                     "--set", "data.batch_size=2"]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"task {fields['name']}" in out and "warm-up" in out


def _bash_lines() -> list[str]:
    """Every line of the README's bash blocks, comments cut, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        lines += [re.split(r"\s+# ", line)[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def _run(line: str, capsys) -> tuple[int, str, str]:
    argv = shlex.split(line)
    assert argv[0] == "python", line
    main, args = _entry(argv[1:])
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_readme_sample_outputs_are_what_the_commands_print(no_data, capsys):
    """Each output block of the README (a ``` block without a language) is, line for line, part of what a
    --dry-run command of the bash block before it prints."""
    samples, commands = 0, []
    for language, body in re.findall(r"```(\w*)\n(.*?)```", README, re.S):
        if language == "bash":
            commands = [re.split(r"\s+# ", line)[0].strip() for line in body.splitlines() if "--dry-run" in line]
        elif language == "":
            outputs = [_run(command, capsys)[1] for command in commands]
            assert any(body in out for out in outputs), (body, outputs)
            samples += 1
    assert samples >= 1


def test_readme_numbers_are_what_the_commands_print(capsys):
    """The FLOPs per clip the README quotes, from the commands it names."""
    from common.models.flops import main as flops
    from common.models.htsat.__main__ import main as htsat

    text = re.sub(r"\s+", " ", README)
    flops([])
    table = {line[:20].strip(): line.split()[-2] for line in capsys.readouterr().out.splitlines()}
    quoted = re.search(r"`python -m common.models.flops`\): ([\d.]+) G at full resolution, ([\d.]+) G at C = 2, "
                       r"([\d.]+) G at C = 4", text)
    assert quoted and list(quoted.groups()) == [table["none"], table["fshift x2"], table["fshift x4"]]
    htsat([])
    table = {line[:16].strip(): line.split()[-2] for line in capsys.readouterr().out.splitlines()}
    quoted = re.search(r"`python -m common.models.htsat`\): ([\d.]+) G at full resolution, ([\d.]+) G at x2, ([\d.]+) G at x4",
                       text)
    assert quoted and list(quoted.groups()) == [table["full resolution"], table["fshift x2"], table["fshift x4"]]
    assert f"with {table['fshift x4']} / {table['full resolution']} GFLOPs per clip at x4 / x1" in text


def test_htsat_schedules_in_the_readme_are_the_recipes(no_data, capsys):
    text = re.sub(r"\s+", " ", README)
    said = re.search(r"AudioSet (\d+) \+ (\d+) epochs, planned saving ([\d.]+) %.*?VGGSound (\d+) \+ (\d+) .*?planned "
                     r"([\d.]+) %; ESC-50 (\d+) \+ (\d+)\.", text)
    assert said
    for task, epochs, saving in (("audioset", said.group(1, 2), said.group(3)),
                                 ("vggsound", said.group(4, 5), said.group(6)), ("esc50", said.group(7, 8), None)):
        code, out, err = _run(f"python finetune/run.py --init none --task {task} --recipe "
                              f"recipes/ft_htsat_{task}_fshift4.yaml --dry-run", capsys)
        assert code == 0, err
        rows = [line.split() for line in out.splitlines() if line.startswith(("phase1 ", "phase2 "))]
        assert [row[3] for row in rows] == list(epochs), out
        assert saving is None or f"saving {saving}%" in out, out


def _finetuning_lines() -> list[str]:
    """The README's fine-tuning commands on registered tasks (a task file of one's own cannot be planned here),
    as `python` lines (a `deepspeed --num_gpus N` launch plans as one process)."""
    from finetune.tasks import TASKS

    lines = [re.sub(r"^deepspeed (--num_gpus \d+ )?", "python ", line) for line in _bash_lines()]
    lines = [line for line in lines if line.startswith("python finetune/run.py --init")]
    return sorted({line for line in lines if shlex.split(line)[shlex.split(line).index("--task") + 1] in TASKS})


def test_the_readme_has_the_fine_tuning_lines_that_name_a_pretraining_run():
    assert "python finetune/run.py --init runs/pretrain/ssast_fshift4 --task vggsound" in _finetuning_lines()


@pytest.mark.parametrize("line", _finetuning_lines())
def test_readme_fine_tuning_lines_plan_before_their_init_exists(line, no_data, capsys):
    """Planned with --dry-run before the pretraining run (or the checkpoint) they name exists: the plan, then
    what is missing, the init first."""
    code, out, err = _run(line if "--dry-run" in line else f"{line} --dry-run", capsys)
    assert code == 0 and "Traceback" not in err, err
    assert re.search(r"^phase1 \(", out, re.M), out  # the plan
    missing = out.split("files a run needs and does not find (it would stop before any compute):\n")[1]
    init = shlex.split(line)[shlex.split(line).index("--init") + 1]
    if init != "none":
        assert missing.startswith(f"  --init: checkpoint {init} does not exist"), missing
    assert "does not exist" in missing.split("\n", 1)[1]  # and the data


def test_the_first_hour_from_a_clone_to_a_cpu_result(tmp_path, monkeypatch, capsys):
    """The README's first-hour commands, in order, as written; only sizes are cut (appended flags: the test-size
    corpus, a few steps) so that the chain runs in seconds. It ends with a CPU result."""
    block = README.split("### The first hour")[1].split("```bash\n")[1].split("```")[0]
    lines = [re.split(r"\s+# ", line)[0].strip() for line in block.splitlines() if line.strip()]
    makefile = (ROOT / "Makefile").read_text()
    assert lines[:2] == ["make venv", ". .venv/bin/activate"]
    assert re.search(r"^venv:", makefile, re.M) and "VENV   := .venv" in makefile  # what the activation needs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    small = {"-m common.data.corpora prepare synth": ["--size", "test"],
             "pretrain/run.py": ["--set", "phases.0.steps=1", "--set", "phases.1.steps=2", "--set", "data.batch_size=4",
                                 "--set", "data.num_workers=0", "--set", "train.eval_every=2"],
             "finetune/run.py": ["--set", "data.batch_size=4", "--set", "data.num_workers=0",
                                 "--set", "phases=[{compression: none, epochs: 1}]"]}
    outputs = []
    for line in lines[2:]:
        argv = shlex.split(line)
        assert argv[0] == "python", line
        extra = next((flags for key, flags in small.items() if line.startswith(f"python {key}")), [])
        main, args = _entry(argv[1:])
        code = main(args + extra)
        out, err = capsys.readouterr()
        assert code == 0, (line, err)
        outputs.append(out)
    assert (tmp_path / "runs" / "pretrain" / "synth_pretrain" / "model.safetensors").is_file()
    assert "acc" in json.loads((tmp_path / "runs" / "finetune" / "synth-baseline" / "test_metrics.json").read_text())
    assert re.search(r"synth-test-rain-0000.flac  \(\d\.\d\d s, .*\)\n  \d\.\d{3}  \w", outputs[3])  # predict.py
    assert (tmp_path / "runs" / "finetune" / "synth-tiny" / "model.safetensors").is_file()
