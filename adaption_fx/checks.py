"""Argument checks shared by the public entry points (one wording for one mistake)."""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else a TypeError or
    ValueError naming ``name``."""
    # bool is an int subclass; max_new_tokens=True is a bug, not a count of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
