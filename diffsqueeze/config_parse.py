"""Build frozen config dataclasses from YAML data, checking keys and types by the type hints.

Errors carry the dotted key path of the offending value (``stages[1].prune.scope``), so a user
sees where the recipe is wrong before any work starts. Reading YAML (:func:`read_yaml_file`,
:func:`load_yaml`) refuses a key given twice in one mapping, which PyYAML would silently resolve
to the last value, and :func:`apply_overrides` applies ``key.path=value`` overrides; both are
light (PyYAML only), so the command line checks a recipe's text before any heavy import.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from diffsqueeze.errors import RecipeError

_MISSING = dataclasses.MISSING


def join_path(parent: str, child: str) -> str:
    """``a`` + ``b`` -> ``a.b``; list indices (``[0]``) attach without a dot."""
    if not parent:
        return child
    if not child:
        return parent
    return f"{parent}{child}" if child.startswith("[") else f"{parent}.{child}"


def build_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, validating every key and value.

    Raises:
        RecipeError: unknown or missing keys, wrong types, or a check in ``__post_init__`` failed;
            the message names the full key path.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(path, f"expected a mapping of {_known_keys(cls)}, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise RecipeError(join_path(path, str(key)), f"unknown key; known keys here: {_known_keys(cls)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], join_path(path, name))
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise RecipeError(join_path(path, name), "required key is missing")
    try:
        return cls(**kwargs)
    except RecipeError as exc:
        raise RecipeError(join_path(path, exc.path), exc.message) from None


def _known_keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls) if f.init)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(tp: Any, value: Any, path: str) -> Any:  # noqa: C901 - one branch per kind of type
    """Check ``value`` against type hint ``tp`` and convert lists to tuples where the hint asks."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own error, with its deeper key path
            return convert(candidates[0], value, path)
        errors = []
        for arg in candidates:
            try:
                return convert(arg, value, path)
            except RecipeError as exc:
                errors.append(exc.message)
        raise RecipeError(path, " or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise RecipeError(path, f"must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, (list, tuple)):
            raise RecipeError(path, f"expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return tuple(convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        key_t, val_t = args if args else (Any, Any)
        return {convert(key_t, k, path): convert(val_t, v, join_path(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(path, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"config field type {_type_name(tp)} at {path} is not supported by the recipe loader")


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and dicts -> JSON-able plain data (the resolved recipe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_plain"):
            return obj.to_plain()
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error.

    PyYAML keeps the last of two equal keys, so a recipe with two ``stages:`` lists would run
    the second and silently drop the first. ``source`` names the text in the message.
    """

    source = "YAML"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges; its keys may be overridden
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: SafeLoader's own error follows
                    continue
                if first is not None:
                    raise RecipeError("", f"{self.source} line {line}: duplicate key '{key}' (first at line "
                                      f"{first}); YAML would keep only the last one, so remove or merge one of them")
                seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text with :class:`UniqueKeyLoader`.

    Raises:
        RecipeError: invalid YAML (one line: where and what) or a duplicate key.
    """
    loader_cls = type("Loader", (UniqueKeyLoader,), {"source": source})
    loader = loader_cls(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise RecipeError("", f"{source} is not valid YAML: {yaml_problem(exc)}") from None
    finally:
        loader.dispose()


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    text = f"{problem}{where}" + (f" ({context})" if context else "")
    return " ".join(text.split())


def read_yaml_file(path: str | Path, what: str = "recipe file") -> Any:
    """Read and parse a YAML file (:func:`load_yaml`).

    Raises:
        RecipeError: the file is missing, unreadable, not text, not valid YAML, or has a duplicate key.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError("", f"{what} '{path}' does not exist" if not path.exists() else f"{what} '{path}' is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError("", f"{what} '{path}' cannot be read ({type(exc).__name__}: {exc})") from None
    return load_yaml(text, f"'{path}'")


def apply_overrides(data: Any, overrides: list[str]) -> Any:
    """Apply ``a.b.0.c=value`` overrides (value parsed as YAML) to a copy of raw recipe data.

    Raises:
        RecipeError: malformed override, a value that is not valid YAML, or a list index that
            does not exist; the message names the override's key.
    """
    data = _fresh_copy(data)
    for text in overrides:
        if "=" not in text:
            raise RecipeError(text, "an override is KEY.PATH=VALUE (for example stages.0.prune.targets.unet=0.5)")
        key, raw = text.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError(text, "empty key in override")
        try:
            value = load_yaml(raw, f"override value {raw!r}") if raw.strip() else ""
        except RecipeError as exc:
            hint = "; quote it if it is meant as text" if "not valid YAML" in exc.message else ""
            raise RecipeError(".".join(parts), exc.message + hint) from None
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(where, f"no list item {part!r} (the list has {len(node)} items)")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise RecipeError(where, f"cannot set a key inside {type(node).__name__} {node!r}")
    return data


def _fresh_copy(obj: Any) -> Any:
    """Copy without the aliasing that deepcopy keeps (YAML anchors share one object)."""
    if isinstance(obj, dict):
        return {k: _fresh_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fresh_copy(v) for v in obj]
    return obj
