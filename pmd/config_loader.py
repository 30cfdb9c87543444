"""One way to turn a plain mapping (TOML, YAML, JSON, `-o KEY=VALUE`) into a typed dataclass, with one error style.

Every configuration of the project is a dataclass: the build config (`pmd/build_config.py`), a source's options
(`pmd/sources`), the source catalog (`pmd/catalog.py`), the FLAVA model (`flava/config.py`) and a pretraining run
(`flava/run_config.py`). They are all read by `from_dict`, which checks the mapping against the dataclass's type
hints and refuses what does not fit, naming the place (file and section), the key and what was expected:

    b.toml: unknown key(s) ['shard_rowz']; accepted keys are ['chunk_rows', ...]
    run config: optim.lr: expected a number, got 'fast'
    manifests/sources.toml: source[3]: missing key(s) ['licence']

Command-line overrides are merged here too (`apply_overrides`), so a command only parses its arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A configuration that cannot work; raised before anything is built, downloaded or trained."""


@dataclass(frozen=True)
class Where:
    """The place of a value: the file (or what stands for it) and the dotted path inside it."""

    file: str | None = None
    path: str = ""

    def key(self, name: str | int) -> Where:
        if isinstance(name, int):
            return Where(self.file, f"{self.path}[{name}]")
        return Where(self.file, f"{self.path}.{name}" if self.path else name)

    def __str__(self) -> str:
        if self.file and self.path:
            return f"{self.file}: {self.path}"
        return self.file or self.path or "config"


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: Where | str = "") -> T:
    """``cls`` built from ``data``: unknown and missing keys refused, each value checked against its type hint.

    Conversions are the ones a config file or a command line needs and no more: a number or true/false written as
    a string (``-o lang_threshold=0.6``; PyYAML reads ``2e-4`` as a string) is parsed; an integral float is an int
    where an int belongs (an int stays as written where a float does); one string where a list belongs is a
    one-item list (``data.pairs=DIR``); a nested dataclass is built from its mapping, or from its defaults when the
    section is empty. ``__post_init__`` errors are re-raised as ConfigError naming the section.
    """
    where = where if isinstance(where, Where) else Where(path=where)
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; accepted keys are {sorted(fields)}")
    missing = sorted(name for name, f in fields.items() if name not in data and _required(f))
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: convert(value, hints[name], where.key(name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def convert(value: Any, kind: Any, where: Where) -> Any:
    """``value`` as type ``kind`` (a type hint), or ConfigError saying what was expected at ``where``."""
    if kind is Any or kind is object:
        return value
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for member in members:  # an exact match first: `str | int` keeps "7" a string and 7 an int
            if _is_exact(value, member):
                return convert(value, member, where)
        for member in members:
            try:
                return convert(value, member, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {' or '.join(_expected(m) for m in args)}, got {_show(value)}")
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
    elif kind is int:
        number = _number(value)
        if isinstance(number, int) or (number is not None and number.is_integer()):
            return int(number)
    elif kind is float:
        number = _number(value)
        if number is not None:
            return number if not isinstance(value, str) else float(number)  # an int is a float's value as written
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif kind in (list, tuple) or origin in (list, tuple):
        items = [value] if isinstance(value, (str, Path)) else value
        if isinstance(items, (list, tuple)):
            if args and not (origin is tuple and (len(args) != 2 or args[1] is not Ellipsis)):
                items = [convert(v, args[0], where.key(i)) for i, v in enumerate(items)]
            return tuple(items) if (origin or kind) is tuple else list(items)
    elif kind is dict or origin is dict:
        if isinstance(value, Mapping):
            if not args:
                return dict(value)
            return {convert(k, args[0], where): convert(v, args[1], where.key(str(k))) for k, v in value.items()}
    elif isinstance(kind, type):
        if isinstance(value, kind):
            return value
    else:
        return value
    raise ConfigError(f"{where}: expected {_expected(kind)}, got {_show(value)}")


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _is_exact(value: Any, kind: Any) -> bool:
    base = typing.get_origin(kind) or kind
    if base is float:
        return isinstance(value, float)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(base, type) and isinstance(value, base)


def _expected(kind: Any) -> str:
    origin = typing.get_origin(kind) or kind
    if kind is type(None):
        return "null"
    if dataclasses.is_dataclass(kind) or origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", Path: "a path",
            list: "a list", tuple: "a list"}.get(origin, getattr(origin, "__name__", str(kind)))


def _show(value: Any) -> str:
    if isinstance(value, (Mapping, list, tuple)):
        return f"{type(value).__name__} {value!r}"[:200]
    return repr(value)[:200]


# --------------------------------------------------------------------------------------------------- overrides
def parse_assignments(items: Iterable[str], what: str = "option") -> dict[str, str]:
    """``["a=1", "b.c=x"]`` -> ``{"a": "1", "b.c": "x"}`` (values stay strings)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {item!r} is not KEY=VALUE")
        out[key.strip()] = value
    return out


@dataclass(frozen=True)
class Extend:
    """An override value that adds to the list already there (a repeatable flag beside the config's list)."""

    items: list


def apply_overrides(data: Mapping[str, Any] | None, overrides: Iterable[str] | Mapping[str, Any] | None) -> dict:
    """A copy of ``data`` with overrides set at dotted keys (``optim.lr``, ``image.image_size``).

    ``overrides`` is either ``key=value`` strings, each value read as YAML (``data.ratios={pairs: 1.0}``), or a
    mapping of dotted keys to values from a command's flags: None there means "flag not given" and changes
    nothing, an ``Extend`` adds to the list already at that key.
    """
    out = copy.deepcopy(dict(data or {}))
    if overrides is None:
        return out
    if isinstance(overrides, Mapping):
        pairs = [(key, value, f"{key}={value!r}") for key, value in overrides.items() if value is not None]
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
            key, raw = item.split("=", 1)
            pairs.append((key, yaml.safe_load(raw) if raw.strip() else None, repr(item)))
    for key, value, shown in pairs:
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {shown} has an empty key")
        node = out
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {shown}: {p} is not a mapping")
            node = node[p]
        if isinstance(value, Extend):
            current = node.get(parts[-1])
            current = [] if current is None else current if isinstance(current, list) else [current]
            value = [*current, *value.items]
        node[parts[-1]] = value
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any] | None) -> dict:
    """``over`` laid on ``base``, mapping into mapping (a preset with a config's overrides on it)."""
    out = copy.deepcopy(dict(base))
    for k, v in (over or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
