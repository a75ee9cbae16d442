"""Subcommands of ``python -m tplab``: one module each, with ``register(subparsers)``."""
from __future__ import annotations


def int_list(flag: str, text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; a ValueError naming the flag for anything else, or for nothing."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values
