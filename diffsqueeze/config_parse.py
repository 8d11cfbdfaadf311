"""Build frozen config dataclasses from YAML data, checking keys and types by the type hints.

Errors carry the dotted key path of the offending value (``stages[1].prune.scope``), so a user
sees where the recipe is wrong before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

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
