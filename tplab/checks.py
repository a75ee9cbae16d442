"""Argument checks shared by every layer of tplab: one definition of "a positive integer" and of "a finite number".

Zero, NaN, infinities and negative values are refused with the name of the argument, never replaced by a default.
"""
from __future__ import annotations

import math
import os
from typing import Any


def is_positive_int(value: Any, low: int = 1) -> bool:
    """Whether ``value`` is an int (a bool is not one here) of at least ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_int(name: str, value: Any, low: int = 1) -> None:
    """ValueError "NAME must be a positive integer, got VALUE" (or "an integer >= LOW") unless it is one."""
    if not is_positive_int(value, low):
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_at_most(name: str, value: int, high: int, why: str) -> None:
    """ValueError "NAME=VALUE is more than HIGH (WHY)" for an absurd size, before anything is allocated for it."""
    if value > high:
        raise ValueError(f"{name}={value} is more than {high:,} ({why})")


def check_number(name: str, value: Any, low: float = 0.0, strict: bool = True) -> float:
    """``value`` if it is a finite number > ``low`` (>= with ``strict=False``); a ValueError naming it otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


def max_threads() -> int:
    """The most torch threads a rank may ask for: 4 per core of this machine (more is a typo, not a setting)."""
    return 4 * (os.cpu_count() or 1)


def check_threads(threads: Any, name: str = "threads") -> None:
    """ValueError unless ``threads`` is None or 1 .. :func:`max_threads`."""
    if threads is not None:
        check_int(name, threads)
        check_at_most(name, threads, max_threads(), f"4 per core of this machine's {os.cpu_count()} cores")
