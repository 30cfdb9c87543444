"""Defaults and choices of the commands, read from the config dataclasses (and, where a library function takes
plain keywords, from its signature), so that help text never restates a value by hand."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable


def field_default(cls: type, name: str) -> object:
    """The default of dataclass `cls`'s field `name` (its default_factory called); KeyError if it has none."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def keyword_default(function: Callable, name: str) -> object:
    default = inspect.signature(function).parameters[name].default
    if default is inspect.Parameter.empty:
        raise KeyError(f"{function.__name__}({name}) has no default")
    return default


def shown(value: object) -> str:
    """A default as a user types it: 10000, 1.5, none, a,b."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ",".join(shown(v) for v in value) or "none"
    return str(value)


def default_of(cls: type, name: str) -> str:
    """`(default X)` for a help text, X from the dataclass."""
    return f"(default {shown(field_default(cls, name))})"
