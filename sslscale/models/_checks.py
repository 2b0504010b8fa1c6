"""Argument checks shared by the model constructors: a bad value fails at construction with an error naming the
argument, the value and what was expected (the YAML key is `model.encoder_kwargs.<name>`)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


def positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def fraction(name: str, value: Any, *, high_inclusive: bool = False) -> None:
    """A probability-like float in [0, 1) (or [0, 1])."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0.0
    ok = ok and (value <= 1.0 if high_inclusive else value < 1.0)
    if not ok:
        raise ValueError(f"{name} must be a float in [0, {'1]' if high_inclusive else '1)'}, got {value!r}")


def positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def one_of(name: str, value: Any, options: Iterable[Any]) -> None:
    options = list(options)
    if value not in options:
        near = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"{name}={value!r} is not supported{hint}; expected one of {options}")


def divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by != 0:
        raise ValueError(f"{name}={value} must be divisible by {by_name}={by}")
