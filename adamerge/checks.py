"""The one typed option parser: every option of a method, solver, objective or merge is read here,
so each is refused with the same one-line wording and nothing is parsed by hand (``bool("false")``
is true).

- :func:`check_bool`: ``true``/``false`` (YAML booleans, or the strings ``'true'``/``'false'`` in
  any case); anything else (``'no'``, ``0``, ``'0'``, ``None``) is an error naming the option.
- :func:`check_int`: an integer (``2.0`` is 2; ``2.5``, ``True`` and ``'2'`` are errors) in range.
- :func:`check_float`: a finite number (not a bool, not a string) in range.
- :func:`check_choice`: one of the allowed names; :func:`check_list`: a list of the right length
  whose items pass a check.

Options dataclasses declare their fields with :func:`option` (type from the annotation, range
from the keyword arguments) and call :func:`check_fields` in ``__post_init__``; :func:`parse_options`
is the dict -> dataclass path (unknown keys get a did-you-mean). Each check returns the parsed
value (``'false'`` -> ``False``, ``2.0`` -> ``2``), which the caller stores.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Callable

from adamerge.errors import InputError
from adamerge.registry import did_you_mean

_NUMERIC_TEXT = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def _where(owner: str, name: str) -> str:
    return f"{owner} '{name}'"


def _hint(value: Any) -> str:
    """A note for a number that arrived as text (YAML 1.1 reads ``1e-3`` as a string)."""
    if isinstance(value, str) and _NUMERIC_TEXT.match(value):
        return " (a number written as text: quoted, or an exponent without a dot such as 1e-3, which YAML reads as text; write 1.0e-3)"
    return ""


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    lo = "" if low is None else f" {'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{' and' if lo else ''} {'<' if high_open else '<='} {high:g}"
    return lo + hi


def _in_range(value, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and not (value > low if low_open else value >= low):
        return False
    if high is not None and not (value < high if high_open else value <= high):
        return False
    return True


def check_bool(name: str, value: Any, owner: str = "option") -> bool:
    """``True``/``False`` or the strings ``'true'``/``'false'`` (any case); nothing else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InputError(f"{_where(owner, name)} must be true or false, got {value!r}")


def is_number(value: Any, finite: bool = False) -> bool:
    """An int or a float, not a bool (a string is never a number here); with ``finite``, also
    not NaN or infinite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return not finite or math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _refuse(owner: str, name: str, what: str, value: Any, low, high, low_open: bool = False,
            high_open: bool = False) -> InputError:
    return InputError(f"{_where(owner, name)} must be {what}{_range_text(low, high, low_open, high_open)}, "
                      f"got {value!r}{_hint(value)}")


def check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, owner: str = "option") -> float:
    """A finite number (an int is taken as a float; a bool or a string is refused) in range."""
    if not (is_number(value, finite=True) and _in_range(value, low, high, low_open, high_open)):
        raise _refuse(owner, name, "a finite number", value, low, high, low_open, high_open)
    return float(value)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None, owner: str = "option") -> int:
    """An integer (a float with an integer value is taken; ``2.5``, a bool or a string is refused)
    in ``[low, high]``."""
    ok = is_number(value) and (not isinstance(value, float) or (math.isfinite(value) and value.is_integer()))
    if not ok or not _in_range(value, low, high, False, False):
        raise _refuse(owner, name, "an integer", value, low, high)
    return int(value)


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 owner: str = "option") -> int | float:
    """:func:`check_int` with ``integer``, else :func:`check_float` (an int stays an int)."""
    if integer:
        if low is not None and low_open:
            low = math.floor(low) + 1
        if high is not None and high_open:
            high = math.ceil(high) - 1
        return check_int(name, value, low=low, high=high, owner=owner)
    out = check_float(name, value, low=low, high=high, low_open=low_open, high_open=high_open, owner=owner)
    return value if isinstance(value, int) else out


def check_choice(name: str, value: Any, allowed: tuple, owner: str = "option") -> str:
    """``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        hint = did_you_mean(value, list(allowed)) if isinstance(value, str) else ""
        raise InputError(f"{_where(owner, name)} must be one of {list(allowed)}, got {value!r}{hint}")
    return value


