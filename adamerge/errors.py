"""Exceptions. ``InputError`` is a user mistake: the CLI prints its one-line message, exits 2."""
from __future__ import annotations


class AdamergeError(Exception):
    """Base class of every error adamerge raises on purpose."""


class InputError(AdamergeError, ValueError):
    """Bad input: a missing or corrupt file, mismatched keys/shapes/dtypes, non-finite values,
    an empty stream, a bad option. The message names what is wrong and where."""


class NonFiniteLossError(AdamergeError, FloatingPointError):
    """The objective became NaN/inf during training (the message says at which step)."""
