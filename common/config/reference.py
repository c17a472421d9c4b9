"""Every recipe key, from the recipe dataclasses themselves: :func:`markdown` is ``docs/recipe_keys.md``
(``python -m finetune.recipe_keys`` writes it for both trainers' recipes; a test keeps the file current).

Each key's type and default come from its dataclass field, its description from the ``Args:`` or
``Attributes:`` section of the dataclass's docstring (``name: text``; ``a, b: text`` describes both).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Iterator, Sequence

from common.config.recipe import to_dict

__all__ = ["keys", "markdown"]

# Set by a derivation, not written by hand (common.phases.coarse): left out of the reference.
INTERNAL = ("coarse.baseline",)


def _described(cls) -> dict[str, str]:
    """``{field name: description}`` from the docstring's ``Args:`` / ``Attributes:`` sections."""
    out: dict[str, str] = {}
    for parent in cls.__mro__[-2:0:-1]:  # what a parent class's docstring says, unless this one says otherwise
        if dataclasses.is_dataclass(parent):
            out.update(_described(parent))
    lines = (cls.__doc__ or "").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() not in ("Args:", "Attributes:"):
            i += 1
            continue
        i += 1
        indent, names = None, []
        while i < len(lines) and (not lines[i].strip() or indent is None
                                  or len(lines[i]) - len(lines[i].lstrip()) >= indent):
            line = lines[i]
            depth = len(line) - len(line.lstrip())
            entry = re.match(r"([\w, /]+):\s*(.*)", line.strip())
            if line.strip() and (indent is None or depth == indent) and entry:
                indent = depth
                names = [n.strip() for n in re.split(r"[,/]", entry.group(1)) if n.strip()]
                for name in names:
                    out[name] = entry.group(2)
            elif line.strip():
                for name in names:
                    out[name] += " " + line.strip()
            i += 1
    return out


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(hint):
        return "section"
    return getattr(hint, "__name__", str(hint))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    value = to_dict(value)
    if isinstance(value, dict):
        return "(section)"
    if value is None:
        return "null"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:g}"
    return str(value).replace("|", "\\|")


def _sections(hint: Any) -> list:
    """The dataclasses a field holds: itself, its list items, or an optional one."""
    return [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)] + \
        [b for a in typing.get_args(hint) for b in typing.get_args(a) if dataclasses.is_dataclass(b)]


def keys(cls, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """``(key, type, default, description)`` of every key of recipe dataclass ``cls``, sections depth first; a
    list of sections is written ``name.N.key``."""
    hints, described = typing.get_type_hints(cls), _described(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key, hint = f"{prefix}{field.name}", hints[field.name]
        if key in INTERNAL:
            continue
        inner = _sections(hint)
        if inner:
            listed = typing.get_origin(hint) in (list, tuple) or any(
                typing.get_origin(a) in (list, tuple) for a in typing.get_args(hint))
            yield key, "list of sections" if listed else _type_name(hint), _default(field), \
                described.get(field.name, "")
            yield from keys(inner[0], f"{key}.N." if listed else f"{key}.")
        else:
            yield key, _type_name(hint), _default(field), described.get(field.name, "")


def markdown(recipes: Sequence[tuple[str, type]], others: Sequence[tuple[str, str, type]] = (),
             directives: Sequence[tuple[str, str, str, str, Sequence[str]]] = ()) -> str:
    """The reference page of ``recipes``: ``(which runs read it, recipe dataclass)``, a table per section; then
    ``others``, recipes of their own (``(heading, what reads it, dataclass)``), a table each. ``directives``:
    top-level keys no dataclass holds, read before the recipe is built (``extends``, ``defaults``), as
    ``(key, type, default, meaning, which runs read it)``, after the top-level keys of the dataclasses."""
    rows: dict[str, dict[str, tuple]] = {}  # section -> key -> row, in first-seen order
    used: dict[str, set[str]] = {}  # section or key -> the recipes that have it
    for name, cls in recipes:
        for key, kind, default, text in keys(cls):
            section = key.split(".")[0] if "." in key or "section" in kind else "(top level)"
            rows.setdefault(section, {}).setdefault(key, (kind, default, text))
            used.setdefault(section, set()).add(name)
            used.setdefault(key, set()).add(name)
    for key, kind, default, text, names in directives:
        rows.setdefault("(top level)", {})[key] = (kind.replace("|", "\\|"), default, text)
        used.setdefault("(top level)", set()).update(names)
        used[key] = set(names)
    out = ["# Recipe keys", "",
           "Back to the [README](../README.md). Every key a recipe file, a task file's recipe sections or `--set` may "
           "set, its type, default and meaning, as the code defines them (written by `python -m "
           "finetune.recipe_keys`; a test keeps this page current). `N` is a list index (`phases.0.epochs`). "
           "A recipe's own values, and a registered task's published recipe (`finetune/task_recipes.py`), replace "
           "these defaults; `--dry-run` shows what a run resolves to, and every run writes its resolved recipe to "
           "`RUN/recipe.yaml`.", ""]
    for section, entries in rows.items():
        who = " and ".join(sorted(used[section], reverse=True))
        out += [f"## {section}", "", f"Read by {who} recipes.", "", "| key | type | default | meaning |",
                "|---|---|---|---|"]
        for key, (kind, default, text) in entries.items():
            only = f" ({next(iter(used[key]))} only)" if used[key] != used[section] else ""
            out.append(f"| `{key}` | {kind} | {default} | {_markdown(text)}{only} |")
        out.append("")
    for heading, reader, cls in others:
        out += [f"## {heading}", "", f"{_markdown(reader)}", "", "| key | type | default | meaning |",
                "|---|---|---|---|"]
        out += [f"| `{key}` | {kind} | {default} | {_markdown(text)} |" for key, kind, default, text in keys(cls)]
        out.append("")
    return "\n".join(out)


def _markdown(text: str) -> str:
    """A docstring's reStructuredText as Markdown, on one table row: ``x`` -> `x`, :class:`X` -> `X`."""
    text = re.sub(r":(?:class|func|meth|mod|data|attr):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`").replace("|", "\\|")
