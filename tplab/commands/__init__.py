"""Subcommands of ``python -m tplab``: one module each, with ``register(subparsers)``."""
from __future__ import annotations

import argparse

from tplab.specs.dtypes import precision, torch_name


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


def torch_dtype_name(text: str) -> str:
    """An argparse type: a runtime precision in either spelling ("bf16" or "bfloat16") -> torch's name."""
    try:
        return torch_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def runtime_dtype(text: str) -> str:
    """An argparse type: "auto" (the checkpoint's dtype), or a runtime precision in either spelling."""
    return text if text == "auto" else torch_dtype_name(text)


def precision_of(allowed: tuple[str, ...]):
    """An argparse type: a precision among ``allowed`` in either spelling ("bfloat16" or "bf16") -> its short name."""
    def parse(text: str) -> str:
        try:
            return precision(text, allowed)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "dtype"
    return parse
