"""Recipes as validated data: YAML -> typed, frozen dataclasses, with errors that name the key.

``build(cls, data)`` checks every key against the dataclass fields (recursively: nested dataclasses,
``list[...]``, ``tuple[...]``, ``Optional``, ``Literal`` choices) before anything runs, and re-raises
the dataclasses' own ``__post_init__`` checks with the key path in front. ``--set a.b=value`` overrides
any field (``phases.0.steps=10`` indexes lists); values are parsed as YAML.

Numbers are read as people write them, in recipe files and in ``--set`` alike: YAML 1.1 (PyYAML's
``safe_load``) reads ``5e-5``, ``1e9`` and ``1.0e9`` as strings, :data:`RecipeLoader` as floats.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from common.system.atomic import atomic_write_text

__all__ = ["RecipeError", "RecipeLoader", "parse_yaml", "yaml_problem", "build", "to_dict", "merge", "load_yaml",
           "recipe_file", "bundled_recipes", "shipped_recipe",
           "apply_overrides", "recipe_files", "with_source", "did_you_mean", "dump_yaml"]


class RecipeError(ValueError):
    """An invalid recipe; the message starts with the offending key."""


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with floats as YAML 1.2 and Python write them.

    YAML 1.1 needs a dot and a signed exponent (``5.0e-05``); here ``5e-5``, ``1e9``, ``1.0e9``, ``.5``
    and ``1.5`` are all floats. Everything else (ints, booleans, nulls, strings) is as in ``safe_load``, but for a
    key written twice in one mapping, which is an error (``safe_load`` keeps the last silently); a key that
    overrides one merged in with ``<<:`` is not written twice.
    """

    def compose_mapping_node(self, anchor):
        # as written, before merges are flattened into it (a merged key that the mapping overrides is not twice);
        # keys compared with their resolved tags (1 and "1" are two keys)
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.composer.ComposerError(
                    None, None, f"key {key_node.value!r} is written twice in one mapping (first at line "
                    f"{seen[key].start_mark.line + 1}); which one is meant?", key_node.start_mark)
            seen[key] = key_node
        return node


_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
# the same resolvers in the same order, the float one replaced (the int one still sees "10" first: it
# does not match the float pattern, which needs a dot or an exponent)
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, _FLOAT if tag == _FLOAT_TAG else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "-+0123456789.":
    if not any(tag == _FLOAT_TAG for tag, _ in RecipeLoader.yaml_implicit_resolvers.setdefault(_first, [])):
        RecipeLoader.yaml_implicit_resolvers[_first].insert(0, (_FLOAT_TAG, _FLOAT))


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: its problem and where (PyYAML's own text spans lines, with an excerpt and a
    caret)."""
    mark = getattr(err, "problem_mark", None)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    context = " ".join(str(getattr(err, "context", None) or "").split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def parse_yaml(text: str):
    """YAML text -> data, with :class:`RecipeLoader` (``5e-5`` is a number)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own message
            return _convert(value, options[0], key)
        for arg in options:
            try:
                return _convert(value, arg, key)
            except RecipeError:
                continue
        raise RecipeError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:  # the value of the type given (true == 1 and 1.0 == 1 in Python, not in a recipe)
        if not any(value == a and type(value) is type(a) for a in args):
            raise RecipeError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, key)
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_convert(v, inner, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}.{i}") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_convert(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # 1e5 steps is 100000 steps
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    raise RecipeError(f"{key}: unsupported field type {tp!r}")


