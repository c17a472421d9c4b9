"""The README's example commands, run exactly as written (in a folder without data, in-process)."""

import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _entry(program: list[str]):
    """The main() a README command line runs."""
    from common.corpora.__main__ import main as corpora
    from finetune.report import main as report
    from finetune.run import main as finetune
    from pretrain.run import main as pretrain

    scripts = {"pretrain/run.py": pretrain, "finetune/run.py": finetune, "finetune/report.py": report}
    if program[:2] == ["-m", "common.corpora"]:
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
    assert any("--set data.batch_size=24" in line for line in lines)
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
            assert "saving 34.6%" in out  # the paper's 34.58 %, with or without --set data.batch_size=24
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
    from common.corpora import get_corpus
    from common.corpora.stats import compute_stats
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
