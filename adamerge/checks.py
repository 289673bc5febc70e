"""The one-line checks that option dataclasses share (numbers, choices), so every method's
options are refused with the same wording."""
from __future__ import annotations

import math
from typing import Any

from adamerge.errors import InputError


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False, owner: str = "option") -> None:
    """``value`` is a finite number (an integer with ``integer``) in the given range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        rng = "" if low is None else f" {'>' if low_open else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")
        raise InputError(f"{owner} '{name}' must be {kind}{rng}, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple, owner: str = "option") -> None:
    """``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{owner} '{name}' must be one of {list(allowed)}, got {value!r}")
