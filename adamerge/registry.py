"""One small name → object registry, used for methods, solvers and model sources.

``register`` refuses a duplicate name; ``get`` of an unknown name raises :class:`InputError`
naming the registered choices and the closest one ("did you mean").
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, TypeVar

from adamerge.errors import InputError

T = TypeVar("T")


def did_you_mean(name: object, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` when a close choice exists, else an empty string."""
    close = difflib.get_close_matches(str(name), choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T, *, replace: bool = False) -> T:
        if name in self._items and not replace:
            raise InputError(f"{self.kind} '{name}' is already registered")
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[Any], Any]:
        """Class decorator that registers the class and sets its ``name``."""

        def wrap(cls):
            self.add(name, cls)
            cls.name = name
            return cls

        return wrap

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self):
        return self._items.items()

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> T:
        if name not in self._items:
            raise InputError(f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; registered: {self.names()}")
        return self._items[name]
