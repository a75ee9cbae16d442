"""Subcommands of ``python -m tplab``: one module each, with ``register(subparsers)``."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {shown})".strip()


def int_list(flag: str, text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; a ValueError naming the flag for anything else, or for nothing."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values