def check_list(name: str, value: Any, *, length: int | None = None, item: Callable[[str, Any], Any] | None = None,
               owner: str = "option", what: str = "") -> list:
    """A list (or tuple) of ``length`` items, each passed through ``item(name, value)``
    (default: :func:`check_float`); ``what`` says what the length counts (e.g. ``"one per task"``)."""
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{_where(owner, name)} must be a list, got {value!r}")
    if length is not None and len(value) != length:
        counted = f" ({what})" if what else ""
        raise InputError(f"{_where(owner, name)} must have {length} values{counted}, got {len(value)}: {list(value)!r}")
    check = item or (lambda n, v: check_float(n, v, owner=owner))
    return [check(f"{name}[{i}]", v) for i, v in enumerate(value)]


# ------------------------------------------------------------------------------ options dataclasses
def option(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, choices: tuple | None = None,
           length: int | None = None, check: Callable[[str, Any, str], Any] | None = None,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose type (the annotation: ``bool``, ``int``, ``float``, ``str``,
    ``tuple``/``list``, ``X | None``) and range :func:`check_fields` checks. ``check`` replaces
    the typed check with ``check(name, value, owner) -> parsed value``."""
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices,
            "length": length, "check": check}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"adamerge": meta})
    return dataclasses.field(default=default, metadata={"adamerge": meta})


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except Exception:  # an annotation that does not resolve: checked as Any
            _HINTS[cls] = {}
    return _HINTS[cls]


def check_typed(name: str, value: Any, hint: Any, meta: dict | None = None, owner: str = "option") -> Any:
    """``value`` parsed as the annotation ``hint`` with the range in ``meta`` (see :func:`option`)."""
    meta = meta or {}
    if meta.get("check") is not None:
        return meta["check"](name, value, owner)
    rng = {k: meta[k] for k in ("low", "high", "low_open", "high_open") if meta.get(k) is not None}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return check_typed(name, value, rest[0], meta, owner)
        if str in rest and isinstance(value, str):
            return check_choice(name, value, meta["choices"], owner) if meta.get("choices") else value
        for kind in (bool, int, float):  # bool | int: a bool stays a bool
            if kind in rest and (kind is not bool or isinstance(value, bool) or
                                 (isinstance(value, str) and value.strip().lower() in ("true", "false"))):
                return check_typed(name, value, kind, meta, owner)
        return value
    if hint is bool:
        return check_bool(name, value, owner)
    if hint is int:
        rng.pop("low_open", None), rng.pop("high_open", None)
        return check_int(name, value, owner=owner, **rng)
    if hint is float:
        return check_float(name, value, owner=owner, **rng)
    if hint is str:
        if meta.get("choices"):
            return check_choice(name, value, meta["choices"], owner)
        if not isinstance(value, str):
            raise InputError(f"{_where(owner, name)} must be a name (text), got {value!r}")
        return value
    if origin in (tuple, list) or hint in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        item_hint = args[0] if args else float
        length = meta.get("length") or (len(args) if origin is tuple and args and Ellipsis not in typing.get_args(hint) else None)
        items = check_list(name, value, length=length, owner=owner,
                           item=lambda n, v: check_typed(n, v, item_hint, {**meta, "length": None}, owner))
        return tuple(items) if (origin or hint) is tuple else items
    return value


def check_fields(obj: Any, owner: str = "option") -> None:
    """Parse every field of the dataclass instance ``obj`` by its annotation and :func:`option`
    range, in place (``'false'`` becomes ``False``)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        meta = f.metadata.get("adamerge", {})
        hint = hints.get(f.name, Any)
        setattr(obj, f.name, check_typed(f.name, getattr(obj, f.name), hint, meta, owner))


def parse_options(cls: type, values: Any, owner: str, option_owner: str = "option") -> Any:
    """``cls(**values)``: unknown keys are refused with a did-you-mean, known ones parsed by
    their type first (so a ``__post_init__`` sees typed values); every error is one line that
    names ``owner``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise InputError(f"the options of {owner} must be a mapping, got {values!r}")
    values = dict(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    for key in values:
        if key not in fields:
            raise InputError(f"unknown option '{key}' for {owner}{did_you_mean(str(key), names)}; known: {names}")
    hints = _hints(cls)
    try:
        for key, value in values.items():
            values[key] = check_typed(key, value, hints.get(key, Any), fields[key].metadata.get("adamerge", {}), option_owner)
        return cls(**values)
    except InputError as err:
        message = str(err)
        raise InputError(message if message.startswith(owner) else f"{owner}: {message}") from None
    except (TypeError, ValueError) as err:
        raise InputError(f"{owner}: {err}") from None
