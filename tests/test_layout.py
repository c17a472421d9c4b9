"""The package's layers, checked from its imports: no cycle, nothing pointing back up a layer, and the
entry points above everything in ``common/``."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

# lowest first: a module may import its own layer or one below it
LAYERS = ["metrics", "system", "config", "audio", "data", "models", "phases", "training", "reports", "cli"]
# the import paths promised to code outside the package (docs/interop.md), each at the layer of what it re-exports
PUBLIC = {"frontend": "audio", "checkpoint": "models"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of the package's own modules, at any depth (in functions too),
    leaving out what only type checkers read (``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in out if m.split(".")[0] in ("common", "pretrain", "finetune", "bench")]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    name = PUBLIC.get(parts[1], parts[1]) if parts[0] == "common" and len(parts) > 1 else None
    return LAYERS.index(name) if name in LAYERS else None


def _package_files() -> list[Path]:
    return sorted(p for d in ("common", "pretrain", "finetune") for p in (ROOT / d).rglob("*.py"))


def test_every_module_of_common_sits_in_a_layer():
    loose = [_module(p) for p in (ROOT / "common").rglob("*.py")
             if _module(p) != "common" and _layer(_module(p)) is None]
    assert loose == []


def test_no_import_points_back_up_a_layer():
    upward = []
    for path in _package_files():
        here = _module(path)
        for line, target in _imports(path):
            if here.startswith("common") and target.split(".")[0] in ("pretrain", "finetune", "bench"):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            a, b = _layer(here), _layer(target)
            if a is not None and b is not None and b > a:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[a]}) imports {target} ({LAYERS[b]})")
    assert upward == []


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for path in _package_files():
        graph[_module(path)] = {m for _, m in _imports(path)}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


# a command's note on why its imports wait: --help is light, or (a library first) says it loads torch
ENTRY_NOTES = ("--help answers without loading torch", "--help loads torch")


def test_imports_sit_at_the_top_unless_a_lazy_one_says_why():
    """An import inside a function is deliberate: a ``# lazy: why`` comment on its line or above the block of
    imports it is in, or a command's module (``__main__`` or a ``__name__ == "__main__"`` guard) whose note says
    why its own imports wait (``--help`` answers without loading torch)."""
    bare = []
    for path in _package_files():
        src = path.read_text()
        lines = src.splitlines()
        if path.name == "__main__.py" or 'if __name__ == "__main__":' in src:
            assert any(note in src for note in ENTRY_NOTES), \
                f"{path.relative_to(ROOT)}: a command without the note on its imports"
            continue
        functions = [n for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in {x for f in functions for x in ast.walk(f) if isinstance(x, (ast.Import, ast.ImportFrom))}:
            i = above = node.lineno - 1
            while above and lines[above - 1].strip().startswith(("import ", "from ")):  # the block's first import
                above -= 1
            if "# lazy:" not in lines[i] and not (above and "# lazy:" in lines[above - 1]):
                bare.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[i].strip()}")
    assert sorted(bare) == []


def test_test_modules_share_helpers_through_the_helper_module_only():
    """What several test modules use lives in ``tests/helpers.py``, ``tests/ranks.py``, ``tests/conftest.py`` or
    ``tests/layouts/``: no test module imports from another test module."""
    crossing = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1].startswith("test_"):
                crossing.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}")
    assert crossing == []


def test_every_folder_of_the_package_is_installed():
    """A folder of modules without ``__init__.py`` is left out of a wheel by ``find_packages`` (an editable install
    hides it: every console script then fails on import)."""
    from setuptools import find_packages

    installed = set(find_packages(where=str(ROOT), include=["common", "common.*", "pretrain", "finetune"]))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for d in ("common", "pretrain", "finetune")
               for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts}
    assert folders - installed == set()
