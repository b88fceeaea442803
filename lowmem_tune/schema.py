"""Dataclasses as a YAML schema: field types and `Literal` choices are the types, `knob()` puts a
range (and, for strategy knobs, the strategies that read it) beside the field, and `build()` turns
a parsed mapping into the dataclass with errors that name the source and the key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from lowmem_tune.errors import UserError


@dataclass(frozen=True)
class Bounds:
    """The values a number may take: low and high ends, each open or closed, either optional."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        if self.high is None:
            if self.low == 0 and self.low_open:
                return "must be positive"
            return f"must be {'above' if self.low_open else 'at least'} {self.low:g}"
        if self.low is None:
            return f"must be {'below' if self.high_open else 'at most'} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"must be in {left}{self.low:g}, {self.high:g}{right}"


def at_least(low: float) -> Bounds:
    return Bounds(low=low)


def above(low: float) -> Bounds:
    return Bounds(low=low, low_open=True)


POSITIVE = above(0)
SHARE = Bounds(0, 1, low_open=True, high_open=True)
"""Strictly between 0 and 1."""


def knob(default: Any = dataclasses.MISSING, *, bounds: Bounds | None = None,
         applies: tuple[str, ...] | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its range (`bounds`, checked when a profile is loaded) and the
    strategies that read it (`applies`; None: every strategy)."""
    metadata = {"bounds": bounds, "applies": applies}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def bounds_of(f: dataclasses.Field) -> Bounds | None:
    return f.metadata.get("bounds")


def applies_to(f: dataclasses.Field) -> tuple[str, ...] | None:
    return f.metadata.get("applies")


def did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def build(cls: type, raw: Any, source: str, prefix: str = "") -> Any:
    """The dataclass `cls` from a parsed mapping: unknown keys, wrong types and values out of
    their bounds are UserErrors naming `source` and the key path."""
    where = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise UserError(f"{source}: unknown key {prefix}{key}{did_you_mean(str(key), list(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, source, f"{prefix}{key}.")
            continue
        value = coerce(value, hint, source, f"{prefix}{key}")
        bounds = bounds_of(fields[key])
        if bounds is not None:
            for number in value if isinstance(value, list) else [value]:
                if number is not None and not bounds.holds(number):
                    raise UserError(f"{source}: {prefix}{key}: {bounds.describe()}, got {value}")
        kwargs[key] = value
    return cls(**kwargs)


def coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """`value` as the type `hint` says, or a UserError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], source, key)
    if origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value
        choices = ", ".join(str(a) for a in args)
        hint_text = did_you_mean(str(value), [str(a) for a in args]) if isinstance(value, str) else ""
        raise UserError(f"{source}: {key}: {value!r} is not one of: {choices}{hint_text}")
    if origin is list:
        if not isinstance(value, list):
            value = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(value, list):
            raise UserError(f"{source}: {key}: expected a list, got {value!r}")
        return [coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key}: expected a mapping, got {value!r}")
        return {str(k): coerce(v, args[1], source, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{source}: {key}: expected a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
            except ValueError:
                pass
        raise UserError(f"{source}: {key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{source}: {key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported profile field type {hint!r} for {key}")
