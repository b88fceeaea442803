"""Dataclasses as a YAML schema: field types and `Literal` choices are the types, `knob()` puts a
range (and, for strategy knobs, the strategies that read it) beside the field, and `build()` turns
a parsed mapping into the dataclass with errors that name the source and the key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
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
            return f"must be {'above' if self.low_open else 'at least'} {_number(self.low)}"
        if self.low is None:
            return f"must be {'below' if self.high_open else 'at most'} {_number(self.high)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"must be in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(x: float) -> str:
    """1, 0.5, 4294967296 (not 4.29497e+09)."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


LARGEST_INT = 2**63 - 1
"""Whole numbers in a profile fit in 64 bits (torch seeds, counts and sizes do; larger is a typo)."""


def _short(value: Any, limit: int = 80) -> str:
    """`value` for an error message: its repr, cut to `limit` characters."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"a {len(str(abs(value))) if value.bit_length() < 10_000 else 'many'}-digit number"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
            shown = key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 80 else _short(key)
            raise UserError(f"{source}: unknown key {prefix}{shown}{did_you_mean(str(key), list(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, source, f"{prefix}{key}.")
            continue
        value = coerce(value, hint, source, f"{prefix}{key}")
        bounds = bounds_of(fields[key])
        if bounds is not None:
            for number in value if isinstance(value, list) else [value]:
                if number is not None and not bounds.holds(number):
                    raise UserError(f"{source}: {prefix}{key}: {bounds.describe()}, got {_short(value)}")
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
        raise UserError(f"{source}: {key}: {_short(value)} is not one of: {choices}{hint_text}")
    if origin is list:
        if not isinstance(value, list):
            value = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(value, list):
            raise UserError(f"{source}: {key}: expected a list, got {_short(value)}")
        return [coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key}: expected a mapping, got {_short(value)}")
        return {str(k): coerce(v, args[1], source, f"{key}.{k if str(k).isprintable() else _short(str(k))}")
                for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {key}: expected true or false, got {_short(value)}")
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not -LARGEST_INT <= value <= LARGEST_INT:
                raise UserError(f"{source}: {key}: {_short(value)} is out of range (whole numbers here are "
                                f"between {-LARGEST_INT} and {LARGEST_INT})")
            return value
        raise UserError(f"{source}: {key}: expected a whole number, got {_short(value)}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
            except ValueError:
                pass
        if number is not None:
            try:
                number = float(number)
            except OverflowError:  # an int past float's range
                number = math.inf
            if math.isfinite(number):
                return number
            raise UserError(f"{source}: {key}: expected a finite number, got {_short(value)}")
        raise UserError(f"{source}: {key}: expected a number, got {_short(value)}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{source}: {key}: expected a string, got {_short(value)}")
    raise TypeError(f"unsupported profile field type {hint!r} for {key}")
