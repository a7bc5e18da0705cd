"""A pipeline step's options checked against its pass's constructor: names from the signature,
types from the annotations (or, without one, from the default's type).

The TOML types map onto Python's: a boolean is `bool`, an integer `int` (also where a float is
expected), a string `str` (also where a path is expected), an array any sequence, a table any
mapping. An annotation this does not understand (a Protocol, a Callable) lets the value through:
the pass's constructor judges it.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

EMPTY = inspect.Parameter.empty


def keyword_parameters(factory: Any) -> tuple[dict[str, inspect.Parameter] | None, dict[str, Any]]:
    """The keyword parameters a pass factory takes (None if it takes **kwargs: anything goes)
    and their annotations, resolved."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None, {}
    params: dict[str, inspect.Parameter] = {}
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return None, {}
        if param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            params[name] = param
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # names only imported for type checking: fall back to the defaults
        hints = {}
    return params, hints


def type_ok(value: Any, hint: Any, default: Any = EMPTY) -> bool:
    """Whether a TOML value fits the annotation `hint` (or the type of `default`)."""
    if hint is EMPTY or hint is Any:
        if default is EMPTY or default is None:
            return True
        return type_ok(value, type(default))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(type_ok(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    cls = typing.get_origin(hint) or hint
    if not isinstance(cls, type):
        return True  # a TypeVar, a Protocol or a Callable: the pass judges
    if issubclass(cls, os.PathLike) or cls is Path:
        return isinstance(value, str)
    if issubclass(cls, Mapping):
        return isinstance(value, dict)
    if issubclass(cls, Sequence):
        return isinstance(value, list)
    return isinstance(value, cls)


_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def type_name(hint: Any, default: Any = EMPTY) -> str:
    """What `type_ok` expects, in words: "a string", "a boolean or an array", ..."""
    if hint is EMPTY or hint is Any:
        return _NAMES.get(type(default), type(default).__name__)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(type_name(a) for a in arms)
    if hint in _NAMES:
        return _NAMES[hint]
    cls = typing.get_origin(hint) or hint
    if isinstance(cls, type) and issubclass(cls, Mapping):
        return "a table"
    if isinstance(cls, type) and issubclass(cls, Sequence):
        return "an array"
    return getattr(hint, "__name__", str(hint))


__all__ = ["keyword_parameters", "type_name", "type_ok"]