def did_you_mean(name, known) -> str:
    """``"did you mean lr? "`` where ``name`` (a misspelt key) is one or two letters off one of ``known``, else
    ``""``: the start of an unknown key's parenthesis."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.75)
    return f"did you mean {close[0]}? " if close else ""


def build(cls, data: dict | None, prefix: str = ""):
    """Make a ``cls`` dataclass from a mapping, validating every key and value."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted((k for k in data if k not in fields), key=str)  # a key may be a number in YAML
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise RecipeError(f"{where}{unknown[0]}: unknown key ({did_you_mean(unknown[0], fields)}known keys here: "
                          f"{', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError) as err:
        message = str(err)
        head = message.split(" ", 1)[0].rstrip(":,").split(".")[0]
        if head in fields:  # "lr must be positive" -> "optim.lr must be positive": the key, in full
            raise RecipeError(f"{prefix}.{message}" if prefix else message) from None
        raise RecipeError(f"{prefix or cls.__name__}: {message}") from None


def to_dict(obj) -> Any:
    """Plain YAML-able data (lists, dicts, scalars) of a dataclass tree. A dataclass whose fields say "not given"
    with None (``RECIPE_SPARSE``, e.g. HTS-AT's settings) writes only the fields given."""
    if dataclasses.is_dataclass(obj):
        sparse = getattr(obj, "RECIPE_SPARSE", False)
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (sparse and getattr(obj, f.name) is None)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings are merged key by key, everything else (lists too) replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def bundled_recipes() -> Path | None:
    """The folder of the recipes the package ships: ``recipes/`` of a clone (and of its editable install), else the
    copy a wheel installs as ``share/coarse2fine-ast/recipes`` (under the environment's prefix, beside the packages
    of a ``pip install --target``, or under the user's base of a ``pip install --user``); None where none is."""
    import site  # lazy: read only where a recipe is looked up by name

    top = Path(__file__).resolve().parents[2]
    shared = Path("share") / "coarse2fine-ast" / "recipes"
    for folder in (top / "recipes", Path(sys.prefix) / shared, top / shared, Path(site.getuserbase()) / shared):
        if folder.is_dir():
            return folder
    return None


def shipped_recipe(name: str) -> Path | None:
    """The recipe the package ships as ``name`` (with or without ``.yaml``: :func:`bundled_recipes`), or None."""
    folder = bundled_recipes()
    return None if folder is None else next(
        (folder / n for n in (name, f"{name}.yaml") if (folder / n).is_file()), None)


def _by_name(path: str | Path) -> bool:
    """Whether ``--recipe`` reads as a name (``NAME``, ``recipes/NAME.yaml``) rather than a path of the user's
    (``./NAME.yaml`` is one)."""
    parts = Path(path).parts
    return not str(path).startswith(("./", "../")) and (len(parts) == 1 or (len(parts) == 2 and
                                                                           parts[0] == "recipes"))


def recipe_file(path: str | Path) -> Path:
    """``--recipe``'s file: the path as given where it exists; else, for a bare name (``ssast_fshift4``, with or
    without ``.yaml``) or one under ``recipes/`` (as the docs write them, run outside a clone), the user's
    ``NAME.yaml`` here, else the recipe the package ships of that name (:func:`shipped_recipe`); else the path as
    given (its reader says it is missing)."""
    named, path = _by_name(path), Path(path)
    if path.exists() or not named:
        return path
    if path.suffix != ".yaml" and path.with_name(f"{path.name}.yaml").is_file():  # the user's NAME.yaml here
        return path.with_name(f"{path.name}.yaml")
    return shipped_recipe(path.name) or path


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a recipe file (:func:`recipe_file`: a name of the package's recipes too). ``extends: other.yaml``
    (relative to the file) starts from another recipe: mappings are merged key by key, everything else (lists
    included) is replaced."""
    named = _by_name(path)
    path = recipe_file(path)
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a folder; name a recipe file (.yaml)")
    if not path.is_file():
        folder = bundled_recipes() if named else None
        shipped = sorted(p.stem for p in folder.glob("*.yaml")) if folder is not None else []
        raise FileNotFoundError(f"recipe {path} does not exist" + (f" (the package's recipes, by name: "
                                                                   f"{', '.join(shipped)})" if shipped else ""))
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot be read ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise RecipeError(f"{path}: extends: expected the path of another recipe, got {parent!r}")
    parent_path = _parent_file(path, parent)
    if parent_path in _seen:
        raise RecipeError(f"{path}: extends {parent} in a cycle")
    try:
        base = load_yaml(parent_path, _seen + (path.resolve(),))
    except FileNotFoundError:
        raise RecipeError(f"{path}: extends {parent}, but {parent_path} does not exist") from None
    except RecipeError as err:
        message = str(err)
        raise RecipeError(message if message.startswith(f"{path}:") else f"{path}: extends {parent}: {message}") \
            from None
    return merge(base, data)


def recipe_files(path: str | Path) -> list[tuple[str, dict]]:
    """The files recipe ``path`` reads, itself first, then the recipes it ``extends`` (nearest first), each with
    what it writes itself: where :func:`with_source` looks a key up. Read after :func:`load_yaml` succeeded."""
    files, path = [], recipe_file(path)
    while path.is_file() and len(files) < 64:
        data = parse_yaml(path.read_text())
        if not isinstance(data, dict):
            break
        parent = data.pop("extends", None)
        files.append((str(path), data))
        if not isinstance(parent, str) or not parent:
            break
        path = _parent_file(path, parent)
    return files


def _parent_file(path: Path, parent: str) -> Path:
    """The file ``extends: parent`` of recipe ``path`` names: beside it, else (a bare name of a file not there) the
    package's recipe of that name (a user's recipe that extends a shipped one, on an installed copy)."""
    beside = (path.parent / parent).resolve()
    shipped = None if beside.exists() or len(Path(parent).parts) != 1 else shipped_recipe(parent)
    return shipped.resolve() if shipped is not None else beside


_KEY = re.compile(r"([A-Za-z_]\w*(?:\.\w+)*)[: ]")  # the dotted key a recipe error starts with


def with_source(err: RecipeError, overrides: Sequence[str], files: Sequence[tuple[str, dict]]) -> RecipeError:
    """``err`` with where the value of the key it names was written: ``(--set KEY=VALUE)`` when an override writes
    it (or a section above it, or a key inside it), else ``(in FILE)``, the first of ``files`` (label, data: the
    one that wins first) that writes it; as it is when the message names no key or the key kept its default."""
    match = _KEY.match(str(err))
    if match is None:
        return err
    key = match.group(1)
    for item in reversed(list(overrides)):  # the last --set wins
        given = item.split("=", 1)[0].strip()
        if given == key or key.startswith(given + ".") or given.startswith(key + "."):
            return RecipeError(f"{err} (--set {item})")
    for label, data in files:
        if _writes(data, key.split(".")):
            return RecipeError(f"{err} (in {label})")
    return err


def _writes(data: Any, parts: list[str]) -> bool:
    node = data
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.path=value`` overrides (value parsed as YAML) to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(f"--set {item!r}: expected key=value with a dotted key such as optim.lr")
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise RecipeError(f"--set {key.strip()}: the value {raw!r} is not valid YAML ({yaml_problem(err)})") \
                from None
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"--set {key}: {where} is not an index of a list of {len(node)}")
                node = node[int(part)]
            else:
                if part not in node and parts[i + 1].isdigit():  # an index into a list nothing has written here
                    raise RecipeError(f"--set {key}: the recipe does not write {where}; set the whole list "
                                      f"(--set {where}=[...])")
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"--set {key}: {where} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"--set {key}: {last} is not an index of a list of {len(node)}")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def dump_yaml(obj, path: str | Path) -> None:
    """Write a dataclass tree (a resolved recipe) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
