"""The README's and docs/'s example commands, run exactly as written (in a folder without data, in-process),
their sample outputs and numbers against what the commands print, the first hour from a clone to a CPU result;
every shell command names an entry point, flags, recipes and files that exist; every relative link points to a
file; and no file of the repository cites a file the repository does not have."""

import argparse
import ast
import importlib
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from common.cli import PLAN_NOT_READY

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8") for path in DOC_FILES}
ALL_DOCS = "\n\n".join(DOCS.values())  # the README and docs/ as one text, for facts that may sit on any page


def _console_scripts() -> dict[str, str]:
    """setup.py's console scripts: name -> "module:function"."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    scripts = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.match(r"^c2f-[\w-]+=", node.value):
            name, target = node.value.split("=", 1)
            scripts[name.strip()] = target.strip()
    return scripts


def _entry(program: list[str]):
    """The main() a documented command line runs: `python SCRIPT`, `python -m MODULE` or a `c2f-*` console
    script (its program words without the leading `python`)."""
    from common.data.corpora.__main__ import main as corpora
    from common.reports.report import main as report
    from finetune.linear_probe import main as probe
    from finetune.predict import main as predict
    from finetune.run import main as finetune
    from pretrain.run import main as pretrain

    scripts = {"pretrain/run.py": pretrain, "finetune/run.py": finetune, "common/reports/report.py": report,
               "finetune/predict.py": predict, "finetune/linear_probe.py": probe}
    if program[:2] == ["-m", "common.data.corpora"]:
        return corpora, program[2:]
    if program[0].startswith("c2f-"):
        module, function = _console_scripts()[program[0]].split(":")
        return getattr(importlib.import_module(module), function), program[1:]
    if program[0] == "-m":
        return importlib.import_module(program[1]).main, program[2:]
    if program[0] in scripts:
        return scripts[program[0]], program[1:]
    if (ROOT / program[0]).with_name("__init__.py").is_file():  # a script of the package: its module
        return importlib.import_module(program[0][:-3].replace("/", ".")).main, program[1:]
    spec = importlib.util.spec_from_file_location(Path(program[0]).stem, ROOT / program[0])  # a stand-alone script
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main, program[1:]


def _fenced(text: str, languages=("bash",)) -> list[str]:
    """The bodies of a page's fenced blocks in these languages."""
    return [body for language, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if language in languages]


