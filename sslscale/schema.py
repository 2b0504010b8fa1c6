"""Typed component configs: one mechanism that checks a mapping from YAML against a schema taken from the code.

Two kinds of schema, both read from type annotations so that code and config cannot drift apart:
- a dataclass (`build(cls, data, prefix)`): every field, nested dataclasses recursively, the dataclass's own
  `__post_init__` checks included (their ValueError becomes a `ConfigError` naming the section);
- a callable's signature (`check_kwargs(fn, kwargs, prefix, skip)`): the keyword arguments of an encoder, an
  objective or a builder, checked against its parameters' annotations and defaults.

Understood annotations: str, int, float (ints accepted), bool, `Literal[...]`, `X | None` and other unions,
`tuple[X, Y]`, `tuple[X, ...]`, `list[X]`, `Sequence[X]`, `dict` / `dict[str, X]` / `Mapping`, nested
dataclasses, `Any` (or no annotation: passed through), and `Annotated[X, Check(...)]` for value constraints
(`at_least(1)`, `greater_than(0)`, `between(0, 1)`, `one_of(...)`).

Every error names the full dotted key (`objective.kwargs.temprature`), the value, and what was expected; an unknown
key names the nearest valid one.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


@dataclass(frozen=True)
class Check:
    """A value constraint carried in `Annotated[...]` metadata: `test(value)` must hold; `expected` says what."""

    test: Callable[[Any], bool]
    expected: str


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f">= {low}")


def greater_than(low: float) -> Check:
    return Check(lambda v: v > low, f"> {low}")


def between(low: float, high: float) -> Check:
    return Check(lambda v: low <= v <= high, f"in [{low}, {high}]")


def one_of(*allowed: Any) -> Check:
    return Check(lambda v: v in allowed, "one of " + ", ".join(map(str, allowed)))


def nearest(key: str, valid: collections.abc.Iterable[str]) -> str:
    """ "; did you mean 'x'?" for a close valid name; otherwise the valid names (a far-fetched "did you mean"
    misleads: BYOL has no 'temperature', and 'temprature' is not a typo of 'batch_norm')."""
    names = sorted(map(str, valid))
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; expected one of {', '.join(map(repr, names))}" if names else "; this section takes no keys"


def unknown_key(key: str, name: str, valid: collections.abc.Iterable[str]) -> ConfigError:
    return ConfigError(f"unknown key '{key}'{nearest(name, valid)}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _is_sequence_origin(origin: Any) -> bool:
    return origin in (list, collections.abc.Sequence, collections.abc.MutableSequence)


def _is_mapping(tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    return origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp`; returns it in the annotated form (ints -> floats for float
    fields, lists -> tuples for tuple fields, mappings -> dataclass instances for dataclass fields)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        value = coerce(value, base, key)
        for check in meta:
            if isinstance(check, Check) and not check.test(value):
                raise ConfigError(f"{key}: {value!r} is out of range; expected {check.expected}")
        return value
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {_describe(value)}")
        return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return build(tp, value, key + ".")
    if origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if _is_sequence_origin(origin) or tp in (list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        args = typing.get_args(tp)
        return [coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
    if _is_mapping(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        args = typing.get_args(tp)
        if len(args) == 2:
            return {k: coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
        return value
    raise ConfigError(f"{key}: cannot be set from a config (its annotation {_name(tp)} is not a config type)")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def hints(obj: Any) -> dict[str, Any]:
    """Resolved annotations (with `Annotated` metadata) of a dataclass, a class's `__init__` or a function."""
    target: Any = obj
    if isinstance(obj, type) and not dataclasses.is_dataclass(obj):
        target = obj.__init__  # type: ignore[misc]
    return typing.get_type_hints(target, include_extras=True)


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from the mapping `data` (keys under `prefix`, e.g. "data.")."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
    types_ = hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            raise unknown_key(f"{prefix}{key}", str(key), names)
    values = {}
    for name in names:
        if name in data:
            values[name] = coerce(data[name], types_[name], prefix + name)
    try:
        return cls(**values)
    except ValueError as err:  # the dataclass's own __post_init__ checks
        raise ConfigError(f"{where}: {err}") from err


def check_retired(data: dict, retired: dict[str, str]) -> None:
    """Error for a dotted key of `retired` (keys that existed once -> what to write instead) present in `data`."""
    for key, advice in retired.items():
        *parents, last = key.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            raise ConfigError(f"'{key}' is no longer a config key: {advice}")


def check_kwargs(fn: Callable, kwargs: Any, prefix: str, skip: collections.abc.Collection[str] = ()) -> dict:
    """`kwargs` checked against the parameters of `fn` (a class: its `__init__`) except those named in `skip`
    (the ones its caller supplies, e.g. an objective's `encoder`). Returns the coerced kwargs.

    Unknown keys are errors unless `fn` takes `**kwargs`; parameters without a default must be given."""
    where = prefix.rstrip(".")
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(kwargs)}")
    signature = inspect.signature(fn)
    types_ = hints(fn)
    params = {
        name: p
        for name, p in signature.parameters.items()
        if name not in skip and name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    for key in kwargs:
        if key not in params and not open_ended:
            raise unknown_key(f"{prefix}{key}", str(key), params)
    missing = [name for name, p in params.items() if p.default is p.empty and name not in kwargs]
    if missing:
        owner = getattr(fn, "__qualname__", repr(fn))
        raise ConfigError(f"{where}: {owner} needs {missing} (no default)")
    out = {}
    for key, value in kwargs.items():
        tp = types_.get(key, Any) if key in params else Any
        out[key] = coerce(value, tp, f"{prefix}{key}")
    return out


def section_type(cls: Any, name: str) -> Any:
    """The annotation of field `name` of dataclass `cls` with `Annotated` and `X | None` peeled off; None when
    `cls` has no such field."""
    if not dataclasses.is_dataclass(cls) or name not in {f.name for f in dataclasses.fields(cls)}:
        return None
    tp = hints(cls)[name]
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            options = [o for o in typing.get_args(tp) if o is not type(None)]
            if len(options) != 1:
                return tp
            tp = options[0]
        else:
            return tp


def is_section(tp: Any) -> bool:
    """Whether a field of this type holds further keys (a nested dataclass or a mapping)."""
    return (dataclasses.is_dataclass(tp) and isinstance(tp, type)) or _is_mapping(tp)


def plain(value: Any) -> Any:
    """A dataclass tree as YAML-safe builtins (tuples -> lists, dataclasses -> dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


__all__ = [
    "Check",
    "ConfigError",
    "at_least",
    "between",
    "build",
    "check_kwargs",
    "check_retired",
    "coerce",
    "greater_than",
    "hints",
    "is_section",
    "nearest",
    "one_of",
    "plain",
    "section_type",
    "unknown_key",
]
