"""Argument checks shared by every layer of tplab: one definition of "a positive integer"."""
from __future__ import annotations

from typing import Any


def is_positive_int(value: Any, low: int = 1) -> bool:
    """Whether ``value`` is an int (a bool is not one here) of at least ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_int(name: str, value: Any, low: int = 1) -> None:
    """ValueError "NAME must be a positive integer, got VALUE" (or "an integer >= LOW") unless it is one."""
    if not is_positive_int(value, low):
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