def _command_lines() -> list[str]:
    """Every `python ...` or `c2f-...` line of the README's and docs/'s bash blocks and inline code that uses
    --set or --dry-run, or that lists something (those run without data)."""
    lines = []
    for text in DOCS.values():
        for block in _fenced(text):
            lines += [line.split("  #")[0].strip() for line in block.splitlines()]
        lines += re.findall(r"`((?:python|c2f-[\w-]+) [^`]+)`", text)
    wanted = [line for line in lines if line.startswith(("python ", "c2f-")) and
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


@pytest.mark.slow
@pytest.mark.parametrize("line", _command_lines())
def test_readme_command_runs_as_written(line, no_data, capsys):
    argv = shlex.split(line)
    assert argv[0] == "python" or argv[0].startswith("c2f-")
    main, args = _entry(argv[1:] if argv[0] == "python" else argv)
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if "--dry-run" in args or args[-1:] in (["list"], ["--list-tasks"]):
        assert code == (PLAN_NOT_READY if "--dry-run" in args else 0), err  # a plan lists the data it lacks here
        if "ssast_fshift4.yaml" in line:
            assert "saving 34.6%" in out  # the paper's 34.58 %, on one GPU or several
            assert "batch: 24 clips per step = " in out  # SSAST's global batch, whatever the launch
    else:  # a real run: everything parses, and it stops before any compute because there is no data here
        missing = ("error: data.train.0.path: manifest data/", "error: task.classes: class list data/")
        if "defaults=auto" in args:  # the recipe closest to the init is read from the init first
            missing += (f"error: checkpoint {args[args.index('--init') + 1]} does not exist",)
        assert code == 2 and err.startswith(missing) and "does not exist" in err, err
        assert not (no_data / "runs").exists()


def test_inline_set_examples_parse_as_numbers(capsys):
    """`--set key=value` examples of the README, docs/ and --help: `5e-5` is a number, not a string."""
    from common.cli import add_run_arguments
    from pretrain.recipe import load_recipe

    parser = argparse.ArgumentParser()
    add_run_arguments(parser, "runs")
    help_text = re.sub(r"\s+", " ", parser.format_help())
    examples = re.findall(r"`(--set [^`]+)`", re.sub(r"\s+", " ", ALL_DOCS))
    examples.append(help_text.split("e.g. ")[1].split(" (")[0])
    examples = [e for e in examples if "key=value" not in e and "..." not in e and "|" not in e]  # concrete ones
    assert len(examples) >= 2
    for example in examples:
        sets = shlex.split(example)[1::2]
        finetuning = ("head", "augment", "task", "defaults", "model.stride")  # keys pretraining does not take
        if any(s.split("=", 1)[0].startswith(finetuning) for s in sets):  # a fine-tuning example
            from finetune.recipe import load_recipe as load_finetuning

            recipe = load_finetuning("esc50", None, sets)
        elif any(s.startswith("model.htsat.") for s in sets):  # HTS-AT's sizes, on an HTS-AT recipe
            from finetune.recipe import load_recipe as load_finetuning

            recipe = load_finetuning("synth", ROOT / "recipes" / "synth_htsat.yaml", sets)
        elif any(s.startswith("coarse.") for s in sets):  # settings of a --coarse derivation (fine-tuning)
            from finetune.recipe import load_recipe as load_finetuning

            recipe = load_finetuning("vggsound", None, sets, coarse="fshift:4")
        else:
            recipe = load_recipe(ROOT / "recipes" / "ssast_fshift4.yaml", sets)
        for item in sets:
            key, value = item.split("=", 1)
            if "." not in key:  # defaults=NAME: the recipe followed, not a field (it loaded, that is all)
                continue
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


@pytest.mark.slow
def test_the_readme_task_file_works_relative_to_itself(tmp_path, monkeypatch, capsys):
    """The documented task YAML, as written, in a folder of its own; run from elsewhere."""
    from common.data.corpora import get_corpus
    from common.data.corpora.stats import compute_stats
    from finetune.run import main as finetune
    from tests.layouts import write_clip

    block = next(b for b in _fenced(ALL_DOCS, ("yaml",)) if "target_frames" in b)
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
    """Every line of the README's and docs/'s bash blocks, comments cut, continuation lines joined."""
    return [line for _, line in _doc_bash_lines()]


def _doc_bash_lines() -> list[tuple[str, str]]:
    """(page, line) for every line of every page's bash blocks, comments cut, continuation lines joined."""
    lines = []
    for page, text in DOCS.items():
        for block in _fenced(text):
            lines += [(page, re.split(r"\s+# ", line)[0].strip()) for line in block.replace("\\\n", " ").splitlines()]
    return [(page, line) for page, line in lines if line]


def _run(line: str, capsys) -> tuple[int, str, str]:
    argv = shlex.split(line)
    assert argv[0] == "python" or argv[0].startswith("c2f-"), line
    main, args = _entry(argv[1:] if argv[0] == "python" else argv)
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_readme_sample_outputs_are_what_the_commands_print(no_data, capsys):
    """Each output block of the README and docs/ (a ``` block without a language) is, line for line, part of
    what a --dry-run command of the bash block before it prints."""
    samples = 0
    for page, text in DOCS.items():
        commands = []
        for language, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
            if language == "bash":
                commands = [re.split(r"\s+# ", line)[0].strip() for line in body.splitlines() if "--dry-run" in line]
            elif language == "":
                outputs = [_run(command, capsys)[1] for command in commands]
                assert any(body in out for out in outputs), (page, body, outputs)
                samples += 1
    assert samples >= 2  # the README's plan on 4 GPUs, docs/schedules.md's derived schedule


@pytest.mark.slow
def test_readme_numbers_are_what_the_commands_print(capsys):
    """The FLOPs per clip the README and docs/ quote, from the commands they name."""
    from common.models.flops import main as flops
    from common.models.htsat.__main__ import main as htsat

    text = re.sub(r"\s+", " ", ALL_DOCS)
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


def test_htsat_schedules_in_the_docs_are_the_recipes(no_data, capsys):
    text = re.sub(r"\s+", " ", ALL_DOCS)
    said = re.search(r"AudioSet (\d+) \+ (\d+) epochs, planned saving ([\d.]+) %.*?VGGSound (\d+) \+ (\d+) .*?planned "
                     r"([\d.]+) %; ESC-50 (\d+) \+ (\d+)\.", text)
    assert said
    for task, epochs, saving in (("audioset", said.group(1, 2), said.group(3)),
                                 ("vggsound", said.group(4, 5), said.group(6)), ("esc50", said.group(7, 8), None)):
        code, out, err = _run(f"python finetune/run.py --init none --task {task} --recipe "
                              f"recipes/ft_htsat_{task}_fshift4.yaml --dry-run", capsys)
        assert code == PLAN_NOT_READY, err  # planned; the corpus is not here
        rows = [line.split() for line in out.splitlines() if line.startswith(("phase1 ", "phase2 "))]
        assert [row[3] for row in rows] == list(epochs), out
        assert saving is None or f"saving {saving}%" in out, out


def test_documented_fine_tuning_runs_do_not_share_a_default_run_directory():
    """The default run directory, runs/finetune/<task>-<recipe>[-<coarse>], ignores --init and --set: two documented
    commands that differ only there would write one folder, the second refused as a run of a different recipe.
    Each such command names its own --run-dir (a --dry-run writes nothing)."""
    from finetune.run import build_parser

    parser, by_dir = build_parser(), {}
    for page, line in _doc_bash_lines():
        words = shlex.split(re.sub(r"^deepspeed (--num_gpus \d+ )?", "python ", line))
        if words[:2] != ["python", "finetune/run.py"] or "--task" not in words or "--dry-run" in words:
            continue
        args = parser.parse_args(words[2:])
        if args.run_dir is None:
            folder = (args.task, Path(args.recipe).stem if args.recipe else "baseline", args.coarse)
            by_dir.setdefault(folder, set()).add((page, tuple(words)))
    shared = {folder: sorted(lines) for folder, lines in by_dir.items() if len({w for _, w in lines}) > 1}
    assert shared == {}, "\n".join(f"{f}: {' | '.join(' '.join(w) for _, w in lines)}" for f, lines in shared.items())


def _finetuning_lines() -> list[str]:
    """The README's and docs/'s fine-tuning commands on registered tasks (a task file of one's own cannot be
    planned here), as `python` lines (a `deepspeed --num_gpus N` launch plans as one process)."""
    from finetune.tasks import TASKS

    lines = [re.sub(r"^deepspeed (--num_gpus \d+ )?", "python ", line) for line in _bash_lines()]
    lines = [line for line in lines if line.startswith("python finetune/run.py --init")]
    return sorted({line for line in lines if shlex.split(line)[shlex.split(line).index("--task") + 1] in TASKS})


def test_the_readme_has_the_fine_tuning_lines_that_name_a_pretraining_run():
    assert "python finetune/run.py --init runs/pretrain/ssast_fshift4 --task vggsound" in _finetuning_lines()


@pytest.mark.slow
@pytest.mark.parametrize("line", _finetuning_lines())
def test_readme_fine_tuning_lines_plan_before_their_init_exists(line, no_data, capsys):
    """Planned with --dry-run before the pretraining run (or the checkpoint) they name exists: the plan, then
    what is missing, the init first."""
    code, out, err = _run(line if "--dry-run" in line else f"{line} --dry-run", capsys)
    assert code == PLAN_NOT_READY and "Traceback" not in err, err
    assert re.search(r"^phase1 \(", out, re.M), out  # the plan
    missing = out.split("files a run needs and does not find (it would stop before any compute):\n")[1]
    init = shlex.split(line)[shlex.split(line).index("--init") + 1]
    if init != "none":
        assert missing.startswith(f"  --init: checkpoint {init} does not exist"), missing
    assert "does not exist" in missing.split("\n", 1)[1]  # and the data


@pytest.mark.slow
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
    small = {"c2f-corpora prepare synth": ["--size", "test"],
             "pretrain/run.py": ["--set", "phases.0.steps=1", "--set", "phases.1.steps=2", "--set", "data.batch_size=4",
                                 "--set", "data.num_workers=0", "--set", "train.eval_every=2"],
             "finetune/run.py": ["--set", "data.batch_size=4", "--set", "data.num_workers=0",
                                 "--set", "phases=[{compression: none, epochs: 1}]"]}
    outputs = []
    for line in lines[2:]:
        argv = shlex.split(line)
        assert argv[0] == "python" or argv[0] in _console_scripts(), line
        extra = next((flags for key, flags in small.items() if line.startswith((f"python {key}", key))), [])
        main, args = _entry(argv[1:] if argv[0] == "python" else argv)
        code = main(args + extra)
        out, err = capsys.readouterr()
        assert code == 0, (line, err)
        outputs.append(out)
    assert (tmp_path / "runs" / "pretrain" / "synth_pretrain" / "model.safetensors").is_file()
    assert "acc" in json.loads((tmp_path / "runs" / "finetune" / "synth-baseline" / "test_metrics.json").read_text())
    assert re.search(r"synth-test-rain-0000.flac  \(\d\.\d\d s, .*\)\n  \d\.\d{3}  \w", outputs[3])  # predict.py
    assert (tmp_path / "runs" / "finetune" / "synth-tiny" / "model.safetensors").is_file()


# --- every shell command of the README and docs/ names what exists ------------------------------------------

REPO_DIRS = ("common", "pretrain", "finetune", "bench", "tests", "recipes", "docs")
SHELL_WORDS = {">", ">>", "|", "&&", ";"}


def _help(main, words: list[str], capsys) -> str:
    """What `PROGRAM WORDS --help` prints (the words select a subcommand: `prepare audioset`, `export`)."""
    with pytest.raises(SystemExit) as exited:
        main([*words, "--help"])
    assert exited.value.code in (0, None)
    return capsys.readouterr().out


def _launcher_help(launcher: str, capsys) -> str:
    if launcher == "torchrun":
        from torch.distributed.run import get_args_parser

        return get_args_parser().format_help() + " --module"  # its -m is --module's short form
    from deepspeed.launcher.runner import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    return capsys.readouterr().out


def _check_files(words: list[str]) -> None:
    """Recipes and repository files a command names exist; a task is registered or a task file."""
    from finetune.tasks import TASKS

    for i, word in enumerate(words):
        path = word.split("=", 1)[-1]
        if path.split("/", 1)[0] in REPO_DIRS and "/" in path and not re.search(r"[<>*$]|NAME", path):
            assert (ROOT / path).exists(), f"{path} does not exist"
        if i and words[i - 1] == "--recipe" and "/" not in word and not word.endswith(".yaml"):  # a shipped one
            from common.config.recipe import recipe_file

            assert recipe_file(word).is_file(), f"--recipe {word}: no recipe of that name"
        if i and words[i - 1] == "--task":
            assert word in TASKS or word.endswith(".yaml"), f"--task {word}: not a registered task nor a task file"


def _program(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher words, program words from the entry point on) of a command line; a module the launcher starts
    (``deepspeed --module M``, ``torchrun -m M``) as ``-m M``."""
    if argv[0] in ("deepspeed", "torchrun"):
        module = next((i for i, word in enumerate(argv) if word in ("--module", "-m")), None)
        if module is not None:
            return argv[:module], ["-m", *argv[module + 1:]]
        at = next(i for i, word in enumerate(argv) if word.endswith(".py"))
        return argv[:at], argv[at:]
    if argv[0] == "python":
        return [], argv[1:]
    return [], argv


@pytest.mark.parametrize("page,line", _doc_bash_lines())
def test_every_documented_command_names_what_exists(page, line, capsys):
    """Each line of a bash block: its entry point exists (a script, a module, a console script, a make target),
    every --flag is in that program's --help (the launcher's in the launcher's), and the recipes, repository
    files and tasks it names exist."""
    argv = shlex.split(line)
    while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value before a command, or alone
        argv = argv[1:]
    if not argv or argv[:1] == ["."]:  # an assignment; sourcing the virtualenv (the first-hour test checks it)
        return
    argv = argv[:next((i for i, word in enumerate(argv) if word in SHELL_WORDS), len(argv))]
    if argv[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in argv[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{page}: no make target {target}"
        return
    launcher, program = _program(argv)
    assert argv[0] in ("python", "deepspeed", "torchrun") or argv[0] in _console_scripts(), \
        f"{page}: unknown program in {line}"
    if launcher:
        known = _launcher_help(launcher[0], capsys)
        for word in launcher[1:]:
            if word.startswith("--"):
                assert re.search(rf"{re.escape(word.split('=')[0])}\b", known), f"{page}: {launcher[0]} has no {word}"
    if program[0].endswith(".py"):
        assert (ROOT / program[0]).is_file(), f"{page}: {program[0]} does not exist"
    elif program[0] == "-m":
        assert importlib.util.find_spec(program[1]) is not None, f"{page}: no module {program[1]}"
    main, args = _entry(program)
    words = list(args[:next((i for i, word in enumerate(args) if word.startswith("-")), len(args))])
    known = _help(main, words[:2], capsys)
    for word in args:
        if word.startswith("--"):
            assert re.search(rf"{re.escape(word.split('=')[0])}\b", known), f"{page}: {program[0]} has no {word}"
    _check_files(args)


def test_the_command_check_sees_every_page_with_commands():
    pages = {page for page, _ in _doc_bash_lines()}
    assert {"README.md", "docs/data.md", "docs/pretraining.md", "docs/finetuning.md", "docs/schedules.md",
            "docs/interop.md"} <= pages


# --- links and citations ---------------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_slug(heading) for heading in re.findall(r"^#+ (.+)$", text, re.M)}


LINKED_PAGES = [*DOC_FILES, ROOT / "bench" / "README.md"]


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_a_file(page):
    """Every relative Markdown link of the README, docs/ and bench/README.md names a file of the repository, and
    an anchor names a heading of that page."""
    text = page.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S))
    checked = 0
    for link in links:
        if re.match(r"^[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.relative_to(ROOT)}: link {link} -> {path} does not exist"
        assert ROOT in path.parents or path == ROOT, f"{page.relative_to(ROOT)}: link {link} leaves the repository"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path.read_text(encoding="utf-8")), \
                f"{page.relative_to(ROOT)}: no #{anchor} in {target}"
        checked += 1
    if page.parent == ROOT / "docs":
        assert checked >= 1  # every page links back to the README


def test_the_readme_links_every_page_of_docs():
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in README, f"the README does not link docs/{page.name}"


SOURCE_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".ini", ".cfg", ".txt"}
SKIPPED_DIRS = {".git", ".venv", "runs", "data", "demo_out", "__pycache__", ".whl", ".pytest_cache", "build", "dist"}


def _repository_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if path.is_file() and not parts & SKIPPED_DIRS and not any(p.endswith(".egg-info") for p in parts) and \
                (path.suffix in SOURCE_SUFFIXES or path.name in ("Makefile", "run")):
            files.append(path)
    return files


# files that exist only outside the repository: notes, designs and paper transcripts
OUTSIDE = re.compile(r"(?<![\w.-])(?:shared/|reference/[\w.-]|DESIGN\.md|paper\.md|style_anchors\.md|peers\.md|"
                     r"ecosystem\.md|ssast_ast\.md|(?<![\w/])htsat\.md)")
# a path into the repository's own folders (placeholders such as <gpu>, NAME, * are not files)
REPO_PATH = re.compile(r"(?<![\w./-])((?:common|pretrain|finetune|bench|tests|recipes|docs)/[\w./-]*\w"
                       r"\.(?:py|md|yaml|json|sh|png))")


def test_no_file_cites_a_file_the_repository_does_not_have():
    """The code and the documentation stand alone: no comment, docstring, message or page cites notes that live
    outside the repository (reference/*.md and the like), and every path into the repository's folders that a
    file names exists."""
    files = _repository_files()
    assert len(files) > 100
    problems = []
    for path in files:
        if path == Path(__file__).resolve():
            continue  # this test names what it looks for
        text = path.read_text(encoding="utf-8", errors="replace")
        name = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(text.splitlines(), 1):
            for match in OUTSIDE.finditer(line):
                problems.append(f"{name}:{n}: cites {match.group(0)!r}, which is not in the repository")
            for match in REPO_PATH.finditer(line):
                cited = match.group(1)
                if "NAME" not in cited and not (ROOT / cited).exists():  # NAME: a placeholder
                    problems.append(f"{name}:{n}: names {cited}, which does not exist")
    assert not problems, "\n".join(problems)


def test_the_resume_rules_in_the_docs_are_the_codes():
    """docs/pretraining.md lists every setting a resume accepts, freely or as a recorded recovery."""
    from common.training.run_recipe import RECOVERY_CHANGES, RESUMABLE_CHANGES, TOLERANCE_CHANGES

    text = DOCS["docs/pretraining.md"].replace("\n", " ")
    missing = [key for key in (*RESUMABLE_CHANGES, *TOLERANCE_CHANGES, *RECOVERY_CHANGES)
               if f"`{key}`" not in text and not (key.startswith("optim.decay") and "`optim.decay*`" in text)]
    assert missing == []
