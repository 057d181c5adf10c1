"""Options as validated dataclasses: one check of each field's value against its annotation, shared by every option
set (``TrainArgs``, ``InfluenceArgs``, ``IndexArgs``, ``CorrectionArgs``, ``SelectArgs``, ``RunConfig``), so a JSON
config's ``"lr": "1e-5"`` is one line naming the option instead of a TypeError deep in a comparison."""

from __future__ import annotations

import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from functools import cache
from typing import Any

from lancet.errors import LancetError


class OptionError(LancetError):
    """An option set's field with a bad value (wrong type or out of range), as one line that names the option, the
    value and what was expected: ``invalid training option lr='1e-5': expected a number``. ``what`` names the
    option set; a run config re-words it as ``finetune.lr='1e-5': expected a number`` (lancet/pipeline.py)."""

    def __init__(self, what: str, option: str, value: Any, reason: str):
        self.what, self.option, self.value, self.reason = what, option, value, reason
        super().__init__(f"invalid {what} option {option}={short_repr(value)}: {reason}")


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in fields(cls)}


def _type_matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the annotated type ``tp``: strict about what a JSON config can hold wrongly (a str for a
    number, a bool for an int, a float for an int); an int is a float (as in PEP 484); unknown types pass."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence):
        return isinstance(value, list | tuple) and all(_type_matches(v, args[0] if args else Any) for v in value)
    if origin in (dict, Mapping):
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this check does not know: left to the range checks


def _describe_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in args)
    if origin in (list, tuple, Sequence):
        inner = {str: "strings", int: "integers", float: "numbers"}.get(args[0] if args else Any)
        return f"a list of {inner}" if inner else "a list"
    if origin in (dict, Mapping):
        return "an object"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def option_type_problem(cls: type, name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the dataclass ``cls``'s field ``name`` by its annotation (``"expected a number"``), or
    None when it can (or ``name`` is no field: unknown keys are the caller's to report)."""
    tp = _field_types(cls).get(name)
    if tp is None or _type_matches(value, tp):
        return None
    return f"expected {_describe_type(tp)}"


def check_option_types(options: Any, what: str, values: Mapping[str, Any] | None = None) -> None:
    """Raise ``OptionError`` for the first field of the dataclass ``options`` (an instance, or a class with
    ``values``) whose value does not match its annotation: a JSON config's "lr": "1e-5", "batch_size": 8.5, "lora":
    "yes" or "max_steps": true stop here, on one line, instead of in a comparison's TypeError or, worse, as a
    truthy string."""
    cls = options if isinstance(options, type) else type(options)
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if values is None:
        values = {f.name: getattr(options, f.name) for f in fields(cls)}
    for name, value in values.items():
        problem = option_type_problem(cls, name, value)
        if problem is not None:
            raise OptionError(what, name, value, problem)


def options_from_json(cls: type, data: Any, what: str, required: Sequence[str] = ()) -> Any:
    """``cls(**data)`` for a JSON object of ``what`` options: not an object, an unknown key or a missing required one
    is one line (the field values are then checked by ``cls`` itself)."""
    if not isinstance(data, dict):
        raise LancetError(f"{what} options: expected a JSON object, got {short_repr(data)}")
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise LancetError(f"unknown {what} option(s): {', '.join(sorted(unknown))}")
    missing = [k for k in required if k not in data]
    if missing:
        raise LancetError(f"{what} options: {', '.join(repr(k) for k in missing)} is missing")
    return cls(**data)
